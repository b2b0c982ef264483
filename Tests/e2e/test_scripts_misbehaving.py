"""Plugins that fail never take a connection or the server down."""
import asyncio
from pathlib import Path

import websockets

ROOT = Path(__file__).resolve().parents[2]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def write_scripts(folder, files):
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


BROKEN = {
    # Runs first (name order) and raises on every message.
    "a_raises.lua": 'return { on_message = function(conn, msg)\n  error("boom: " .. msg)\nend }\n',
    # Tries what the sandbox forbids.
    "b_forbidden.lua": 'return { on_message = function(conn, msg)\n  os.execute("touch /tmp/luaws-pwned")\nend }\n',
    "c_io.lua": 'return { on_message = function(conn, msg)\n  local f = io.open("/tmp/luaws-pwned", "w")\nend }\n',
    "echo.lua": (ROOT / "scripts" / "echo.lua").read_text(),
}


def test_failing_plugins_are_reported_and_others_keep_serving(tmp_path, start_server):
    scripts = write_scripts(tmp_path / "scripts", BROKEN)
    server = start_server("--scripts", str(scripts))

    async def go():
        async with websockets.connect(server.url) as first:
            await first.send("one")
            r1 = await first.recv()
            await first.send("two")
            r2 = await first.recv()
            async with websockets.connect(server.url) as second:
                await second.send("three")
                r3 = await second.recv()
            return r1, r2, r3
    assert run(go()) == ("Message received: one", "Message received: two", "Message received: three")
    assert server.wait_for_log(r"a_raises\.lua:2: boom: one")
    # os.execute and io do not exist in the sandbox: the call fails, with file and line.
    assert server.wait_for_log(r"b_forbidden\.lua:2: attempt to call a nil value \(field 'execute'\)")
    assert server.wait_for_log(r"c_io\.lua:2: attempt to index a nil value \(global 'io'\)")
    assert not Path("/tmp/luaws-pwned").exists()
    assert server.proc.poll() is None


def test_runaway_handler_is_stopped_and_others_keep_running(tmp_path, start_server):
    scripts = write_scripts(tmp_path / "scripts", {
        "a_spin.lua": 'return { on_message = function(conn, msg)\n'
                      '  if msg == "spin" then while true do pcall(function() while true do end end) end end\n'
                      'end }\n',
        "echo.lua": BROKEN["echo.lua"],
    })
    server = start_server("--scripts", str(scripts), "--instruction-budget", "1000000", "--threads", "1")

    async def go():
        async with websockets.connect(server.url) as a, websockets.connect(server.url) as b:
            await a.send("spin")
            await b.send("still there?")
            rb = await b.recv()
            ra = await a.recv()
            return ra, rb
    assert run(go()) == ("Message received: spin", "Message received: still there?")
    assert server.wait_for_log(r"a_spin\.lua:\d+: instruction budget exceeded")


def test_memory_hog_gets_a_lua_error_not_an_oom(tmp_path, start_server):
    scripts = write_scripts(tmp_path / "scripts", {
        "a_hog.lua": 'return { on_message = function(conn, msg)\n'
                     '  if msg == "hog" then local t = {} for i = 1, 1e9 do t[i] = ("x"):rep(100) .. i end end\n'
                     'end }\n',
        "echo.lua": BROKEN["echo.lua"],
    })
    server = start_server("--scripts", str(scripts), "--lua-memory-mb", "32", "--instruction-budget", "0")

    async def go():
        async with websockets.connect(server.url) as ws:
            await ws.send("hog")
            first = await ws.recv()
            await ws.send("after")
            return first, await ws.recv()
    assert run(go()) == ("Message received: hog", "Message received: after")
    assert server.wait_for_log(r"memory limit exceeded")


def test_plugin_that_does_not_load_stops_startup_with_file_and_line(tmp_path):
    import subprocess
    from conftest import BINARY
    scripts = write_scripts(tmp_path / "scripts", {"bad.lua": "return {\n  on_message = function(conn, msg)\n    conn:send(\nend }\n"})
    result = subprocess.run([str(BINARY), "--port", "0", "--scripts", str(scripts)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "bad.lua:4:" in result.stderr
