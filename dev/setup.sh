#!/usr/bin/env bash
# Installs what luaws needs on Debian: Lua 5.4 and hiredis headers (always) and, with --test,
# what the tests use (redis-server, which the RedisClient tests start themselves; openssl, which
# makes the TLS tests' CA and certificates; Chromium and
# its driver from Debian; websockets, selenium and pytest from PyPI,
# into the project's virtual environment .venv/, since a stock Debian's Python refuses
# system-wide pip installs: PEP 668). Idempotent: installs only what is missing.
set -euo pipefail

want_tests=0
[[ "${1:-}" == "--test" ]] && want_tests=1

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

apt_packages=(liblua5.4-dev libhiredis-dev pkg-config)
if [[ $want_tests -eq 1 ]]; then apt_packages+=(redis-server chromium chromium-driver python3-venv openssl nginx); fi

missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "setup: apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [[ $want_tests -eq 1 ]]; then
  cd "$(dirname "$0")/.."
  if [[ ! -x .venv/bin/python ]]; then
    echo "setup: python3 -m venv .venv"
    python3 -m venv .venv
  fi
  if ! .venv/bin/python -c "import websockets, selenium, pytest" 2>/dev/null; then
    echo "setup: .venv: pip install -r Tests/e2e/requirements.txt"
    .venv/bin/python -m pip install -q --disable-pip-version-check -r Tests/e2e/requirements.txt
  fi
fi
