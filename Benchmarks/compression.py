#!/usr/bin/env python3
"""permessage-deflate: compression ratio on the wire and server CPU per message, with and
without compression, for JSON-like 1 KiB messages echoed by the default scripts.
Usage: python3 Benchmarks/compression.py [PATH_TO_LUAWS]  (needs `websockets`)."""
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time

LUAWS = sys.argv[1] if len(sys.argv) > 1 else ".build/release/luaws"
N = 4000


def cpu_ticks(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def message(i):
    rnd = random.Random(i)
    return json.dumps({"id": i, "user": f"user{rnd.randint(1, 500)}", "room": "lobby",
                       "text": " ".join(rnd.choice(["hello", "world", "luaws", "message", "the", "a", "chat"]) for _ in range(120)),
                       "ts": 1764000000 + i})


async def run(url, compression):
    import websockets
    sent = received = 0
    async with websockets.connect(url, compression=compression, max_size=None) as ws:
        transport = ws.transport
        for i in range(N):
            m = message(i)
            sent += len(m)
            await ws.send(m)
            received += len(await ws.recv())
    return sent, received


def main():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([LUAWS, "--port", str(port), "--threads", "1", "--log-level", "error"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    proc.stdout.readline()
    url = f"ws://127.0.0.1:{port}/ws"
    tick = 1e6 / os.sysconf("SC_CLK_TCK")
    try:
        for compression in (None, "deflate"):
            before = cpu_ticks(proc.pid)
            sent, received = asyncio.run(run(url, compression))
            cpu = (cpu_ticks(proc.pid) - before) * tick / N
            print(f"compression={compression or 'off'}: {N} messages of ~{sent // N} B, server CPU {cpu:.1f} µs/message")
        # The ratio the server gets on the wire: each message deflated on its own (no context takeover).
        import zlib
        raw = comp = 0
        for i in range(N):
            m = ("Message received: " + message(i)).encode()
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
            out = c.compress(m) + c.flush(zlib.Z_SYNC_FLUSH)
            raw += len(m)
            comp += len(out) - 4
        print(f"server→client bytes: {raw} raw, {comp} compressed ({comp / raw:.0%} of raw)")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
