#!/usr/bin/env bash
# Install the system (Debian/Ubuntu) packages the test suite needs beyond the Python venv:
#   redis-server  - a real Redis for the Redis job-store tests (tests/fixtures_redis.py).
#   chromium      - a real browser for the web playground test (driven by Playwright).
#   prometheus    - `promtool` for the alert rule tests (tests/test_alert_rules.py) and a real
#                   `prometheus` server for the live metrics test (tests/prometheus_server.py).
# Idempotent: does nothing when every tool is already on PATH. Runs as root, or through sudo.
set -euo pipefail

packages=()
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
command -v chromium >/dev/null 2>&1 || packages+=(chromium)
# One package provides both tools.
{ command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; } || packages+=(prometheus)

if [ "${#packages[@]}" -eq 0 ]; then
    echo "install-system-deps: nothing to install (redis-server: $(command -v redis-server), chromium: $(command -v chromium), promtool: $(command -v promtool), prometheus: $(command -v prometheus))"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    echo "install-system-deps: need root or sudo to install: ${packages[*]}" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-deps: apt-get not found; install these packages yourself: ${packages[*]}" >&2
    exit 1
fi

echo "install-system-deps: installing ${packages[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${packages[@]}"
for tool in redis-server chromium promtool prometheus; do
    command -v "$tool" >/dev/null 2>&1 || { echo "install-system-deps: $tool still missing" >&2; exit 1; }
done
echo "install-system-deps: done ($(redis-server --version | head -n1); $(promtool --version 2>&1 | head -n1))"
