#!/usr/bin/env bash
# Everything a fresh clone needs, idempotent (a second run only checks):
#   1. .venv with the project installed editable, with dev extras (skipped while pyproject.toml is unchanged)
#   2. the Apache Kafka broker jars from Maven Central into deploy/kafka/lib (skipped when complete)
#   3. the Prometheus binaries, when deploy/prometheus/fetch.sh exists
#   4. the deploy checkers that are not Python packages (kustomize, with Go), when deploy/tools.sh exists
# Needs: Python >= 3.11, Java 17 and Maven (for the broker). Override the interpreter with PYTHON=...
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

python="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv with $("$python" --version 2>&1)"
  "$python" -m venv .venv
fi

marker=.venv/.reloop-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ -f "$marker" && "$(cat "$marker")" == "$want" ]] && .venv/bin/python -c "import reloop.engine, reloop.connectors" 2>/dev/null; then
  echo "setup: .venv is up to date with pyproject.toml"
else
  echo "setup: pip install -e '.[dev]' (the first time downloads torch: a few minutes)"
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$want" > "$marker"
fi

for tool in java mvn; do
  command -v "$tool" >/dev/null || { echo "setup: '$tool' is not on PATH (the local Kafka broker needs Java 17 and Maven)" >&2; exit 1; }
done
.venv/bin/reloop kafka fetch

if [[ -f deploy/prometheus/fetch.sh ]]; then
  bash deploy/prometheus/fetch.sh
fi
if [[ -f deploy/tools.sh ]]; then
  bash deploy/tools.sh
fi
echo "setup: done"
