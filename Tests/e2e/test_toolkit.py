"""The script author's toolkit: timers, channels, broadcast, shared store, JSON, check."""
import asyncio
import json
import subprocess
from pathlib import Path

import websockets

from conftest import BINARY

ROOT = Path(__file__).resolve().parents[2]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def plugin(tmp_path, source, name="p.lua"):
    folder = tmp_path / "scripts"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(source)
    return folder


def test_chat_with_three_clients_across_event_loops(start_server):
    server = start_server("--scripts", str(ROOT / "scripts/examples/chat.lua"), "--threads", "2")

    async def go():
        a = await websockets.connect(server.url)
        assert (await a.recv()).startswith("welcome, guest-")
        await a.send("/nick alice")
        b = await websockets.connect(server.url)
        await b.recv()
        await b.send("/nick bob")
        c = await websockets.connect(server.url)
        await c.recv()
        await c.send("/nick carol")
        await asyncio.sleep(0.3)
        await c.send("/who")

        async def until(ws, text):
            seen = []
            while True:
                m = await asyncio.wait_for(ws.recv(), 5)
                seen.append(m)
                if m == text:
                    return seen
        await until(c, "here: alice, bob, carol")
        await a.send("hello room")
        for ws in (a, b, c):
            await until(ws, "alice: hello room")
        await b.close()
        await until(a, "* bob left")
        await a.send("/who")
        await until(a, "here: alice, carol")
        await a.close()
        await c.close()
    run(go())


def test_timers_after_every_cancel(tmp_path, start_server):
    scripts = plugin(tmp_path, '''
        return {
          on_open = function(conn)
            conn:after(0.1, function(c) c:send("after") end)
            local n = 0
            conn.data.t = conn:every(0.1, function(c)
              n = n + 1
              c:send("tick " .. n)
              if n == 3 then conn.data.t:cancel() end
            end)
            local never = conn:after(0.2, function(c) c:send("never") end)
            never:cancel()
          end,
        }''')
    server = start_server("--scripts", str(scripts))

    async def go():
        async with websockets.connect(server.url) as ws:
            got = []
            try:
                while True:
                    got.append(await asyncio.wait_for(ws.recv(), 0.6))
            except asyncio.TimeoutError:
                return got
    got = run(go())
    assert sorted(got) == ["after", "tick 1", "tick 2", "tick 3"]


def test_timers_stop_when_the_connection_closes(tmp_path, start_server):
    scripts = plugin(tmp_path, '''
        return { on_open = function(conn)
          conn:every(0.05, function(c) luaws.shared:incr("ticks") end)
        end,
        on_message = function(conn, msg) conn:send(tostring(luaws.shared:get("ticks"))) end }''')
    server = start_server("--scripts", str(scripts))

    async def go():
        async with websockets.connect(server.url) as ws:
            await asyncio.sleep(0.3)
        await asyncio.sleep(0.2)
        async with websockets.connect(server.url) as ws2:
            await ws2.send("?")
            first = int(await ws2.recv())
            await ws2.close()
        return first
    ticks = run(go())
    assert 3 <= ticks <= 9, ticks  # ~6 from the first connection, none after it closed
    assert "error" not in server.stderr


def test_broadcast_reaches_every_connection_on_the_path(tmp_path, start_server):
    scripts = plugin(tmp_path, '''
        return { on_message = function(conn, msg) luaws.broadcast("/ws", "all: " .. msg) end }''')
    server = start_server("--scripts", str(scripts), "--threads", "2", "--ws-path", "/ws", "--ws-path", "/other")

    async def go():
        clients = [await websockets.connect(server.url) for _ in range(4)]
        other = await websockets.connect(server.url.replace("/ws", "/other"))
        await clients[0].send("hi")
        got = [await asyncio.wait_for(c.recv(), 5) for c in clients]
        try:
            await asyncio.wait_for(other.recv(), 0.5)
            raise AssertionError("a connection on another path got the broadcast")
        except asyncio.TimeoutError:
            pass
        for c in clients + [other]:
            await c.close()
        return got
    assert run(go()) == ["all: hi"] * 4


def test_shared_store_and_json(tmp_path, start_server):
    scripts = plugin(tmp_path, '''
        return { on_message = function(conn, msg)
          local req = luaws.json.decode(msg)
          local n = luaws.shared:incr("hits")
          luaws.shared:set("last", req.name)
          conn:send(luaws.json.encode({ hits = n, last = luaws.shared:get("last"), list = {1, 2.5, true}, null = luaws.json.null, echo = req }))
        end }''')
    server = start_server("--scripts", str(scripts), "--threads", "2")

    async def go():
        replies = []
        for i in range(4):
            async with websockets.connect(server.url) as ws:
                await ws.send(json.dumps({"name": f"n{i}", "nested": {"a": [1, None, "é"]}}))
                replies.append(json.loads(await ws.recv()))
        return replies
    replies = run(go())
    assert [r["hits"] for r in replies] == [1, 2, 3, 4]
    assert replies[-1]["last"] == "n3"
    assert replies[0]["list"] == [1, 2.5, True] and replies[0]["null"] is None
    assert replies[0]["echo"]["nested"] == {"a": [1, None, "é"]}


def test_json_decode_error_is_a_lua_error_with_line(tmp_path, start_server):
    scripts = plugin(tmp_path, 'return { on_message = function(conn, msg)\n  luaws.json.decode(msg)\nend }\n')
    server = start_server("--scripts", str(scripts))

    async def go():
        async with websockets.connect(server.url) as ws:
            await ws.send("{not json")
            await ws.send("[1]")
            await asyncio.sleep(0.2)
            return ws.close_code
    assert run(go()) is None
    assert server.wait_for_log(r"p\.lua:2: json\.decode: not valid JSON")


def test_check_command(tmp_path):
    ok = subprocess.run([str(BINARY), "check", str(ROOT / "scripts")], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert "ok: 2 plugin(s): echo, time" in ok.stdout
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.lua").write_text("return {\n  on_message = 42,\n}\n")
    (folder / "b.lua").write_text("return {\n  on_open = function(\n}\n")
    (folder / "c.lua").write_text("return { idle = 0, on_idle = function() end }\n")
    bad = subprocess.run([str(BINARY), "check", str(folder)], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1
    assert "a.lua: on_message must be a function" in bad.stderr
    assert "b.lua:3:" in bad.stderr
    assert "c.lua: idle must be a number of seconds from 0.001 to 1e9" in bad.stderr
