"""Handshake rules and resource limits under hostile or broken clients."""
import asyncio
import socket
import time
from pathlib import Path

import pytest
import websockets

from rawws import RawClient
from conftest import run


def status_line(port, request):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request.encode())
        return s.recv(65536).split(b"\r\n", 1)[0].decode()


UPGRADE = ("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")


def test_origin_allow_list(start_server):
    server = start_server("--scripts", "scripts", "--allow-origin", "https://good.example")
    assert status_line(server.port, UPGRADE + "Origin: https://evil.example\r\n\r\n") == "HTTP/1.1 403 Forbidden"
    assert status_line(server.port, UPGRADE + "Origin: https://good.example\r\n\r\n") == "HTTP/1.1 101 Switching Protocols"
    assert status_line(server.port, UPGRADE + "\r\n") == "HTTP/1.1 101 Switching Protocols"  # not a browser


def test_wrong_method_is_refused(server):
    assert status_line(server.port, UPGRADE.replace("GET", "POST", 1) + "Content-Length: 0\r\n\r\n").startswith("HTTP/1.1 405")


def test_max_connections(start_server):
    server = start_server("--scripts", "scripts", "--max-connections", "3")
    clients = [RawClient(server.port) for _ in range(3)]
    assert status_line(server.port, UPGRADE + "\r\n") == "HTTP/1.1 503 Service Unavailable"
    clients[0].send_frame(0x8, b"\x03\xe8")
    assert clients[0].recv_close() == 1000 and clients[0].at_eof()
    time.sleep(0.2)
    assert status_line(server.port, UPGRADE + "\r\n") == "HTTP/1.1 101 Switching Protocols"
    for c in clients:
        c.close()


def test_subprotocol_negotiation(tmp_path, start_server):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "p.lua").write_text('return { protocols = {"chat.v2", "chat.v1"},\n'
                                   '  on_message = function(conn, msg) conn:send(tostring(conn.protocol)) end }\n')
    server = start_server("--scripts", str(scripts))

    async def go(offer):
        async with websockets.connect(server.url, subprotocols=offer) as ws:
            await ws.send("?")
            return ws.subprotocol, await ws.recv()
    assert run(go(["chat.v1", "chat.v2"])) == ("chat.v1", "chat.v1")
    assert run(go(["chat.v2"])) == ("chat.v2", "chat.v2")
    # Nothing the plugins speak: the server selects none (the client may then give up).
    assert run(go(["other"])) == (None, "nil")


def test_handshake_timeout_closes_silent_connections(start_server):
    server = start_server("--scripts", "scripts", "--handshake-timeout", "0.5")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # never finishes the request
        start = time.monotonic()
        assert s.recv(100) == b""
        assert time.monotonic() - start < 3


def test_keepalive_pings_and_drops_dead_peers(start_server):
    server = start_server("--scripts", "scripts", "--ping-interval", "0.3", "--pong-timeout", "0.3")
    c = RawClient(server.port)
    fin, opcode, payload = c.recv_frame()
    assert opcode == 0x9  # the server pings a silent client
    c.send_frame(0xA, payload)  # answer it: the connection stays
    fin, opcode, payload = c.recv_frame()
    assert opcode == 0x9
    # No answer this time: dropped.
    assert c.at_eof(timeout=3)
    c.close()


def test_idle_timeout(start_server):
    server = start_server("--scripts", "scripts", "--idle-timeout", "0.5")
    c = RawClient(server.port)
    c.send_frame(0x1, b"hi")
    assert c.recv_frame()[2] == b"Message received: hi"
    assert c.recv_close() == 1001


def rss_kb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


FLOOD = '''
return { on_message = function(conn, msg)
  if msg == "flood" then
    local chunk = string.rep("x", 64 * 1024)
    conn.data.t = conn:every(0.001, function(c)
      for i = 1, 16 do
        if not c:send(chunk) then conn.data.t:cancel() return end
      end
    end)
  end
end }
'''


@pytest.mark.parametrize("policy", ["close", "drop"])
def test_slow_consumer_memory_stays_bounded(tmp_path, start_server, policy):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "flood.lua").write_text(FLOOD)
    server = start_server("--scripts", str(scripts), "--max-outbound-bytes", str(1 << 20),
                          "--slow-consumer", policy, "--no-compression")
    before = rss_kb(server.proc.pid)
    c = RawClient(server.port)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.send_frame(0x1, b"flood")
    time.sleep(2.0)  # the plugin tries to send ~1 GB/s; the client reads nothing
    grown = rss_kb(server.proc.pid) - before
    assert grown < 64 * 1024, f"server grew by {grown} KB with a client that does not read"
    if policy == "close":
        assert server.wait_for_log("slow consumer")
        # The server has let the connection go (what the kernel still buffers is not the process's).
        import json, urllib.request
        with urllib.request.urlopen(server.admin + "/luaws/status", timeout=5) as r:
            assert json.loads(r.read())["connections"] == 0
    else:
        assert server.proc.poll() is None
    c.close()
