#!/usr/bin/env bash
# Instructions per message on the message path, counted by callgrind: a yardstick that does not
# swing with the machine's load as timings do (repeatable to well under 1 %).
#   Benchmarks/instructions.sh [--json FILE] [--messages N] [--no-idle]
# Builds Sources/LuaWSInstructions in release (its own scratch folder, .build-instructions,
# since it needs -DINSTRUCTIONS) and runs it under valgrind: one connection on an
# EmbeddedChannel through the real server pipeline, 16-byte masked text frames, 4 per read,
#   lua-echo    the default plugins (scripts/echo.lua and scripts/time.lua) answer each message
#   swift-echo  BuiltinEcho (luaws --builtin-echo) answers: the engine's share of lua-echo
#   lua-idle    time.lua's idle timer firing (per firing, not per message); --no-idle skips it
# Each load runs twice, with 0 and with N measured messages after the same warm-up; the
# difference divided by N is the figure, so start-up, Lua loading, warm-up and teardown cancel.
# The callgrind files stay in .build-instructions/ (callgrind_annotate shows where it goes).
# Built as the product is (whole-module optimisation, no -enable-testing): until 2026-11-25 it
# was built with -enable-testing, which counted about 5 % more (18,024 vs 17,145 lua-echo).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/opt/swift/usr/bin:$PATH"

json=""
messages=20000
firings=1000
idle=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --json) json="$2"; shift 2 ;;
    --messages) messages="$2"; shift 2 ;;
    --no-idle) idle=0; shift ;;
    *) echo "usage: $0 [--json FILE] [--messages N] [--no-idle]" >&2; exit 2 ;;
  esac
done
(( messages > 0 && messages % 4 == 0 )) || { echo "instructions.sh: --messages takes a positive multiple of 4 (4 frames per read)" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "instructions.sh: valgrind is needed (apt-get install valgrind)" >&2; exit 1; }

scratch=.build-instructions
swift build -c release --scratch-path "$scratch" --product LuaWSInstructions \
  -Xswiftc -DINSTRUCTIONS >&2
# Valgrind 3.19 cannot read the DWARF 5 debug info Swift emits (it gives up at start-up); a
# copy without it runs, and keeps the symbol table, so callgrind still names the functions.
bin="$scratch/LuaWSInstructions.nodebug"
objcopy --strip-debug "$scratch/release/LuaWSInstructions" "$bin"

# Swift's per-process hash seed would move dictionary probe counts from run to run.
export SWIFT_DETERMINISTIC_HASHING=1

# count LOAD N: instructions of one whole run, from callgrind's "Collected" line.
count() {
  local out="$scratch/callgrind.$1.$2.out" log="$scratch/callgrind.$1.$2.log"
  if ! valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" "$1" "$2" >"$log" 2>&1; then
    echo "instructions.sh: $1 $2 failed:" >&2; tail -n 20 "$log" >&2; exit 1
  fi
  sed -n 's/^==[0-9]*== Collected : \([0-9]*\)$/\1/p' "$log"
}

# measure NAME N UNIT: prints "NAME: X instructions/UNIT" and remembers X for --json.
results=()
measure() {
  local base full per
  base=$(count "$1" 0)
  full=$(count "$1" "$2")
  per=$(( (full - base + $2 / 2) / $2 ))
  echo "$1: $per instructions/$3"
  results+=("\"$1\": {\"instructions_per_$3\": $per, \"count\": $2, \"base\": $base, \"total\": $full}")
}

measure lua-echo "$messages" message
measure swift-echo "$messages" message
if [[ $idle -eq 1 ]]; then measure lua-idle "$firings" firing; fi

if [[ -n "$json" ]]; then
  { echo "{"; printf '  %s' "${results[0]}"; printf ',\n  %s' "${results[@]:1}"; printf '\n}\n'; } >"$json"
fi
