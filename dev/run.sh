#!/usr/bin/env bash
# Sets up what is missing, builds luaws in release mode and serves the default scripts
# (scripts/) and page (public/) on http://127.0.0.1:8000, with /luaws/status, /metrics and the
# dev console (/luaws/console) on the same port (--admin-on-public: development only). Extra
# arguments go to luaws.
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup.sh
swift build -c release --product luaws
exec .build/release/luaws --scripts scripts --public public --admin-on-public "$@"
