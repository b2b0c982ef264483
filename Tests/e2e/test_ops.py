"""Running in production: TLS (https and wss on one port, certificates reloaded on SIGHUP, no
plaintext on the wire), /metrics counts, the admin listener, health checks, the access log and
--version. Certificates come from a throwaway CA made with openssl in the test's tmp folder."""
import asyncio
import re
import signal
import socket
import ssl
import struct
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import websockets

from conftest import BINARY, ROOT
from rawws import RawClient
from conftest import run


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


class PKI:
    """A CA and server certificates signed by it (for 127.0.0.1), each with a chosen serial."""

    def __init__(self, folder):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
                "-days", "2", "-subj", "/CN=luaws test CA", cwd=folder)
        (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        self.ca = folder / "ca.pem"

    def pair(self, name, serial):
        """(certificate, key) paths for a new server certificate with `serial` (hex)."""
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", "/CN=127.0.0.1", cwd=self.folder)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-set_serial", f"0x{serial}", "-days", "2", "-extfile", "san.ext", "-out", f"{name}.pem",
                cwd=self.folder)
        return self.folder / f"{name}.pem", self.folder / f"{name}.key"

    def client_context(self):
        context = ssl.create_default_context(cafile=str(self.ca))
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"))


def install(pair, cert, key):
    """Copies a pair over the files the server reads (as a deployment would)."""
    cert.write_bytes(pair[0].read_bytes())
    key.write_bytes(pair[1].read_bytes())


def serial_seen(port, context):
    """The serial (hex, upper case) of the certificate a new TLS connection gets."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.getpeercert()["serialNumber"].upper()


def echo_scripts(tmp_path):
    """Only echo.lua: no idle pushes, so what the server sends is exactly the echoes."""
    folder = tmp_path / "scripts"
    folder.mkdir()
    (folder / "echo.lua").write_text((ROOT / "scripts" / "echo.lua").read_text())
    return folder


@pytest.fixture
def tls_server(tmp_path, pki, start_server):
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    install(pki.pair("first", "1001"), cert, key)
    server = start_server("--scripts", str(echo_scripts(tmp_path)), "--public", str(ROOT / "public"),
                          "--tls-cert", str(cert), "--tls-key", str(key), "--handshake-timeout", "1")
    server.cert, server.key = cert, key
    return server


# MARK: TLS

def test_wss_and_https_on_one_port_verify_against_the_ca(tls_server, pki):
    assert tls_server.url.startswith("wss://") and tls_server.http.startswith("https://")
    context = pki.client_context()
    with urllib.request.urlopen(tls_server.http + "/", context=context, timeout=5) as r:
        assert r.status == 200 and b"<html" in r.read().lower()

    async def go():
        async with websockets.connect(tls_server.url, ssl=context) as ws:
            await ws.send("over tls")
            assert await ws.recv() == "Message received: over tls"
    run(go())
    # A client that does not trust the CA refuses the server.
    with pytest.raises(ssl.SSLError):
        serial_seen(tls_server.port, ssl.create_default_context())


def test_sighup_swaps_the_certificate_for_new_connections_only(tls_server, pki):
    context = pki.client_context()
    assert serial_seen(tls_server.port, context) == "1001"
    second = pki.pair("second", "2002")

    async def go():
        async with websockets.connect(tls_server.url, ssl=context) as ws:
            await ws.send("before")
            assert await ws.recv() == "Message received: before"
            install(second, tls_server.cert, tls_server.key)
            tls_server.proc.send_signal(signal.SIGHUP)
            assert tls_server.wait_for_log(r"TLS: reloaded")
            assert serial_seen(tls_server.port, context) == "2002"
            # The connection made before the swap is still open and served.
            await ws.send("after")
            assert await ws.recv() == "Message received: after"
    run(go())


def test_a_bad_new_pair_is_refused_and_the_old_one_keeps_serving(tls_server, pki, tmp_path):
    context = pki.client_context()
    other = pki.pair("other", "3003")
    # A certificate with somebody else's key.
    tls_server.cert.write_bytes(other[0].read_bytes())
    tls_server.key.write_bytes(pki.pair("stranger", "4004")[1].read_bytes())
    tls_server.proc.send_signal(signal.SIGHUP)
    assert tls_server.wait_for_log(r"TLS: reload refused, the previous certificate keeps serving: --tls-key .* does not match")
    assert serial_seen(tls_server.port, context) == "1001"
    # Garbage in the certificate file: refused too.
    tls_server.cert.write_text("not a certificate\n")
    tls_server.proc.send_signal(signal.SIGHUP)
    assert tls_server.wait_for_log(r"TLS: reload refused.*not a PEM certificate")
    assert serial_seen(tls_server.port, context) == "1001"

    async def go():
        async with websockets.connect(tls_server.url, ssl=context) as ws:
            await ws.send("still")
            assert await ws.recv() == "Message received: still"
    run(go())


class RawTLS:
    """A TLS client over a plain socket through memory BIOs, keeping every byte that came off
    the wire: what an eavesdropper sees."""

    def __init__(self, port, context):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")
        self.wire = b""
        self._pump(self.tls.do_handshake)

    def _pump(self, operation):
        for _ in range(1000):
            try:
                result = operation()
                self._flush()
                return result
            except ssl.SSLWantReadError:
                self._flush()
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError("server closed")
                self.wire += chunk
                self.incoming.write(chunk)
        raise AssertionError("TLS made no progress")

    def _flush(self):
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def send(self, data):
        self._pump(lambda: self.tls.write(data))

    def recv(self):
        return self._pump(lambda: self.tls.read(65536))


def test_no_plaintext_frame_reaches_the_wire(tls_server, pki):
    client = RawTLS(tls_server.port, pki.client_context())
    client.send(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    plain = b""
    for _ in range(50):
        if b"\r\n\r\n" in plain:
            break
        plain += client.recv()
    assert plain.startswith(b"HTTP/1.1 101"), plain
    secret = b"the-secret-payload-0123456789"
    mask = b"\x01\x02\x03\x04"
    client.send(bytes([0x81, 0x80 | len(secret)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(secret)))
    for _ in range(50):
        if b"Message received: " + secret in plain:
            break
        plain += client.recv()
    # The echo came back, decrypted by TLS ...
    assert b"Message received: " + secret in plain
    # ... and neither it nor the 101 response ever crossed the wire in the clear.
    assert secret not in client.wire
    assert b"HTTP/1.1 101" not in client.wire
    client.sock.close()


def closes_soon(sock, timeout=5):
    """True when the server closes `sock` within `timeout` (bytes it sends first, an alert, are skipped)."""
    sock.settimeout(timeout)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except (socket.timeout, TimeoutError):
        return False
    return False


def test_plain_http_garbage_and_stalled_handshakes_are_closed_alone(tls_server, pki):
    context = pki.client_context()

    async def go():
        async with websockets.connect(tls_server.url, ssl=context) as ws:
            plain = socket.create_connection(("127.0.0.1", tls_server.port), timeout=5)
            plain.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert closes_soon(plain)
            garbage = socket.create_connection(("127.0.0.1", tls_server.port), timeout=5)
            garbage.sendall(b"\x16\x03\x01\x00\x40" + bytes(range(64)))
            assert closes_soon(garbage)
            # A ClientHello cut short: closed by the handshake timeout (1 s here).
            stalled = socket.create_connection(("127.0.0.1", tls_server.port), timeout=5)
            stalled.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            started = time.time()
            assert closes_soon(stalled, timeout=5)
            assert time.time() - started < 4
            for s in (plain, garbage, stalled):
                s.close()
            # The connection that was open all along did not notice.
            await ws.send("unharmed")
            assert await ws.recv() == "Message received: unharmed"
    run(go())
    assert serial_seen(tls_server.port, context) == "1001"


def test_missing_and_mismatched_files_stop_start_up_with_a_reason(tmp_path, pki):
    cert, key = pki.pair("startup", "5005")
    _, wrong_key = pki.pair("startup-other", "6006")
    cases = [
        (["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(key)], r"--tls-cert .*missing\.pem: no such file"),
        (["--tls-cert", str(cert), "--tls-key", str(wrong_key)], r"--tls-key .* does not match the certificate"),
        (["--tls-cert", str(key), "--tls-key", str(key)], r"--tls-cert .*: not a PEM certificate"),
        (["--tls-cert", str(cert)], r"--tls-cert and --tls-key go together"),
    ]
    for args, reason in cases:
        done = subprocess.run([str(BINARY), "--port", "0", "--scripts", str(ROOT / "scripts"), *args],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode != 0, args
        assert re.search(reason, done.stderr), (args, done.stderr)
        assert "Fatal error" not in done.stderr and "crashed" not in done.stderr


# MARK: metrics

def scrape(server):
    """{series: value} from the admin listener's /metrics."""
    with urllib.request.urlopen(server.admin + "/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            samples[series] = float(value)
    return samples


def grew(before, after, series):
    return after.get(series, 0) - before.get(series, 0)


def test_metrics_change_by_exactly_the_traffic(tmp_path, start_server):
    scripts = echo_scripts(tmp_path)
    (scripts / "zz_fail.lua").write_text(
        'return { name = "fail", on_message = function(conn, msg) if msg == "boom" then error("boom") end end }\n')
    server = start_server("--scripts", str(scripts), "--allow-origin", "https://good.example", "--no-compression")
    before = scrape(server)
    assert before['luaws_connections{path="/ws"}'] == 0
    assert before["luaws_lua_memory_bytes"] > 0

    a = RawClient(server.port)
    b = RawClient(server.port)
    mid = scrape(server)
    assert mid['luaws_connections{path="/ws"}'] == 2
    sent_bytes = 0
    received_bytes = 0
    for text in [b"one", b"two", b"boom"]:
        a.send_frame(0x1, text)
        sent_bytes += 6 + len(text)
        _, opcode, payload = a.recv_frame()
        assert payload == b"Message received: " + text
        received_bytes += 2 + len(payload)
    b.send_frame(0x2, b"\x00\x01\x02")  # binary: echo.lua does not answer
    sent_bytes += 6 + 3
    a.send_frame(0x8, struct.pack("!H", 1000))
    sent_bytes += 6 + 2
    assert a.recv_close() == 1000
    received_bytes += 2 + 2
    b.send_frame(0x8, struct.pack("!H", 4321))
    assert b.recv_close() == 4321
    assert a.at_eof() and b.at_eof()
    a.close()
    b.close()
    # A refused handshake: an origin that is not allowed.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                  b"Origin: https://evil.example\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 403")

    deadline = time.time() + 5
    while time.time() < deadline:
        after = scrape(server)
        if after['luaws_connections{path="/ws"}'] == 0:
            break
        time.sleep(0.05)
    assert after['luaws_connections{path="/ws"}'] == 0
    assert grew(before, after, 'luaws_connections_opened_total{path="/ws"}') == 2
    assert grew(before, after, 'luaws_connections_closed_total{code="1000"}') == 1
    assert grew(before, after, 'luaws_connections_closed_total{code="3000-4999"}') == 1
    assert grew(before, after, 'luaws_messages_received_total{path="/ws",kind="text"}') == 3
    assert grew(before, after, 'luaws_messages_received_total{path="/ws",kind="binary"}') == 1
    assert grew(before, after, 'luaws_messages_sent_total{path="/ws",kind="text"}') == 3
    assert grew(before, after, 'luaws_messages_sent_total{path="/ws",kind="binary"}') == 0
    # b's close frame (8 bytes) and its echo (4) count too.
    assert grew(before, after, 'luaws_bytes_received_total{path="/ws"}') == sent_bytes + 8
    assert grew(before, after, 'luaws_bytes_sent_total{path="/ws"}') == received_bytes + 4
    assert grew(before, after, 'luaws_handshakes_refused_total{reason="origin"}') == 1
    assert grew(before, after, 'luaws_script_errors_total{plugin="fail"}') == 1
    assert grew(before, after, 'luaws_messages_dropped_total') == 0
    # Each text message ran both plugins' on_message, the binary one too.
    assert grew(before, after, 'luaws_hook_duration_seconds_count{plugin="echo",hook="on_message"}') == 4
    assert grew(before, after, 'luaws_hook_duration_seconds_count{plugin="fail",hook="on_message"}') == 4
    assert after['luaws_hook_duration_seconds_sum{plugin="echo",hook="on_message"}'] > 0
    assert after['luaws_hook_duration_seconds_bucket{plugin="echo",hook="on_message",le="+Inf"}'] == \
        after['luaws_hook_duration_seconds_count{plugin="echo",hook="on_message"}']

    # A reload that works and one that does not.
    (scripts / "echo.lua").write_text((ROOT / "scripts" / "echo.lua").read_text() + "\n")
    assert server.wait_for_log(r"reloaded \(")
    (scripts / "echo.lua").write_text("return {")
    assert server.wait_for_log(r"reload \(.*\) failed")
    final = scrape(server)
    assert grew(after, final, 'luaws_reloads_total{result="success"}') >= 1
    assert grew(after, final, 'luaws_reloads_total{result="failure"}') >= 1
    # Counters never go back: a second scrape without traffic shows the same totals.
    again = scrape(server)
    assert again['luaws_messages_received_total{path="/ws",kind="text"}'] == final['luaws_messages_received_total{path="/ws",kind="text"}']


# MARK: admin listener, health

def status_code(url, context=None):
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_admin_paths_live_on_the_admin_listener_only(start_server):
    server = start_server("--scripts", "scripts")
    for path in ["/luaws/status", "/metrics", "/healthz", "/readyz"]:
        assert status_code(server.http + path) == 404, path
        assert status_code(server.admin + path) == 200, path
    with urllib.request.urlopen(server.admin + "/healthz", timeout=5) as r:
        assert r.read() == b"ok\n"
    # The admin listener serves nothing else: no page, no WebSocket.
    assert status_code(server.admin + "/") == 404
    assert status_code(server.admin + "/ws") == 404


def test_admin_on_public_keeps_the_old_behaviour(start_server):
    server = start_server("--scripts", "scripts", "--admin-on-public", admin=False)
    assert server.admin is None
    for path in ["/luaws/status", "/metrics", "/healthz", "/readyz"]:
        assert status_code(server.http + path) == 200, path


def test_without_admin_nothing_is_exposed(start_server):
    server = start_server("--scripts", "scripts", admin=False)
    for path in ["/luaws/status", "/metrics", "/healthz", "/readyz"]:
        assert status_code(server.http + path) == 404, path


def test_admin_listener_with_tls_stays_plain_http(tls_server, pki):
    assert status_code(tls_server.admin + "/readyz") == 200
    assert status_code(tls_server.http + "/luaws/status", context=pki.client_context()) == 404


# MARK: access log, version

def test_access_log_line_has_every_field(tmp_path, start_server):
    server = start_server("--scripts", str(echo_scripts(tmp_path)), "--no-compression")
    c = RawClient(server.port)
    c.send_frame(0x1, b"hello")
    _, _, payload = c.recv_frame()
    c.send_frame(0x8, struct.pack("!H", 1000))
    assert c.recv_close() == 1000
    c.close()
    pattern = (r"info luaws: .*access id=(\d+) remote=127\.0\.0\.1 path=/ws duration=\d+\.\d{3}s "
               r"messages_in=1 bytes_in=19 messages_out=1 bytes_out=29 code=1000")
    assert server.wait_for_log(pattern), server.stderr


def test_access_log_off(tmp_path, start_server):
    server = start_server("--scripts", str(echo_scripts(tmp_path)), "--access-log", "off")
    c = RawClient(server.port)
    c.send_frame(0x8, struct.pack("!H", 1000))
    assert c.recv_close() == 1000
    assert c.at_eof()
    c.close()
    time.sleep(0.3)
    assert "access id=" not in server.stderr


def test_version():
    done = subprocess.run([str(BINARY), "--version"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    assert re.fullmatch(r"luaws \d+\.\d+\.\d+\n", done.stdout)
