"""Promises a script cannot break: numbers it passes, finalizers, runaway loops at shutdown,
plugin timers across reloads and threads, and what /luaws/status lets out."""
import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import websockets

from conftest import BINARY
from conftest import replace, run, status, wait_until, write

ROOT = Path(__file__).resolve().parents[2]


def test_a_client_chosen_number_cannot_abort_the_process(tmp_path, start_server):
    scripts = write(tmp_path / "s", {"p.lua": (
        "return { on_message = function(conn, msg)\n"
        "  conn:after(tonumber(msg), function() conn:send('fired') end)\n"
        "  conn:send('armed ' .. msg)\n"
        "end }\n")})
    server = start_server("--scripts", str(scripts))

    async def go():
        async with websockets.connect(server.url) as ws:
            for value in ["9.3e9", "1e300", "-5", "nan"]:
                await ws.send(value)
            await ws.send("0.01")
            assert await ws.recv() == "armed 0.01"
            assert await ws.recv() == "fired"
    run(go())
    assert server.proc.poll() is None
    assert server.wait_for_log(r"p\.lua:2: timer interval must be a number of seconds from 0\.001 to 1e9 \(got 9300000000")


def test_idle_out_of_range_is_a_load_error(tmp_path):
    scripts = write(tmp_path / "s", {"p.lua": "return { idle = 1e10, on_idle = function() end }\n"})
    out = subprocess.run([str(BINARY), "check", str(scripts)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "idle must be a number of seconds from 0.001 to 1e9 (got 10000000000.0)" in out.stderr


def test_finalizers_cannot_stall_check_or_reload(tmp_path, start_server):
    gc = "setmetatable({}, { __gc = function() while true do end end })\nreturn {}\n"
    scripts = write(tmp_path / "s", {"echo.lua": (ROOT / "scripts" / "echo.lua").read_text()})
    bad = write(tmp_path / "bad", {"gc.lua": gc})
    out = subprocess.run([str(BINARY), "check", str(bad)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "gc.lua:1: setmetatable: __gc finalizers are not available to plugins" in out.stderr

    server = start_server("--scripts", str(scripts))
    (scripts / "gc.lua").write_text(gc)
    assert wait_until(lambda: status(server)["last_reload"]["ok"] is False)
    assert "__gc finalizers are not available" in status(server)["last_reload"]["error"]

    async def go():
        async with websockets.connect(server.url) as ws:
            await ws.send("still")
            assert await ws.recv() == "Message received: still"
    run(go())


def test_shutdown_timeout_ends_a_process_whose_loop_is_stuck(tmp_path, start_server):
    # No instruction budget: a runaway hook holds its loop, and SIGTERM could never finish.
    scripts = write(tmp_path / "s", {"p.lua": "return { on_message = function() while true do end end }\n"})
    server = start_server("--scripts", str(scripts), "--instruction-budget", "0", "--threads", "1", "--shutdown-timeout", "1")

    async def go():
        async with websockets.connect(server.url) as ws:
            await ws.send("spin")
            await asyncio.sleep(0.2)
    run(go())
    started = time.time()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=10)
    assert time.time() - started < 5
    assert server.proc.returncode == 1
    assert server.wait_for_log(r"shutdown took longer than 1\.0 s \(--shutdown-timeout\)")


TICK = ("luaws.every(0.05, function() luaws.broadcast('/ws', 'tick {v}') end)\n"
        "return {{}}\n")


def test_top_level_timers_tick_once_per_process_and_end_with_their_plugin(tmp_path, start_server):
    scripts = write(tmp_path / "s", {"tick.lua": TICK.format(v="v1")})
    ok = subprocess.run([str(BINARY), "check", str(scripts)], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    server = start_server("--scripts", str(scripts), "--threads", "2")

    async def collect(ws, seconds):
        got = []
        deadline = time.time() + seconds
        while time.time() < deadline:
            try:
                got.append(await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.time())))
            except asyncio.TimeoutError:
                break
        return got

    async def go():
        async with websockets.connect(server.url) as ws:
            first = await collect(ws, 1.0)
            # every 50 ms for a second: about 20 ticks from one timer, about 40 if every loop ran one
            assert 8 <= first.count("tick v1") <= 28, first
            replace(scripts / "tick.lua", TICK.format(v="v2"))
            assert server.wait_for_log(r"reloaded .*version 2", timeout=10)
            await collect(ws, 0.2)  # what was in flight at the switch
            after = await collect(ws, 0.6)
            assert "tick v1" not in after, after
            assert after.count("tick v2") >= 4, after
    run(go())


def test_status_shows_relative_paths_and_first_lines_only(tmp_path, start_server):
    scripts = write(tmp_path / "s", {"echo.lua": (ROOT / "scripts" / "echo.lua").read_text()})
    server = start_server("--scripts", str(scripts))
    (scripts / "leak.lua").write_text('error("bad config\\nAuthorization: Bearer s3cr3t-token")\nreturn {}\n')
    assert wait_until(lambda: status(server)["last_reload"]["ok"] is False), (status(server), server.stderr)
    error = status(server)["last_reload"]["error"]
    assert error.startswith("leak.lua:1: bad config"), error
    assert "s3cr3t" not in error and str(tmp_path) not in error
    assert "s3cr3t" in server.stderr or "bad config" in server.stderr  # the log keeps the whole story
