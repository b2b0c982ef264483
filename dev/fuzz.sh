#!/usr/bin/env bash
# Fuzzes the server's byte path (HTTP handshake and WebSocket frames, through the real pipeline
# on an EmbeddedChannel) with libFuzzer for a bounded time: dev/fuzz.sh [SECONDS, default 60].
# Starts from Tests/fuzz-corpus; new crashing inputs are written to .build-fuzz/crashes/.
# Add any crash found to Tests/fuzz-corpus: the unit tests replay that corpus on every run.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
bash dev/setup.sh
swift build --scratch-path .build-fuzz --product LuaWSFuzz \
  -Xswiftc -sanitize=fuzzer -Xswiftc -DFUZZING
mkdir -p .build-fuzz/corpus .build-fuzz/crashes
cp -n Tests/fuzz-corpus/* .build-fuzz/corpus/ 2>/dev/null || true
.build-fuzz/debug/LuaWSFuzz .build-fuzz/corpus \
  -max_total_time="$seconds" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
  -artifact_prefix=.build-fuzz/crashes/ -print_final_stats=1
