"""permessage-deflate (RFC 7692), negotiated with Python's websockets client."""
import asyncio
import zlib

import pytest
import websockets
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

from rawws import RawClient


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


@pytest.mark.parametrize("compression", ["deflate", None])
def test_interop_with_and_without_compression(server, compression):
    big = "The quick brown fox jumps over the lazy dog. " * 5000

    async def go():
        async with websockets.connect(server.url, compression=compression, max_size=None) as ws:
            ext = ws.response.headers.get("Sec-WebSocket-Extensions")
            replies = []
            for m in ["small", "é" * 300, big, ""]:
                await ws.send(m)
                replies.append(await ws.recv())
            await ws.send(b"\x00\x01binary")  # binary: the echo plugin ignores it
            await ws.send("last")
            replies.append(await ws.recv())
            return ext, replies
    ext, replies = run(go())
    if compression:
        assert ext.startswith("permessage-deflate")
        assert "server_no_context_takeover" in ext and "client_no_context_takeover" in ext
    else:
        assert ext is None
    assert replies == [f"Message received: {m}" for m in ["small", "é" * 300, big, "", "last"]]


@pytest.mark.parametrize("params", [
    dict(server_max_window_bits=10),
    dict(client_max_window_bits=9),
    dict(server_no_context_takeover=True, client_no_context_takeover=True),
])
def test_negotiation_parameters(server, params):
    async def go():
        factory = ClientPerMessageDeflateFactory(**params)
        async with websockets.connect(server.url, extensions=[factory], compression=None) as ws:
            await ws.send("x" * 1000)
            return ws.response.headers["Sec-WebSocket-Extensions"], await ws.recv()
    ext, reply = run(go())
    if "server_max_window_bits" in params:
        assert f"server_max_window_bits={params['server_max_window_bits']}" in ext
    assert reply == "Message received: " + "x" * 1000


def test_compression_switched_off(start_server):
    server = start_server("--scripts", "scripts", "--no-compression")

    async def go():
        async with websockets.connect(server.url, compression="deflate") as ws:
            await ws.send("hi")
            return ws.response.headers.get("Sec-WebSocket-Extensions"), await ws.recv()
    assert run(go()) == (None, "Message received: hi")


def test_unacceptable_offer_is_declined(server):
    import socket
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                  b"Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=8, permessage-deflate; bogus=1\r\n\r\n")
        head = s.recv(65536).decode()
    assert head.startswith("HTTP/1.1 101")
    assert "sec-websocket-extensions" not in head.lower()


def test_rsv1_without_negotiation_is_1002(server):
    c = RawClient(server.port)
    body = zlib.compressobj(wbits=-15)
    data = body.compress(b"hello") + body.flush(zlib.Z_SYNC_FLUSH)
    c.send_frame(0x1, data[:-4], rsv=0b100)
    assert c.recv_close() == 1002
    c.close()


def test_corrupt_compressed_data_is_1007(server):
    import socket, base64, os
    from rawws import RawClient as _R
    c = _R.__new__(_R)
    c.sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    c.sock.sendall((f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                    f"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n").encode())
    c.buffer = b""
    assert c._read_until(b"\r\n\r\n").startswith(b"HTTP/1.1 101")
    c.send_frame(0x1, b"\xff\xff\xff\xff garbage", rsv=0b100)
    assert c.recv_close() == 1007
    c.close()


def test_fragmented_compressed_message(server):
    import socket
    from rawws import RawClient as _R
    c = _R.__new__(_R)
    c.sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    c.sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                   b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n")
    c.buffer = b""
    c._read_until(b"\r\n\r\n")
    body = zlib.compressobj(wbits=-15)
    data = (body.compress("é".encode() * 500) + body.flush(zlib.Z_SYNC_FLUSH))[:-4]
    c.send_frame(0x1, data[:3], fin=False, rsv=0b100)
    c.send_frame(0x9, b"ping in between")
    c.send_frame(0x0, data[3:])
    assert c.recv_frame() == (True, 0xA, b"ping in between")
    fin, opcode, payload = c.recv_frame()
    reply = zlib.decompressobj(wbits=-15).decompress(payload + b"\x00\x00\xff\xff") if opcode == 1 else payload
    assert reply.decode() == "Message received: " + "é" * 500
    c.close()
