#!/usr/bin/env bash
# Install the Prometheus server and promtool binaries into a cache folder, WITHOUT starting a
# service: Debian's package is downloaded and unpacked (apt-get download + dpkg-deb -x), never
# installed, so nothing listens on :9090. Idempotent: does nothing when the binaries are there.
#
#   deploy/prometheus/fetch.sh            # -> .state/prometheus/bin/{prometheus,promtool}
#   PROMETHEUS_HOME=/opt/prom deploy/prometheus/fetch.sh
#
# Tests find the binaries through $PROMETHEUS_BIN / $PROMTOOL_BIN, then this folder, then PATH.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
home="${PROMETHEUS_HOME:-$root/.state/prometheus}"
bin="$home/bin"

if [[ -x "$bin/prometheus" && -x "$bin/promtool" ]]; then
  echo "prometheus: already present in $bin ($("$bin/prometheus" --version 2>&1 | head -1))"
  exit 0
fi

if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
  echo "prometheus: apt-get/dpkg-deb not found; install Prometheus 2.x and put prometheus and promtool" \
       "in $bin or set PROMETHEUS_BIN/PROMTOOL_BIN" >&2
  exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# apt-get download drops privileges to _apt, which must be able to write here.
chmod 0755 "$work"
if [[ "$(id -u)" == 0 ]] && id _apt >/dev/null 2>&1; then chown _apt "$work"; fi
cd "$work"

# apt-get download needs package lists; refresh them once if the package is unknown.
if ! apt-cache show prometheus >/dev/null 2>&1; then
  sudo_cmd=""
  [[ "$(id -u)" != 0 ]] && command -v sudo >/dev/null && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
fi
apt-get download -qq prometheus
deb="$(ls prometheus_*.deb | head -1)"
dpkg-deb -x "$deb" unpacked

mkdir -p "$bin"
install -m 0755 unpacked/usr/bin/prometheus "$bin/prometheus"
install -m 0755 unpacked/usr/bin/promtool "$bin/promtool"
# The web UI assets are optional for the API; copy them when the package ships them.
for d in consoles console_libraries; do
  if [[ -d "unpacked/etc/prometheus/$d" ]]; then
    rm -rf "${home:?}/$d" && cp -r "unpacked/etc/prometheus/$d" "$home/$d"
  fi
done
echo "prometheus: installed $("$bin/prometheus" --version 2>&1 | head -1) into $bin"
