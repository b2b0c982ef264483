"""RFC 6455 behaviour, with raw bytes over TCP: the exact reply or close code."""
import struct

import pytest

from rawws import RawClient

TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


@pytest.fixture
def raw(server):
    clients = []

    def connect():
        c = RawClient(server.port)
        clients.append(c)
        return c
    yield connect
    for c in clients:
        c.close()


def test_text_frame_is_echoed(raw):
    c = raw()
    c.send_frame(TEXT, b"hi")
    assert c.recv_frame() == (True, TEXT, b"Message received: hi")


def test_fragmented_message_with_ping_in_between(raw):
    c = raw()
    c.send_frame(TEXT, "frag".encode(), fin=False)
    c.send_frame(PING, b"are you there")
    c.send_frame(CONT, " ✓".encode(), fin=False)
    c.send_frame(CONT, b" end", fin=True)
    assert c.recv_frame() == (True, PONG, b"are you there")
    assert c.recv_frame() == (True, TEXT, "Message received: frag ✓ end".encode())


def test_utf8_split_across_fragments_is_valid(raw):
    c = raw()
    snowman = "☃".encode()
    c.send_frame(TEXT, snowman[:1], fin=False)
    c.send_frame(CONT, snowman[1:], fin=True)
    assert c.recv_frame() == (True, TEXT, "Message received: ☃".encode())


@pytest.mark.parametrize("name,frames,code", [
    ("unmasked frame", [dict(opcode=TEXT, payload=b"x", mask=False)], 1002),
    ("reserved bit", [dict(opcode=TEXT, payload=b"x", rsv=0b100)], 1002),
    ("unknown opcode", [dict(opcode=0x3, payload=b"")], 1002),
    ("continuation without start", [dict(opcode=CONT, payload=b"x")], 1002),
    ("new message inside a fragmented one", [dict(opcode=TEXT, payload=b"a", fin=False), dict(opcode=TEXT, payload=b"b")], 1002),
    ("fragmented ping", [dict(opcode=PING, payload=b"", fin=False)], 1002),
    ("ping over 125 bytes", [dict(opcode=PING, payload=b"x" * 126)], 1002),
    ("invalid UTF-8", [dict(opcode=TEXT, payload=b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited")], 1007),
    ("invalid UTF-8 in the first fragment fails fast",
     [dict(opcode=TEXT, payload=b"\xff", fin=False)], 1007),
    ("close with 1-byte payload", [dict(opcode=CLOSE, payload=b"\x03")], 1002),
    ("close with invalid code", [dict(opcode=CLOSE, payload=struct.pack("!H", 1005))], 1002),
    ("close with invalid UTF-8 reason", [dict(opcode=CLOSE, payload=struct.pack("!H", 1000) + b"\xff")], 1007),
])
def test_bad_input_fails_the_connection_with_the_right_code(raw, name, frames, code):
    c = raw()
    for f in frames:
        c.send_frame(**f)
    assert c.recv_close() == code, name
    assert c.at_eof(), "the server closes the TCP connection after failing it"


def test_message_too_large_is_1009(start_server):
    server = start_server("--scripts", "scripts", "--max-message-size", "1000")
    c = RawClient(server.port)
    c.send_frame(TEXT, b"x" * 600, fin=False)
    c.send_frame(CONT, b"x" * 600)
    assert c.recv_close() == 1009
    c.close()


def test_close_handshake_echoes_the_code_and_closes_tcp(raw, server):
    c = raw()
    c.send_frame(CLOSE, struct.pack("!H", 1000) + b"bye")
    assert c.recv_close() == 1000
    assert c.at_eof()


def test_close_without_code_is_answered_without_code(raw):
    c = raw()
    c.send_frame(CLOSE, b"")
    assert c.recv_close() is None
    assert c.at_eof()


def test_client_that_vanishes_is_cleaned_up(server):
    # Open and drop many connections mid-message; the server keeps serving.
    for _ in range(20):
        c = RawClient(server.port)
        c.send_frame(TEXT, b"half", fin=False)
        c.close()
    c = RawClient(server.port)
    c.send_frame(TEXT, b"ok")
    assert c.recv_frame() == (True, TEXT, b"Message received: ok")
    c.close()


def test_idle_push_does_not_disturb_a_half_received_message(server):
    # The push (every 0.5 s) fires while a fragmented message is incomplete; the message
    # still arrives whole and in order.
    import time
    c = RawClient(server.port)
    c.send_frame(TEXT, b"first half, ", fin=False)
    time.sleep(0.8)
    c.send_frame(CONT, b"second half", fin=True)
    frames = []
    while True:
        fin, opcode, payload = c.recv_frame()
        frames.append(payload.decode())
        if payload.startswith(b"Message received"):
            break
    assert frames[-1] == "Message received: first half, second half"
    assert all(f.startswith("It is: ") for f in frames[:-1]) and len(frames) >= 2
    c.close()
