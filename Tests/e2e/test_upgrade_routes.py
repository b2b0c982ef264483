"""The handshake hook (on_upgrade), plugin HTTP routes, plugins per path, and the client's
address — against the real binary, with real clients and a real HTTP backend."""
import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import websockets
from conftest import run, write

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def backend():
    """An auth service on loopback: GET /check?token=T answers 200 for "good", 403 otherwise."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path == "/check?token=good"
            body = json.dumps({"user": "ann"} if ok else {"error": "no"}).encode()
            self.send_response(200 if ok else 403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


AUTH = """
return {
  on_upgrade = function(req)
    local res, err = luaws.http.request{ url = luaws.var("auth") .. "/check?token=" .. (req.query.token or "") }
    if not res then return 503, "auth service unavailable" end
    if res.status ~= 200 then return 401, "bad token" end
    req.data.user = luaws.json.decode(res.body).user
    req.data.addr = req.remote_addr
  end,
  on_open = function(conn) conn:send("hello " .. conn.data.user .. " from " .. tostring(conn.remote_addr)) end,
}
"""


def http_status(url, data=None, headers=None, method=None):
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def test_on_upgrade_checks_a_token_with_a_backend(tmp_path, start_server, backend):
    scripts = write(tmp_path / "s", {"auth.lua": AUTH})
    server = start_server("--scripts", str(scripts), "--var", f"auth={backend}", "--max-connections", "1")

    async def go():
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(server.url + "?token=bad")
        assert refused.value.response.status_code == 401
        assert b"bad token" in refused.value.response.body
        async with websockets.connect(server.url + "?token=good") as ws:
            assert await ws.recv() == "hello ann from 127.0.0.1"
            # the refusal above took no connection slot; this one has the only one
            with pytest.raises(websockets.InvalidStatus) as full:
                await websockets.connect(server.url + "?token=good")
            assert full.value.response.status_code == 503
    run(go())


def test_a_failing_on_upgrade_refuses_with_500(tmp_path, start_server):
    scripts = write(tmp_path / "s", {"a.lua": "return { on_upgrade = function(req) error('secret detail') end }\n"})
    server = start_server("--scripts", str(scripts))

    async def go():
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(server.url)
        assert refused.value.response.status_code == 500
        assert b"secret" not in refused.value.response.body
    run(go())
    assert server.wait_for_log(r"a\.lua:1: secret detail")


def test_remote_addr_with_and_without_trusted_proxies(tmp_path, start_server):
    scripts = write(tmp_path / "s", {"a.lua": "return { on_open = function(conn) conn:send(tostring(conn.remote_addr)) end }\n"})
    forwarded = {"X-Forwarded-For": "203.0.113.9, 198.51.100.7"}

    async def addr(server):
        async with websockets.connect(server.url, additional_headers=forwarded) as ws:
            return await ws.recv()
    plain = start_server("--scripts", str(scripts))
    assert run(addr(plain)) == "127.0.0.1"  # a client's own header is not believed
    proxied = start_server("--scripts", str(scripts), "--trust-proxy", "127.0.0.1", "--trust-proxy", "198.51.100.0/24")
    assert run(addr(proxied)) == "203.0.113.9"  # rightmost entry that is not a trusted proxy


PUBLISH_API = """
return {
  routes = {
    ["POST /api/publish"] = function(req)
      if req.headers["authorization"] ~= "Bearer " .. luaws.var("api_key", "") then return 401, nil, "unauthorized" end
      local ok, msg = pcall(luaws.json.decode, req.body)
      if not ok or type(msg) ~= "table" or type(msg.channel) ~= "string" then return 400, nil, "expected {channel, data}" end
      luaws.publish(msg.channel, luaws.json.encode(msg.data))
      return 202, { ["content-type"] = "application/json" }, '{"ok":true}'
    end,
    ["GET /api/slow"] = function(req) luaws.sleep(0.05) return 200, nil, "waited " .. (req.query.n or "") end,
    ["GET /api/broken"] = function(req) error("token=abc123 leaked?") end,
  },
  on_open = function(conn) conn:subscribe("news") conn:send("subscribed") end,
}
"""


def test_routes_answer_publish_wait_refuse_and_fail_cleanly(tmp_path, start_server):
    scripts = write(tmp_path / "s", {"api.lua": PUBLISH_API})
    var_file = tmp_path / "secrets.env"
    var_file.write_text("# the backend's key\napi_key=k3y\n")
    server = start_server("--scripts", str(scripts), "--var-file", str(var_file), "--max-body-size", "1000")

    async def go():
        async with websockets.connect(server.url) as ws:
            assert await ws.recv() == "subscribed"
            body = json.dumps({"channel": "news", "data": {"n": 1}}).encode()
            status, answer, headers = await asyncio.to_thread(
                http_status, server.http + "/api/publish", body, {"Authorization": "Bearer k3y", "Content-Type": "application/json"})
            assert status == 202 and answer == b'{"ok":true}' and headers["Content-Type"] == "application/json"
            assert json.loads(await ws.recv()) == {"n": 1}
            status, _, _ = await asyncio.to_thread(http_status, server.http + "/api/publish", body, {"Authorization": "Bearer nope"})
            assert status == 401
            status, _, _ = await asyncio.to_thread(http_status, server.http + "/api/publish", b"x" * 5000, {"Authorization": "Bearer k3y"})
            assert status == 413
    run(go())
    assert http_status(server.http + "/api/slow?n=3")[:2] == (200, b"waited 3")
    status, body, _ = http_status(server.http + "/api/broken")
    assert status == 500 and b"abc123" not in body
    assert http_status(server.http + "/api/nothing")[0] == 404
    assert http_status(server.http + "/api/slow", b"", method="POST")[0] == 405  # no such route: not a file either


def test_a_route_on_a_websocket_path_is_a_load_error(tmp_path):
    import subprocess
    from conftest import BINARY
    scripts = write(tmp_path / "s", {"a.lua": 'return { routes = { ["GET /ws"] = function() return 200 end } }\n'})
    out = subprocess.run([str(BINARY), "--port", "0", "--scripts", str(scripts)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "route GET /ws collides with a path the server serves itself" in out.stderr


def test_plugins_see_only_their_paths(tmp_path, start_server):
    scripts = write(tmp_path / "s", {
        "chat.lua": 'return { paths = { "/chat" }, on_message = function(conn, msg) conn:send("chat: " .. msg) end }\n',
        "echo.lua": (ROOT / "scripts" / "echo.lua").read_text().replace("return {", 'return { paths = { "/ws" },'),
    })
    server = start_server("--scripts", str(scripts), "--ws-path", "/ws", "--ws-path", "/chat")

    async def go():
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/chat") as chat, websockets.connect(server.url) as ws:
            await chat.send("hi")
            await ws.send("hi")
            assert await chat.recv() == "chat: hi"
            assert await ws.recv() == "Message received: hi"
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(chat.recv(), 0.3)  # no echo on /chat
    run(go())


def test_the_shipped_auth_and_publish_api_examples(tmp_path, start_server, backend):
    secrets = tmp_path / "secrets.env"
    secrets.write_text("api_key=s3cr3t\n")
    examples = ROOT / "scripts" / "examples"
    auth = start_server("--scripts", str(examples / "auth.lua"), "--var", f"auth_url={backend}/check")
    api = start_server("--scripts", str(examples / "publish_api.lua"), "--var-file", str(secrets))

    async def go():
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(auth.url + "?token=wrong")
        assert refused.value.response.status_code == 401
        async with websockets.connect(auth.url + "?token=good") as ws:
            assert await ws.recv() == "welcome, ann"
        async with websockets.connect(api.url + "?channel=news") as ws:
            await asyncio.sleep(0.1)
            body = json.dumps({"channel": "news", "data": {"headline": "hi"}}).encode()
            status, _, _ = await asyncio.to_thread(http_status, api.http + "/api/publish", body, {"Authorization": "Bearer s3cr3t"})
            assert status == 202
            assert json.loads(await ws.recv()) == {"headline": "hi"}
    run(go())
    assert "s3cr3t" not in " ".join(api.proc.args)
