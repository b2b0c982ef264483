"""Promises the engine keeps under hostile clients (issue 8): bounded memory for pipelined
files and unread pongs, compressed bombs refused early, only real handshake keys, UTF-8
failed as soon as it is invalid, and a quiet shutdown."""
import json
import os
import signal
import socket
import struct
import time
import urllib.request
import zlib
from pathlib import Path

import pytest

from rawws import RawClient

ROOT = Path(__file__).resolve().parents[2]
TEXT, CLOSE, PING, PONG = 0x1, 0x8, 0x9, 0xA


def rss_kb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def no_plugins(tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    return str(scripts)


def status_line(port, request):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request.encode())
        return s.recv(65536).split(b"\r\n", 1)[0].decode()


# 1. Pipelined static files

def read_response(sock, buf):
    """(status line, body) of the next HTTP response; `buf` is a bytearray of bytes read ahead."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    end = buf.index(b"\r\n\r\n")
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    length = int(next(line.split(":", 1)[1] for line in head if line.lower().startswith("content-length:")))
    del buf[:end + 4]
    while len(buf) < length:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    body = bytes(buf[:length])
    del buf[:length]
    return head[0], body


def test_pipelined_static_files_do_not_bloat_memory(tmp_path, start_server):
    public = tmp_path / "public"
    public.mkdir()
    content = os.urandom(4 << 20)
    (public / "big.bin").write_bytes(content)
    server = start_server("--scripts", no_plugins(tmp_path), "--public", str(public))
    before = rss_kb(server.proc.pid)
    count = 200  # 800 MiB of responses if the server answered them all at once

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n" * count)
    peak = before
    deadline = time.monotonic() + 2.0  # the client reads nothing for 2 s
    while time.monotonic() < deadline:
        peak = max(peak, rss_kb(server.proc.pid))
        time.sleep(0.05)
    grown = peak - before
    assert grown < 200 * 1024, f"server grew by {grown} KB for one connection that does not read"

    # Then it reads: every response comes, in order, whole.
    buf = bytearray()
    start = time.monotonic()
    for i in range(count):
        status, body = read_response(sock, buf)
        assert status == "HTTP/1.1 200 OK", (i, status)
        assert len(body) == len(content), i
        if i < 3 or i == count - 1:
            assert body == content, i
        assert time.monotonic() - start < 15, f"only {i} responses in 15 s"
    sock.close()


# 2. Pongs count toward the slow-consumer bound

PING_125 = bytes([0x80 | PING, 0x80 | 125]) + b"\0\0\0\0" + b"p" * 125  # mask key 0: payload as is


def flood_pings(client, seconds, limit_bytes):
    """Sends pings without reading anything back, until the server closes or time/bytes run out.
    True if the server closed the connection."""
    batch = PING_125 * 1000
    sent = 0
    client.sock.settimeout(0.5)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and sent < limit_bytes:
        try:
            client.sock.sendall(batch)
            sent += len(batch)
        except (socket.timeout, TimeoutError):
            continue  # the server reads slower than we write: keep going
        except (BrokenPipeError, ConnectionResetError):
            return True
    return False


@pytest.mark.parametrize("policy", ["close", "drop"])
def test_pongs_count_toward_the_slow_consumer_bound(tmp_path, start_server, policy):
    server = start_server("--scripts", no_plugins(tmp_path), "--max-outbound-bytes", "65536",
                          "--slow-consumer", policy)
    before = rss_kb(server.proc.pid)
    c = RawClient(server.port, rcvbuf=4096)
    closed = flood_pings(c, seconds=4, limit_bytes=48 << 20)
    grown = rss_kb(server.proc.pid) - before
    assert grown < 24 * 1024, f"server grew by {grown} KB answering pings nobody reads"
    if policy == "close":
        assert closed or c.at_eof(timeout=3), "a client that never reads its pongs must be cut off"
        assert server.wait_for_log("slow consumer")
    else:
        # Its pongs are dropped, not queued; the connection itself stays.
        assert not closed
        assert server.proc.poll() is None
    c.close()


def test_keepalive_ping_is_bounded_for_a_client_that_never_reads(tmp_path, start_server):
    # A silent client that does not read: pinged at most once, then dropped after the pong timeout.
    server = start_server("--scripts", no_plugins(tmp_path), "--ping-interval", "0.2",
                          "--pong-timeout", "0.3", "--max-outbound-bytes", "65536")
    c = RawClient(server.port, rcvbuf=4096)
    assert c.at_eof(timeout=3)
    c.close()


def open_connections(server):
    with urllib.request.urlopen(server.admin + "/luaws/status", timeout=5) as r:
        return json.loads(r.read())["connections"]


def test_failing_a_client_that_does_not_read_closes_it_at_once(tmp_path, start_server):
    # Its close frame would wait behind the bytes it does not read: the TCP connection goes anyway.
    server = start_server("--scripts", no_plugins(tmp_path), "--max-outbound-bytes", "65536",
                          "--slow-consumer", "drop")
    c = RawClient(server.port, rcvbuf=4096)
    assert not flood_pings(c, seconds=1, limit_bytes=8 << 20)  # its queue is now over the bound
    assert open_connections(server) == 1
    c.sock.settimeout(5)
    c.send_frame(TEXT, b"\xff")  # invalid UTF-8: the server fails the connection
    deadline = time.monotonic() + 3  # less than the close timeout (5 s)
    while open_connections(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_connections(server) == 0, "the server still holds a connection it failed"
    c.close()


# 3. Compressed bombs

def deflate(data):
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\0\0\xff\xff")
    return out[:-4]


def test_compressed_bomb_fails_with_1009_quickly(tmp_path, start_server):
    server = start_server("--scripts", no_plugins(tmp_path))
    c = RawClient(server.port, extensions="permessage-deflate")
    assert "permessage-deflate" in c.response_head
    bomb = deflate(b"a" * (8 << 20))  # ~8 KB that inflates to 8 MiB, under --max-message-size
    start = time.monotonic()
    c.send_frame(TEXT, bomb, rsv=4)
    assert c.recv_close() == 1009
    assert time.monotonic() - start < 2
    assert c.at_eof()
    c.close()


def test_compressed_ratio_limit_lets_ordinary_messages_through_and_can_be_switched_off(tmp_path, start_server):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "size.lua").write_text("return { on_message = function(conn, msg) conn:send(tostring(#msg)) end }\n")
    for args, message in [((), b"The quick brown fox jumps over the lazy dog. " * 5000),  # 312:1, under the floor
                          ((), os.urandom(300_000).hex().encode()),  # 2:1
                          (("--max-compressed-ratio", "0"), b"a" * (8 << 20))]:  # 1000:1, no limit
        server = start_server("--scripts", str(scripts), *args)
        c = RawClient(server.port, extensions="permessage-deflate")
        c.send_frame(TEXT, deflate(message), rsv=4)
        fin, opcode, payload = c.recv_frame()
        assert opcode == TEXT and payload == str(len(message)).encode(), (args, payload)
        c.close()
        server.stop()


# 4. Sec-WebSocket-Key

def upgrade(key):
    return ("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")


def test_handshake_key_must_be_a_base64_16_byte_nonce(tmp_path, start_server):
    server = start_server("--scripts", no_plugins(tmp_path))
    for key in ["short", "AAAAAAAAAAAAAAAAAAAAAAAA", "AAAAAAAAAAAAAAAAAAAAAA", "AAAAAAAAAAAAAAAAAAAA!A==",
                "AAAAAAAAAAAAAAAAAAAAAAA=", "dGhlIHNhbXBsZSBub25jZQ==x"]:
        assert status_line(server.port, upgrade(key)) == "HTTP/1.1 400 Bad Request", key
    for key in ["dGhlIHNhbXBsZSBub25jZQ==", "AAAAAAAAAAAAAAAAAAAAAA==", "/////////////////////w=="]:
        assert status_line(server.port, upgrade(key)) == "HTTP/1.1 101 Switching Protocols", key


# 5. UTF-8 failed as soon as it is invalid

def test_invalid_utf8_fails_before_the_frame_ends(tmp_path, start_server):
    server = start_server("--scripts", no_plugins(tmp_path))
    c = RawClient(server.port)
    # A text frame that declares 1000 bytes; the first 10 are sent, and are not UTF-8.
    c.sock.sendall(bytes([0x80 | TEXT, 0x80 | 126]) + struct.pack("!H", 1000) + b"\0\0\0\0" + b"hello\xc0\xafwor")
    c.sock.settimeout(2)
    assert c.recv_close() == 1007
    c.close()


def test_code_point_split_across_reads_is_not_a_failure(tmp_path, start_server):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "echo.lua").write_text("return { on_message = function(conn, msg) conn:send(msg) end }\n")
    server = start_server("--scripts", str(scripts))
    c = RawClient(server.port)
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    text = "snow ☃ and 🎉".encode()
    c.sock.sendall(bytes([0x80 | TEXT, 0x80 | len(text)]) + b"\0\0\0\0")
    for i in range(len(text)):  # one byte per read: every code point is cut
        c.sock.sendall(text[i:i + 1])
        time.sleep(0.005)
    assert c.recv_frame() == (True, TEXT, text)
    c.close()


# 7. A quiet shutdown

def test_shutdown_after_traffic_prints_no_errors(start_server):
    rounds = 20
    started = time.monotonic()
    for i in range(rounds):
        server = start_server("--scripts", str(ROOT / "scripts"), "--public", str(ROOT / "public"))
        with urllib.request.urlopen(server.http + "/", timeout=5) as r:
            assert r.status == 200
        c = RawClient(server.port)
        c.send_frame(TEXT, b"hi")
        assert c.recv_frame()[2] == b"Message received: hi"
        server.proc.send_signal(signal.SIGTERM)
        assert c.recv_close() == 1001
        c.send_frame(CLOSE, b"\x03\xe9")
        assert server.proc.wait(timeout=10) == 0
        c.close()
        time.sleep(0.1)  # the fixture's reader thread takes what is left in the pipe
        assert "ERROR" not in server.stderr and "Cannot schedule" not in server.stderr, (i, server.stderr)
        assert time.monotonic() - started < 60
