#!/usr/bin/env bash
# The side-by-side benchmark, one command from a clean clone:
#   Benchmarks/compare.sh [--quick] [--full] [--io] [--tls] [--sizes] [--scale]
#   Benchmarks/compare.sh --check BASELINE.json [--tolerance PCT]
#   Benchmarks/compare.sh --record-baseline [FILE]
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
# --sizes: only 1 KiB and 64 KiB echo of JSON-like text, each without and with permessage-deflate
# (wsbench -j, -z), luaws (default scripts, Swift-only, 2 event loops) against Node and nginx + ngx_lua
# (which does not agree to permessage-deflate: reported as not supported).
# --scale: only 50, 500, 2,000 and 5,000 connections × 2 messages of 16 B in flight, luaws (1 event
# loop), Node, nginx + ngx_lua, and each one's growth factor (CPU per message at 5,000 ÷ at 50);
# each run ends after SCALE_MESSAGES replies (default 1,000,000) or DURATION seconds.
# The run without --quick has --sizes and --scale too.
# --check BASELINE.json [--tolerance PCT]: the regression guard, nothing else: runs
# Benchmarks/instructions.sh (callgrind; it builds its own release product in .build-instructions)
# and compares lua-echo, swift-echo and lua-idle with the baseline file: a table baseline / now /
# change; exit status 1 if any grew by more than PCT % (default 5), 0 otherwise. Installs
# valgrind if missing, no peer, and runs no timed load.
# --record-baseline [FILE]: records the baseline (default Benchmarks/BASELINE.json), the same as
# Benchmarks/instructions.sh --json FILE.
# DURATION=SECONDS sets the measured window of each load (default 5).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -d /opt/swift/usr/bin ]] && export PATH="/opt/swift/usr/bin:$PATH"
SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"

check="" tolerance=5 record=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --check) check="${args[i + 1]:-}"; [[ -n "$check" ]] || { echo "compare.sh: --check BASELINE.json" >&2; exit 2; } ;;
    --tolerance) tolerance="${args[i + 1]:-}" ;;
    --record-baseline)
      record="Benchmarks/BASELINE.json"
      if [[ -n "${args[i + 1]:-}" && "${args[i + 1]}" != --* ]]; then record="${args[i + 1]}"; fi ;;
  esac
done
if [[ -n "$check" || -n "$record" ]]; then
  [[ "$tolerance" =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "compare.sh: --tolerance takes a percentage, e.g. 5" >&2; exit 2; }
  [[ -z "$check" || -f "$check" ]] || { echo "compare.sh: no baseline file $check" >&2; exit 2; }
  bash dev/setup.sh
  if ! command -v valgrind >/dev/null; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends valgrind >/dev/null
  fi
  if [[ -n "$record" ]]; then
    Benchmarks/instructions.sh --json "$record"
    echo "compare.sh: baseline recorded in $record"
    exit 0
  fi
  now=$(mktemp /tmp/luaws-instructions.XXXXXX.json)
  trap 'rm -f "$now"' EXIT
  Benchmarks/instructions.sh --json "$now"
  status=0
  python3 Benchmarks/compare.py --check "$check" --now "$now" --tolerance "$tolerance" || status=$?
  exit "$status"
fi

bash dev/setup.sh
need=()
for p in nginx libnginx-mod-http-lua lua-resty-core node-ws redis-server redis-tools gcc zlib1g-dev socat openssl; do
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
gcc -O2 -Wall -o .build-bench/wsbench Benchmarks/wsbench.c -lz
swift build -c release --product luaws
ulimit -n "$(ulimit -Hn)"
python3 Benchmarks/compare.py "$@"
