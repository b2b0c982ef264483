#!/usr/bin/env bash
# The side-by-side benchmark, one command from a clean clone:
#   Benchmarks/compare.sh [--quick] [--full] [--io] [--tls]
# Installs the peers (Debian: nginx + ngx_lua + lua-resty-core, node-ws, redis-server, socat, openssl; PyPI into a venv:
# fastapi, uvicorn with uvloop/httptools/websockets), builds luaws in release mode and wsbench,
# then runs the same loads against each server in turn on loopback and prints a Markdown table.
# --quick: only the two 16-byte loads. --full: also 19,000 idle connections with the 10 s push.
# --io: only luaws's hooks that wait: luaws.sleep(0), luaws.http.request to a local nginx, and
# fan-out to 1,000 subscribers over 2 processes with --cluster on a local redis-server (beside one
# process without Redis and redis-benchmark's PUBLISH rate); the run without --quick ends with them.
# FANOUT_MESSAGES=N (default 1000, each to all 1,000 subscribers) and FANOUT_WARMUP=N (100) size
# each fan-out run; a run ends after them or after 30 s.
# --tls: only the saturating 16-byte echo over wss: luaws (1 event loop, TLS with --tls-cert/--tls-key)
# against nginx + ngx_lua (1 worker, nginx terminating TLS), and both over plain ws for reference;
# wsbench reaches the TLS servers through a socat TLS client proxy whose CPU is not counted.
# DURATION=SECONDS sets the measured window of each load (default 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup.sh
SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
need=()
for p in nginx libnginx-mod-http-lua lua-resty-core node-ws redis-server redis-tools gcc socat openssl; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [[ ${#need[@]} -gt 0 ]]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v node >/dev/null || { DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs >/dev/null; }
mkdir -p .build-bench
if [[ ! -x .build-bench/venv/bin/python ]]; then python3 -m venv .build-bench/venv; fi
.build-bench/venv/bin/python -c "import fastapi, uvicorn, uvloop, httptools, websockets" 2>/dev/null ||
  .build-bench/venv/bin/pip install -q --disable-pip-version-check fastapi "uvicorn[standard]"
gcc -O2 -Wall -o .build-bench/wsbench Benchmarks/wsbench.c
swift build -c release --product luaws
ulimit -n "$(ulimit -Hn)"
python3 Benchmarks/compare.py "$@"
