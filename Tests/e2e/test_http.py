"""The HTTP side: the page, content types, errors, no escaping the public folder."""
import socket
import urllib.error
import urllib.request


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def raw_get(port, path):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.split(b"\r\n", 1)[0].decode()


def test_index_and_script(server):
    status, headers, body = get(server.http + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'<form id="form">' in body and b"script.js" in body
    status, headers, body = get(server.http + "/script.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert b"new WebSocket" in body


def test_not_found_and_traversal(server):
    assert get(server.http + "/nope.html")[0] == 404
    for path in ["/../Package.swift", "/%2e%2e/Package.swift", "/..%2fPackage.swift", "/%2e%2e%2fscripts/echo.lua"]:
        assert raw_get(server.port, path) == "HTTP/1.1 404 Not Found", path


def test_plain_get_on_ws_path_is_426(server):
    status, headers, _ = get(server.http + "/ws")
    assert status == 426
    assert headers["Sec-WebSocket-Version"] == "13"


def test_bad_handshakes(server):
    def handshake(extra):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" + extra + "\r\n").encode())
            return s.recv(65536).split(b"\r\n", 1)[0].decode()
    assert handshake("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n") == "HTTP/1.1 426 Upgrade Required"
    assert handshake("Sec-WebSocket-Version: 13\r\n") == "HTTP/1.1 400 Bad Request"
    assert handshake("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n") == "HTTP/1.1 101 Switching Protocols"
