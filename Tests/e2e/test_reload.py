"""Hot reload: edit plugins while clients stay connected; nothing is lost or reordered."""
import asyncio
import json
import os
import shutil
import signal
import time
import urllib.request
from pathlib import Path

import pytest
import websockets
from conftest import replace, run, status, wait_until

ROOT = Path(__file__).resolve().parents[2]
ECHO_V2 = 'return { on_message = function(conn, msg) conn:send("v2: " .. msg) end }\n'


@pytest.fixture
def scripts(tmp_path):
    folder = tmp_path / "scripts"
    shutil.copytree(ROOT / "scripts", folder, ignore=shutil.ignore_patterns("examples"))
    return folder


def test_edit_bad_edit_fix_delete_and_restore_while_connected(scripts, start_server):
    server = start_server("--scripts", str(scripts), "--var", "time_interval=0.4")

    async def go():
        async with websockets.connect(server.url) as ws:
            async def ask(text):
                await ws.send(text)
                while True:
                    reply = await ws.recv()
                    if not reply.startswith("It is: "):
                        return reply

            assert await ask("a") == "Message received: a"
            version = status(server)["version"]

            # 1. A new echo.lua answers the next message, on the same connection.
            replace(scripts / "echo.lua", ECHO_V2)
            assert wait_until(lambda: status(server)["version"] == version + 1)
            assert await ask("b") == "v2: b"

            # 2. A syntax error: the old version keeps serving; the error is reported.
            replace(scripts / "echo.lua", "return { on_message = function(conn, msg)\n  conn:send(\nend }\n")
            assert wait_until(lambda: status(server)["last_reload"]["ok"] is False)
            st = status(server)
            assert "echo.lua:3:" in st["last_reload"]["error"]
            assert st["version"] == version + 1
            assert await ask("c") == "v2: c"
            assert server.wait_for_log(r"error.*reload.*echo\.lua:3:")

            # 3. Fixed: the fix loads.
            replace(scripts / "echo.lua", ECHO_V2.replace("v2", "v3"))
            assert wait_until(lambda: status(server)["version"] == version + 2)
            assert await ask("d") == "v3: d"

            # 4. time.lua deleted: pushes stop.
            (scripts / "time.lua").unlink()
            assert wait_until(lambda: status(server)["version"] == version + 3)
            await asyncio.sleep(0.3)
            while True:  # drain a push that may have been sent before the reload
                try:
                    await asyncio.wait_for(ws.recv(), 0.05)
                except asyncio.TimeoutError:
                    break
            try:
                extra = await asyncio.wait_for(ws.recv(), 1.2)
                raise AssertionError(f"a push after time.lua was deleted: {extra}")
            except asyncio.TimeoutError:
                pass

            # 5. time.lua back: pushes resume.
            shutil.copy(ROOT / "scripts" / "time.lua", scripts / "time.lua")
            assert wait_until(lambda: status(server)["version"] == version + 4)
            push = await asyncio.wait_for(ws.recv(), 3)
            assert push.startswith("It is: ")
            assert ws.close_code is None  # the connection never closed
    run(go())


def test_sighup_reloads(scripts, start_server):
    server = start_server("--scripts", str(scripts))
    version = status(server)["version"]
    # Write without the watcher noticing a .lua change first is not possible; SIGHUP must also work.
    server.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: status(server)["version"] == version + 1)


def test_reload_during_a_steady_stream_loses_and_reorders_nothing(scripts, start_server):
    server = start_server("--scripts", str(scripts), "--threads", "2")
    count = 3000

    async def client(n):
        async with websockets.connect(server.url) as ws:
            async def sender():
                for i in range(count):
                    await ws.send(f"{n}:{i}")
                    if i % 100 == 0:
                        await asyncio.sleep(0.005)
            send_task = asyncio.create_task(sender())
            replies = []
            while len(replies) < count:
                replies.append(await ws.recv())
            await send_task
            return replies

    async def reloader():
        for k in range(5):
            await asyncio.sleep(0.1)
            replace(scripts / "echo.lua", ECHO_V2.replace("v2", f"r{k}"))

    async def go():
        results = await asyncio.gather(client(0), client(1), client(2), reloader())
        return results[:3]

    for n, replies in enumerate(run(go())):
        assert len(replies) == count
        numbers = [int(r.rsplit(":", 1)[1]) for r in replies]
        assert numbers == list(range(count)), f"client {n}: lost or reordered"
        for r in replies:
            assert r.startswith("Message received: ") or r.split(":")[0] in {f"r{k}" for k in range(5)}, r
    assert status(server)["version"] >= 2


def test_connection_state_survives_and_on_reload_runs(scripts, start_server):
    counter = ('return { on_message = function(conn, msg)\n'
               '  conn.data.n = (conn.data.n or 0) + 1\n'
               '  conn:send(VERSION .. " " .. conn.data.n)\n'
               'end, on_reload = function(conn) conn:send("reloaded " .. (conn.data.n or 0)) end }\n')
    (scripts / "echo.lua").write_text("VERSION = 'one'\n" + counter)
    server = start_server("--scripts", str(scripts))

    async def go():
        async with websockets.connect(server.url) as ws:
            await ws.send("x"); assert await ws.recv() == "one 1"
            await ws.send("x"); assert await ws.recv() == "one 2"
            replace(scripts / "echo.lua", "VERSION = 'two'\n" + counter)
            assert await asyncio.wait_for(ws.recv(), 5) == "reloaded 2"
            await ws.send("x"); assert await ws.recv() == "two 3"
    run(go())


def test_idle_timer_is_not_reset_by_a_reload(scripts, start_server):
    server = start_server("--scripts", str(scripts), "--var", "time_interval=1.5")

    async def go():
        async with websockets.connect(server.url) as ws:
            start = time.monotonic()
            await asyncio.sleep(0.8)
            os.kill(server.proc.pid, signal.SIGHUP)
            push = await asyncio.wait_for(ws.recv(), 5)
            return push, time.monotonic() - start
    push, waited = run(go())
    assert push.startswith("It is: ")
    assert waited < 1.5 + 0.5, f"the reload restarted the wait: {waited:.2f}s"
