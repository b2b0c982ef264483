"""The newest features attacked by a hostile client and a careless plugin author: on_upgrade,
plugin routes, conn.remote_addr with --trust-proxy, the shared store (in-process and over
Redis), publish/subscribe across processes, --reuse-port.

Each test asserts behaviour that must hold; the bugs they found when written are fixed. Everything listens on loopback; every loop is bounded in count and time;
every process started here is stopped (the start_server fixture, the redis fixture)."""
import asyncio
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import websockets

from conftest import BINARY
from test_cluster import Redis
from conftest import write

ROOT = Path(__file__).resolve().parents[2]
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def raw(port, data, wait=1.0):
    """Sends bytes, returns every byte received until the server closes or `wait` passes."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        out = b""
        deadline = time.time() + wait
        try:
            while time.time() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    return out


def get(path, headers=""):
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode()


def upgrade(path):
    return get(path, f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n")


def body_of(response):
    return response.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in response else b""


def status_page(server):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    import json
    return json.loads(opener.open(server.admin + "/luaws/status", timeout=5).read())


def rss_kb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.fixture
def redis():
    server = Redis()
    yield server
    server.os_cont()
    server.stop()


def _os_cont(self):
    if self.proc and self.proc.poll() is None:
        os.kill(self.proc.pid, signal.SIGCONT)


Redis.os_cont = _os_cont


def redis_call(port, *args):
    """One RESP command on a fresh connection; the raw reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(("*%d\r\n" % len(args) + "".join("$%d\r\n%s\r\n" % (len(a.encode()), a) for a in args)).encode())
        time.sleep(0.1)
        return s.recv(1 << 16)


# An evaluator: each text message is Lua run in a hook (so it may wait), with `CONN` the
# connection; the reply is "ok v1 v2 ..." with non-ASCII bytes shown as \xNN.
EVAL = r"""
local function show(v)
  if type(v) == "table" then
    local parts = {}
    for i, x in ipairs(v) do parts[i] = tostring(x) end
    v = "{" .. table.concat(parts, ",") .. "}"
  end
  return (tostring(v):gsub("[%z\1-\31\127-\255]", function(c) return string.format("\\x%02x", c:byte()) end))
end
return {
  on_message = function(conn, msg)
    CONN = conn
    local results = table.pack(pcall(load(msg)))
    local out = {}
    for i = 1, results.n do out[i] = show(results[i]) end
    conn:send(table.concat(out, " "))
  end,
}
"""


async def evaluate(url, *chunks, timeout=20):
    replies = []
    async with websockets.connect(url, max_size=None, compression=None) as ws:
        for chunk in chunks:
            await ws.send(chunk)
            replies.append(await asyncio.wait_for(ws.recv(), timeout))
    return replies


# ============================================================================ on_upgrade

UPGRADE = """
return {
  on_upgrade = function(req)
    local q = req.query
    if q.sleep then luaws.sleep(tonumber(q.sleep)) end
    if q.refuse then return 401, "secret-for-" .. q.refuse end
    if q.s == "crlf" then return 401, "a\\r\\nSet-Cookie: x=1\\r\\n\\r\\nHTTP/1.1 200 OK" end
    if q.s == "300" then return 300, "x" end
    if q.s == "600" then return 600, "x" end
    if q.s == "float" then return 401.5, "x" end
    if q.s == "string" then return "401", "x" end
  end,
  on_open = function(conn) conn:send("open") end,
}
"""


def test_slots_stay_right_when_clients_leave_while_on_upgrade_waits(tmp_path, start_server):
    """20 upgrades wait in on_upgrade past --handshake-timeout (the server closes them at 1 s)
    and are then accepted: no slot is kept by any of them, so 3 clients fit and a 4th gets 503."""
    scripts = write(tmp_path / "s", {"u.lua": UPGRADE})
    server = start_server("--scripts", str(scripts), "--threads", "1", "--handshake-timeout", "1", "--max-connections", "3")
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
    try:
        for s in socks:
            s.sendall(upgrade("/ws?sleep=1.5"))
        started = time.time()
        socks[0].settimeout(5)
        assert socks[0].recv(100) == b""  # closed by the handshake timeout, unanswered
        assert 0.8 < time.time() - started < 3
        time.sleep(1.5)  # the hooks accept now, on closed channels
    finally:
        for s in socks:
            s.close()

    async def go():
        conns = [await websockets.connect(server.url) for _ in range(3)]
        for ws in conns:
            assert await ws.recv() == "open"
        with pytest.raises(websockets.InvalidStatus) as full:
            await websockets.connect(server.url)
        assert full.value.response.status_code == 503
        for ws in conns:
            await ws.close()
    run(go())
    assert status_page(server)["connections"] == 0


def test_on_upgrade_waiting_past_hook_timeout_refuses_with_500(tmp_path, start_server):
    scripts = write(tmp_path / "s", {"u.lua": UPGRADE})
    server = start_server("--scripts", str(scripts), "--hook-timeout", "0.5")
    with socket.create_connection(("127.0.0.1", server.port), timeout=4) as s:
        started = time.time()
        s.sendall(upgrade("/ws?sleep=5"))
        assert s.recv(100).startswith(b"HTTP/1.1 500 ")
        assert time.time() - started < 3


@pytest.mark.parametrize("case", ["300", "600", "float", "string"])
def test_on_upgrade_statuses_outside_400_to_599_refuse_with_500(tmp_path, start_server, case):
    scripts = write(tmp_path / "s", {"u.lua": UPGRADE})
    server = start_server("--scripts", str(scripts))
    answer = raw(server.port, upgrade(f"/ws?s={case}"))
    assert answer.startswith(b"HTTP/1.1 500 "), answer[:60]
    assert b"on_upgrade" not in answer


def test_an_on_upgrade_reason_with_crlf_stays_in_the_body(tmp_path, start_server):
    scripts = write(tmp_path / "s", {"u.lua": UPGRADE})
    server = start_server("--scripts", str(scripts))
    answer = raw(server.port, upgrade("/ws?s=crlf"))
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 401 ")
    assert b"Set-Cookie" not in head
    length = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")][0].split(b":")[1])
    assert len(body) == length  # framed: the injected "response" is inside the body


def test_a_refusal_for_a_client_that_left_never_reaches_another_client(tmp_path, start_server):
    scripts = write(tmp_path / "s", {"u.lua": UPGRADE})
    server = start_server("--scripts", str(scripts), "--threads", "1")
    leaked = []
    for round_ in range(3):
        for i in range(30):
            with socket.create_connection(("127.0.0.1", server.port)) as s:
                s.sendall(upgrade(f"/ws?sleep=0.3&refuse=client{round_}-{i}"))
                time.sleep(0.01)
        time.sleep(0.8)  # every hook has refused by now, on a closed channel
        for _ in range(40):
            answer = raw(server.port, get("/ws"), wait=0.5)
            assert answer, "no answer to a plain GET /ws"
            if b"secret-for-" in answer:
                leaked.append(answer)
    assert leaked == [], leaked[:2]


# ============================================================================ routes

ROUTES = r"""
return {
  routes = {
    ["GET /status"] = function(req)
      local c = tonumber(req.query.c)
      return math.tointeger(c) or c, nil, "body"
    end,
    ["GET /header"] = function(req) return 200, { ["X-A"] = req.query.v }, "ok" end,
    ["GET /framing"] = function(req)
      return 200, { ["content-type"] = "text/html", ["Content-Length"] = "5", ["Transfer-Encoding"] = "chunked", ["Connection"] = "close" }, "hello world"
    end,
    ["GET /control"] = function(req) return 200, { ["X-C"] = "a\11b" }, "ok" end,
    ["GET /latin1"] = function(req) return 200, { ["X-L"] = "caf\233" }, "ok" end,
    ["GET /nobody"] = function(req) return tonumber(req.query.c), nil, "this must not be sent" end,
    ["GET /binary"] = function(req) return 200, { ["content-type"] = "application/octet-stream" }, "\0\1\2\255\254" end,
    ["GET /big"] = function(req) return 200, nil, string.rep("x", tonumber(req.query.n)) end,
    ["GET /slow"] = function(req) luaws.sleep(tonumber(req.query.s)) return 200, nil, "slow " .. req.query.n end,
    ["POST /upload"] = function(req) return 200, nil, "got " .. #req.body end,
  },
}
"""


@pytest.fixture
def routes(tmp_path, start_server):
    scripts = write(tmp_path / "r", {"r.lua": ROUTES})
    return start_server("--scripts", str(scripts), "--max-body-size", "1000", "--handshake-timeout", "1")


@pytest.mark.parametrize("code,expected", [(199, 500), (100, 500), (600, 500), (-1, 500), (200.5, 500), (299, 299), (599, 599)])
def test_route_statuses_outside_200_to_599_answer_500(routes, code, expected):
    answer = raw(routes.port, get(f"/status?c={code}", "Connection: close\r\n"))
    assert answer.startswith(f"HTTP/1.1 {expected} ".encode()), answer[:40]


def test_route_headers_cannot_inject_or_break_framing(routes):
    answer = raw(routes.port, get("/header?v=a%0d%0aSet-Cookie:x", "Connection: close\r\n"))
    assert answer.startswith(b"HTTP/1.1 500 ") and b"Set-Cookie" not in answer
    answer = raw(routes.port, get("/framing") + get("/header?v=second"), wait=1.5)
    first, _, rest = answer.partition(b"hello world")
    assert b"Content-Length: 11" in first and b"Content-Type: text/html" in first
    assert b"chunked" not in first and b"Connection: close" not in first
    assert rest.startswith(b"HTTP/1.1 200 OK") and rest.endswith(b"ok")  # keep-alive held


def test_route_binary_and_large_bodies_arrive_whole(routes):
    assert body_of(raw(routes.port, get("/binary", "Connection: close\r\n"))) == b"\0\1\2\xff\xfe"
    answer = raw(routes.port, get("/big?n=5000000", "Connection: close\r\n"), wait=5)
    assert body_of(answer) == b"x" * 5_000_000


def test_pipelined_requests_to_sleeping_routes_are_answered_in_order(routes):
    requests = get("/slow?s=0.3&n=1") + get("/slow?s=0.01&n=2") + get("/slow?s=0.1&n=3")
    answer = raw(routes.port, requests, wait=2)
    assert [int(n) for n in __import__("re").findall(rb"slow (\d)", answer)] == [1, 2, 3]


def test_a_chunked_body_over_the_limit_is_413_and_a_slow_body_is_cut_off(routes):
    with socket.create_connection(("127.0.0.1", routes.port), timeout=5) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(4):
            s.sendall(b"200\r\n" + b"y" * 0x200 + b"\r\n")
        s.sendall(b"0\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 413 ")
    # slowloris: a byte of body every 0.3 s; --handshake-timeout (1 s) ends it
    with socket.create_connection(("127.0.0.1", routes.port), timeout=5) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n\r\n")
        started, closed = time.time(), False
        for _ in range(20):
            try:
                s.sendall(b"z")
            except OSError:
                closed = True
                break
            time.sleep(0.3)
            s.settimeout(0.01)
            try:
                if s.recv(100) == b"":
                    closed = True
                    break
            except socket.timeout:
                pass
        assert closed and time.time() - started < 3


@pytest.mark.parametrize("code", [204, 304])
def test_a_bodyless_status_sends_no_body(routes, code):
    answer = raw(routes.port, get(f"/nobody?c={code}") + get("/header?v=next"), wait=1.5)
    assert b"this must not be sent" not in answer
    assert b"\r\n\r\nHTTP/1.1 200 OK" in answer


def test_a_route_header_with_a_control_character_answers_500(routes):
    answer = raw(routes.port, get("/control", "Connection: close\r\n"))
    assert answer.startswith(b"HTTP/1.1 500 ")


def test_a_non_utf8_route_header_is_sent_as_is_or_refused(routes):
    answer = raw(routes.port, get("/latin1", "Connection: close\r\n"))
    assert b"X-L: caf\xe9\r\n" in answer or answer.startswith(b"HTTP/1.1 500 ")


# ============================================================================ remote_addr

ADDR = 'return { routes = { ["GET /addr"] = function(req) return 200, nil, tostring(req.remote_addr) end } }\n'

FORWARDED = [
    ("203.0.113.9", "203.0.113.9"),
    ("203.0.113.9, 10.1.2.3", "203.0.113.9"),  # the trusted proxy's own entry is skipped
    ("garbage", "127.0.0.1"),
    ("203.0.113.9, garbage", "127.0.0.1"),  # nothing left of garbage is believed
    ("garbage, 203.0.113.9", "203.0.113.9"),
    ("2001:db8::1", "2001:db8::1"),
    ("[2001:db8::1]:443", "2001:db8::1"),
    ("203.0.113.9:5555", "203.0.113.9"),
    ("::ffff:203.0.113.9", "203.0.113.9"),
    ("10.0.0.1, 10.0.0.2", "10.0.0.1"),  # all trusted: the leftmost
    ("", "127.0.0.1"),
    (",,,", "127.0.0.1"),
    ("999.1.1.1", "127.0.0.1"),
    ("1.2.3", "127.0.0.1"),
    ("01.02.03.04", "127.0.0.1"),
    ("fe80::1%evil<script>", "127.0.0.1"),
    (", ".join(["10.0.0.1"] * 2000), "10.0.0.1"),
]


def test_forged_forwarded_for_with_and_without_trusted_proxies(tmp_path, start_server):
    scripts = write(tmp_path / "s", {"a.lua": ADDR})
    trusting = start_server("--scripts", str(scripts), "--trust-proxy", "127.0.0.1", "--trust-proxy", "10.0.0.0/8")
    plain = start_server("--scripts", str(scripts))
    for header, expected in FORWARDED:
        request = get("/addr", f"X-Forwarded-For: {header}\r\nConnection: close\r\n")
        assert body_of(raw(trusting.port, request)) == expected.encode(), header[:40]
        assert body_of(raw(plain.port, request)) == b"127.0.0.1", header[:40]
    two = get("/addr", "X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-For: 198.51.100.2\r\nConnection: close\r\n")
    assert body_of(raw(trusting.port, two)) == b"198.51.100.2"  # the last header is the nearest


# ============================================================================ shared store

def test_store_ttl_edges_and_wrong_types_in_process(tmp_path, start_server):
    server = start_server("--scripts", str(write(tmp_path / "s", {"e.lua": EVAL})))
    replies = run(evaluate(server.url,
        'return luaws.shared:set("t", "v", 0)',
        'return luaws.shared:set("t", "v", -1)',
        'return luaws.shared:set("t", "v", 0/0)',
        'return luaws.shared:set("t", "v", 1e10)',
        'return luaws.shared:expire("t", 0)',
        'return luaws.shared:cas("t", nil, nil)',
        'return luaws.shared:set("t", "v", 1e9), luaws.shared:get("t")',
        'return luaws.shared:sadd("set", "m"), luaws.shared:get("set")',
        'return luaws.shared:incr("set")',
        'luaws.shared:set("word", "abc") return luaws.shared:incr("word")',
        'luaws.shared:set("nan", "nan") return luaws.shared:incr("nan")',
    ))
    for reply in replies[:6]:
        assert reply.startswith("false "), reply
    assert replies[6] == "true true v"
    assert replies[7].startswith("true true nil WRONGTYPE")
    assert replies[8].startswith("true nil ")  # in-process "ERR value is not a number", Redis WRONGTYPE
    assert replies[9] == "true nil ERR value is not a number"
    assert replies[10] == "true nil ERR value is not a number"


def test_store_keys_with_glob_characters_over_redis(tmp_path, start_server, redis):
    server = start_server("--scripts", str(write(tmp_path / "s", {"e.lua": EVAL})), "--cluster", "--redis", redis.url)
    setup = 'for _, k in ipairs({"x*1", "xy1", "x?", "xa", "x[a]", "xb]", "x\\\\", "x\\\\y"}) do luaws.shared:set(k, "v") end return 1'
    def keys(prefix):
        return f'local k = luaws.shared:keys({prefix!r}) table.sort(k) return k'
    replies = run(evaluate(server.url, setup, keys("x*"), keys("x?"), keys("x["), keys("x\\"), keys("x"), keys("")))
    assert replies[1] == "true {x*1}"
    assert replies[2] == "true {x?}"
    assert replies[3] == "true {x[a]}"
    assert replies[4] == "true {x\\,x\\y}"
    assert replies[5] == "true {x*1,x?,x[a],x\\,x\\y,xa,xb],xy1}"
    assert replies[6] == replies[5]


@pytest.mark.parametrize("mode", ["in-process", "redis"])
def test_store_keys_and_values_must_be_utf8_text(tmp_path, start_server, redis, mode):
    # Chosen contract: keys and values are UTF-8 text, refused otherwise (at the caller's
    # line), the same in-process and over Redis; bytes go in encoded (hex, base64).
    extra = ["--cluster", "--redis", redis.url] if mode == "redis" else []
    server = start_server("--scripts", str(write(tmp_path / "s", {"e.lua": EVAL})), *extra)
    replies = run(evaluate(server.url,
        'luaws.shared:set("a\\255", "first") luaws.shared:set("a\\254", "second") return luaws.shared:get("a\\255")',
        'luaws.shared:set("bin", "\\255\\0\\1") return luaws.shared:get("bin") == "\\255\\0\\1"',
    ))
    assert replies[0].startswith("false") and "key must be valid UTF-8" in replies[0], replies
    assert replies[1].startswith("false") and "values must be valid UTF-8" in replies[1], replies


def test_in_process_store_keys_are_compared_as_bytes(tmp_path, start_server):
    server = start_server("--scripts", str(write(tmp_path / "s", {"e.lua": EVAL})))
    replies = run(evaluate(server.url,
        'luaws.shared:set("caf\\u{e9}", "nfc") return luaws.shared:get("cafe\\u{301}")',
        'return luaws.shared:sadd("s", "\\u{e9}"), luaws.shared:sadd("s", "e\\u{301}")',
        'luaws.shared:set("cafe\\u{301}x", "v") return #luaws.shared:keys("cafe")',
    ))
    assert replies == ["true nil", "true true true", "true 1"]


def test_in_process_incr_matches_redis_for_big_integers(tmp_path, start_server):
    server = start_server("--scripts", str(write(tmp_path / "s", {"e.lua": EVAL})))
    replies = run(evaluate(server.url,
        'luaws.shared:set("a", "9007199254740993") return luaws.shared:incr("a")',
        'luaws.shared:set("b", "9007000000000001") luaws.shared:incr("b") return luaws.shared:get("b")',
        'luaws.shared:set("c", math.maxinteger) return luaws.shared:incr("c")',
        'luaws.shared:set("d", "0x10") return luaws.shared:incr("d")',
    ))
    assert replies[0] == "true 9007199254740994"
    assert replies[1] == "true 9007000000000002"
    assert replies[2].startswith("true nil ")
    assert replies[3].startswith("true nil ")


def test_in_process_sadd_does_not_slow_down_with_the_set_size(tmp_path, start_server):
    server = start_server("--scripts", str(write(tmp_path / "s", {"e.lua": EVAL})), "--instruction-budget", "0")
    fill = 'for i = 1, 8000 do luaws.shared:sadd("big", "member-" .. i) end return 1'
    timed = ('local t = os.clock() for i = 1, 1000 do luaws.shared:sadd("{k}", "other-" .. i) end '
             'return os.clock() - t')
    replies = run(evaluate(server.url, timed.format(k="small"), fill, timed.format(k="big")), 120)
    small, big = float(replies[0].split()[1]), float(replies[2].split()[1])
    assert big < 4 * small + 0.05, (small, big)


# ============================================================================ across processes

def test_publish_memory_is_bounded_while_redis_stalls(tmp_path, start_server, redis):
    server = start_server("--scripts", str(write(tmp_path / "s", {"e.lua": EVAL})), "--threads", "1", "--cluster", "--redis", redis.url)

    async def go():
        async with websockets.connect(server.url, max_size=None, compression=None) as ws:
            await ws.send('BIG = string.rep("p", 200000) return CONN:subscribe("flood")')
            assert await ws.recv() == "true true"
            before = rss_kb(server.proc.pid)
            os.kill(redis.proc.pid, signal.SIGSTOP)
            try:
                for _ in range(40):
                    await ws.send('for i = 1, 50 do luaws.publish("other", BIG) end return 1')
                    assert await asyncio.wait_for(ws.recv(), 10) == "true 1"
                grown_mb = (rss_kb(server.proc.pid) - before) // 1024
            finally:
                os.kill(redis.proc.pid, signal.SIGCONT)
            assert grown_mb < 200, f"RSS grew by {grown_mb} MB"
    run(go())


def test_thousands_of_subscriptions_are_bounded_and_released(tmp_path, start_server, redis):
    server = start_server("--scripts", str(write(tmp_path / "s", {"e.lua": EVAL})), "--threads", "1", "--cluster", "--redis", redis.url)

    async def go():
        async with websockets.connect(server.url) as ws:
            await ws.send('local bad, err = 0 for i = 1, 10500 do local ok, e = CONN:subscribe("ch" .. i) '
                          'if not ok then bad = bad + 1 err = e end end return bad, err')
            reply = await asyncio.wait_for(ws.recv(), 60)
            assert reply.startswith("true 501 ") and "10000 subscriptions" in reply  # the broadcast channel is one
            assert b":1\r\n" in redis_call(redis.port, "PUBSUB", "NUMSUB", "luaws:c:ch1")
        await asyncio.sleep(1)
        assert redis_call(redis.port, "PUBSUB", "NUMSUB", "luaws:c:ch1", "luaws:c:ch9000").count(b":0\r\n") == 2
        async with websockets.connect(server.url) as ws:  # the process still serves
            await ws.send("return 1")
            assert await ws.recv() == "true 1"
    run(go(), 120)


def test_a_subscription_refused_at_capacity_is_made_once_there_is_room(tmp_path, start_server, redis):
    server = start_server("--scripts", str(write(tmp_path / "s", {"e.lua": EVAL})), "--threads", "1", "--cluster", "--redis", redis.url)

    async def go():
        filler = await websockets.connect(server.url)
        early = await websockets.connect(server.url)
        await filler.send('for i = 1, 9999 do CONN:subscribe("fill" .. i) end return 1')
        assert await asyncio.wait_for(filler.recv(), 60) == "true 1"
        await early.send('return CONN:subscribe("x")')
        assert "10000 subscriptions" in await early.recv()
        await filler.close()
        await asyncio.sleep(1)
        async with websockets.connect(server.url) as late:
            # control: a channel never refused hears another process's message, sent as
            # RedisBus sends it ("<origin> <seq> <text>")
            await late.send('return CONN:subscribe("y")')
            assert await late.recv() == "true true"
            redis_call(redis.port, "PUBLISH", "luaws:c:y", "otherprocess 1 on y")
            assert await asyncio.wait_for(late.recv(), 3) == "on y"
            await late.send('return CONN:subscribe("x")')
            assert await late.recv() == "true true"
            redis_call(redis.port, "PUBLISH", "luaws:c:x", "otherprocess 2 on x")
            try:
                got = await asyncio.wait_for(late.recv(), 3)
            except asyncio.TimeoutError:
                got = None
            assert got == "on x", "subscribe said true, but the channel is not subscribed on Redis"
        await early.close()
    run(go(), 120)


def test_reuse_port_three_processes_share_connections_and_channels(tmp_path, start_server, redis):
    scripts = write(tmp_path / "s", {"e.lua": EVAL})
    first = start_server("--scripts", str(scripts), "--reuse-port", "--cluster", "--redis", redis.url, "--threads", "1", "--var", "proc=0")
    others = []
    try:
        for n in (1, 2):
            proc = subprocess.Popen([str(BINARY), "--host", "127.0.0.1", "--port", str(first.port), "--scripts", str(scripts),
                                     "--reuse-port", "--cluster", "--redis", redis.url, "--threads", "1", "--var", f"proc={n}"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            others.append(proc)
            assert f":{first.port}" in proc.stdout.readline()

        async def go():
            conns = [await websockets.connect(first.url) for _ in range(30)]
            procs = set()
            for ws in conns:
                await ws.send('return CONN:subscribe("room"), luaws.var("proc", "?")')
                reply = await ws.recv()
                assert reply.startswith("true true ")
                procs.add(reply.split()[2])
            # every connection hears one publish from one of them, once
            await conns[0].send('return luaws.publish("room", "hi all")')
            got = []
            for ws in conns:
                message = await asyncio.wait_for(ws.recv(), 5)
                if message == "true true":  # the publisher's own reply may come first or second
                    message = await asyncio.wait_for(ws.recv(), 5)
                got.append(message)
            assert got == ["hi all"] * 30
            for ws in conns:
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(ws.recv(), 0.05)
                await ws.close()
            return procs
        assert len(run(go())) >= 2  # the kernel spread the 30 connections
        served = status_page(first)
        assert served["connections"] == 0
        for proc in others:
            assert proc.poll() is None
    finally:
        for proc in others:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
