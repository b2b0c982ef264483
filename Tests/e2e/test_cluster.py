"""One server across processes: several luaws processes on one Redis share channels, broadcast
and the shared store (`--cluster`), and keep serving through a Redis outage. Real
redis-server processes, started here on free loopback ports."""
import asyncio
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import websockets
from conftest import write

ROOT = Path(__file__).resolve().parents[2]


def run(coro, timeout=90):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    def __init__(self, port=None):
        self.port = port or free_port()
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}"


@pytest.fixture
def redis():
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run dev/setup.sh --test")
    server = Redis()
    yield server
    server.stop()


PUBSUB = """
return {
  on_open = function(conn)
    local ok, err = conn:subscribe(conn.query.channel or "room")
    conn:send(ok and "subscribed" or ("not subscribed: " .. tostring(err)))
  end,
  on_message = function(conn, msg)
    local cmd, rest = msg:match("^(%S+) ?(.*)$")
    if cmd == "pub" then
      local ok, err = luaws.publish("room", rest)
      if not ok then conn:send("publish: " .. err) end
    elseif cmd == "burst" then
      local from, n = rest:match("^(%S+) (%d+)$")
      for i = 1, tonumber(n) do luaws.publish("room", from .. ":" .. i) end
    elseif cmd == "bcast" then luaws.broadcast("/ws", rest)
    elseif cmd == "incr" then conn:send("n=" .. tostring(luaws.shared:incr("counter")))
    elseif cmd == "add" then conn:send(tostring(luaws.shared:add("winner", rest)))
    elseif cmd == "get" then local v, err = luaws.shared:get(rest) conn:send(tostring(v) .. " " .. tostring(err))
    elseif cmd == "ttl" then luaws.shared:set("short", "v", 0.2) conn:send("set")
    elseif cmd == "cas" then
      -- read-modify-write with retries: converges under contention
      for _ = 1, 1000 do
        local v = luaws.shared:get("cas")
        local new = tostring((tonumber(v) or 0) + 1)
        if luaws.shared:cas("cas", v, new) then conn:send("cas ok") return end
      end
      conn:send("cas gave up")
    end
  end,
}
"""


def start_cluster(start_server, tmp_path, redis, n=2, *extra):
    scripts = write(tmp_path / "s", {"p.lua": PUBSUB})
    return [start_server("--scripts", str(scripts), "--cluster", "--redis", redis.url, "--threads", "2", *extra) for _ in range(n)]


async def connect(server, query=""):
    ws = await websockets.connect(server.url + query, max_queue=None)
    assert await ws.recv() == "subscribed"
    return ws


def test_publish_reaches_every_process_once_and_in_order(tmp_path, start_server, redis):
    a, b = start_cluster(start_server, tmp_path, redis)

    async def go():
        subs = [await connect(s) for s in (a, b, a, b)]
        pub_a, pub_b = await connect(a), await connect(b)
        count = 5000
        await pub_a.send(f"burst A {count}")
        await pub_b.send(f"burst B {count}")
        for ws in subs:
            got = {"A": [], "B": []}
            while len(got["A"]) + len(got["B"]) < 2 * count:
                who, n = (await asyncio.wait_for(ws.recv(), 20)).split(":")
                got[who].append(int(n))
            assert got["A"] == list(range(1, count + 1))
            assert got["B"] == list(range(1, count + 1))
        for ws in subs + [pub_a, pub_b]:
            await ws.close()
    run(go(), 120)


def test_broadcast_crosses_processes(tmp_path, start_server, redis):
    a, b = start_cluster(start_server, tmp_path, redis)

    async def go():
        x, y = await connect(a), await connect(b)
        await x.send("bcast hello all")
        assert await asyncio.wait_for(x.recv(), 5) == "hello all"
        assert await asyncio.wait_for(y.recv(), 5) == "hello all"
    run(go())


def test_store_operations_are_atomic_across_processes(tmp_path, start_server, redis):
    a, b = start_cluster(start_server, tmp_path, redis)

    async def go():
        async def incr(server, times):
            ws = await connect(server)
            for _ in range(times):
                await ws.send("incr")
            last = None
            for _ in range(times):
                last = await ws.recv()
            await ws.close()
            return last
        await asyncio.gather(*[incr(s, 250) for s in (a, b, a, b, a, b, a, b)])  # 2,000 in all
        ws = await connect(a)
        await ws.send("get counter")
        assert await ws.recv() == "2000 nil"

        async def race(server, i):
            c = await connect(server)
            await c.send(f"add racer{i}")
            answer = await c.recv()
            await c.close()
            return answer
        answers = await asyncio.gather(*[race((a, b)[i % 2], i) for i in range(100)])
        assert answers.count("true") == 1 and answers.count("false") == 99

        async def cas(server):
            c = await connect(server)
            for _ in range(20):
                await c.send("cas")
            results = [await c.recv() for _ in range(20)]
            await c.close()
            return results
        results = await asyncio.gather(*[cas(s) for s in (a, b, a, b)])
        assert all(r == "cas ok" for rs in results for r in rs)
        await ws.send("get cas")
        assert await ws.recv() == "80 nil"

        await ws.send("ttl")
        assert await ws.recv() == "set"
        await ws.send("get short")
        assert await ws.recv() == "v nil"
        await asyncio.sleep(0.4)
        await ws.send("get short")
        assert await ws.recv() == "nil nil"
    run(go())


def test_the_same_store_semantics_in_process(tmp_path, start_server):
    scripts = write(tmp_path / "s", {"p.lua": PUBSUB})
    server = start_server("--scripts", str(scripts), "--threads", "2")

    async def go():
        async def incr(times):
            ws = await connect(server)
            for _ in range(times):
                await ws.send("incr")
            for _ in range(times):
                await ws.recv()
            await ws.close()
        await asyncio.gather(*[incr(250) for _ in range(8)])
        ws = await connect(server)
        await ws.send("get counter")
        assert await ws.recv() == "2000 nil"

        async def race(i):
            c = await connect(server)
            await c.send(f"add racer{i}")
            answer = await c.recv()
            await c.close()
            return answer
        answers = await asyncio.gather(*[race(i) for i in range(100)])
        assert answers.count("true") == 1
        await ws.send("ttl")
        assert await ws.recv() == "set"
        await asyncio.sleep(0.4)
        await ws.send("get short")
        assert await ws.recv() == "nil nil"
    run(go())


def test_chat_who_is_exact_across_processes_and_threads(tmp_path, start_server, redis):
    chat = ROOT / "scripts" / "examples" / "chat.lua"
    servers = [start_server("--scripts", str(chat), "--cluster", "--redis", redis.url, "--threads", "2") for _ in range(2)]

    # the probe's own nick is the only one left
    async def run_all():
        async def join(i):
            ws = await websockets.connect(servers[i % 2].url, max_queue=None)
            while True:  # others' "joined" may come first
                first = await asyncio.wait_for(ws.recv(), 10)
                if first.startswith("welcome, "):
                    return ws, first.split()[1]
        joined = await asyncio.gather(*[join(i) for i in range(150)])
        probe, probe_name = await join(0)
        await probe.send("/who")
        line = await next_who(probe)
        assert len(line[len("here: "):].split(", ")) == 151
        await asyncio.gather(*[ws.close() for ws, _ in joined])
        deadline = time.time() + 10
        while time.time() < deadline:
            await probe.send("/who")
            line = await next_who(probe)
            if line == "here: " + probe_name:
                break
            await asyncio.sleep(0.1)
        assert line == "here: " + probe_name

    async def next_who(ws):
        while True:
            line = await asyncio.wait_for(ws.recv(), 10)
            if line.startswith("here: "):
                return line
    run(run_all(), 120)


def test_redis_outage_keeps_sockets_and_resumes_delivery(tmp_path, start_server, redis):
    a, b = start_cluster(start_server, tmp_path, redis)

    async def go():
        x, y = await connect(a), await connect(b)
        await x.send("pub before")
        assert await asyncio.wait_for(y.recv(), 5) == "before"
        assert await asyncio.wait_for(x.recv(), 5) == "before"
        redis.stop()
        await asyncio.sleep(0.5)
        await x.send("pub during")
        got = {await asyncio.wait_for(x.recv(), 5), await asyncio.wait_for(x.recv(), 5)}
        assert "during" in got  # delivered locally
        assert any(g.startswith("publish: redis unavailable") for g in got)
        await x.send("get counter")
        assert (await asyncio.wait_for(x.recv(), 5)).startswith("nil redis unavailable")
        redis.start()
        deadline = time.time() + 15
        while time.time() < deadline:
            await x.send("pub after")
            try:
                if await asyncio.wait_for(y.recv(), 1) == "after":
                    break
            except asyncio.TimeoutError:
                pass
        else:
            pytest.fail("delivery across processes did not resume")
    run(go(), 60)
    for server in (a, b):
        assert server.proc.poll() is None


def test_reuse_port_lets_two_processes_share_a_port(tmp_path, start_server):
    scripts = write(tmp_path / "s", {"echo.lua": (ROOT / "scripts" / "echo.lua").read_text()})
    first = start_server("--scripts", str(scripts), "--reuse-port")
    proc = subprocess.Popen([str(Path(first.proc.args[0])), "--host", "127.0.0.1", "--port", str(first.port), "--scripts", str(scripts), "--reuse-port"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert f":{first.port}" in line, line
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_bad_redis_url_stops_the_server(tmp_path):
    from conftest import BINARY
    out = subprocess.run([str(BINARY), "--port", "0", "--cluster", "--redis", "mysql://x"], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "--redis" in out.stderr
