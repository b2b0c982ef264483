#!/usr/bin/env bash
# Sets up what is missing, then runs every test: Swift unit tests, the plugin tests of the
# shipped scripts (luaws test, on a virtual clock), then the end-to-end tests
# (the built binary on ephemeral loopback ports, Python's websockets, raw sockets, Chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup.sh --test
swift build --build-tests
swift test --skip-build
.build/debug/luaws test --scripts scripts scripts/tests
LUAWS_BIN="$PWD/.build/debug/luaws" .venv/bin/python -m pytest -q Tests/e2e "$@"
