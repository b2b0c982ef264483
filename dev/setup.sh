#!/usr/bin/env bash
# Installs what luaws needs on Debian: Lua 5.4 headers (always) and, with --test, what the
# tests use (Chromium and its driver from Debian; websockets, selenium and pytest from PyPI).
# Idempotent: installs only what is missing.
set -euo pipefail

want_tests=0
[[ "${1:-}" == "--test" ]] && want_tests=1

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

apt_packages=(liblua5.4-dev pkg-config)
if [[ $want_tests -eq 1 ]]; then apt_packages+=(chromium chromium-driver); fi

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
  if ! python3 -c "import websockets, selenium, pytest" 2>/dev/null; then
    echo "setup: pip install websockets selenium pytest"
    python3 -m pip install -q --disable-pip-version-check -r Tests/e2e/requirements.txt
  fi
fi
