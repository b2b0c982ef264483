"""The deployment recipes in deploy/. nginx (Debian's package) in front of luaws, configured
with the proxy directives of deploy/nginx-luaws.conf itself: echo and the idle push pass
through, ws:// and wss:// with the whole recipe, and with --trust-proxy 127.0.0.1 luaws logs the
client's address, not nginx's. The systemd unit passes systemd-analyze verify."""
import base64
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import time

import pytest
import websockets.sync.client

from conftest import BINARY, ROOT

RECIPE = ROOT / "deploy" / "nginx-luaws.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)

if NGINX is None and os.environ.get("CI"):
    raise RuntimeError("nginx is missing: dev/setup.sh --test installs it")
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx not installed (dev/setup.sh --test)")


def recipe_parts():
    """The recipe's `map` block and the body of its first `location /` (the lines between the
    braces), so that the test proxies exactly as the recipe says."""
    text = RECIPE.read_text()
    mapping = re.search(r"^map \$http_upgrade \$connection_upgrade \{.*?^\}", text, re.S | re.M).group(0)
    body = re.search(r"location / \{\n(.*?)\n    \}", text, re.S).group(1)
    assert "proxy_pass http://luaws;" in body
    return mapping, body


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    """nginx in the foreground with everything under tmp_path; `http` is the body of its http
    block."""

    def __init__(self, folder, http, port):
        self.port = port
        self.dir = folder
        self.dir.mkdir()
        temp = "\n".join(f"    {kind}_temp_path {self.dir / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        # As root, workers would run as nobody, who cannot enter pytest's tmp_path.
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = f"""{user}daemon off;
worker_processes 1;
pid {self.dir / 'nginx.pid'};
error_log {self.dir / 'error.log'} info;
events {{ worker_connections 64; }}
http {{
    access_log {self.dir / 'access.log'};
{temp}
{http}
}}
"""
        (self.dir / "nginx.conf").write_text(conf)
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"), "-e", str(self.dir / "error.log")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.proc.stdout.read()} {self.error_log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not listen: {self.error_log()}")

    def error_log(self):
        path = self.dir / "error.log"
        return path.read_text() if path.exists() else ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: the worker ends with the master
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def minimal_http(port, upstream_port):
    """One loopback server whose `location /` is the recipe's, proxying to `upstream_port`."""
    mapping, body = recipe_parts()
    body = body.replace("proxy_pass http://luaws;", f"proxy_pass http://127.0.0.1:{upstream_port};")
    return f"""{mapping}
    server {{
        listen 127.0.0.1:{port};
        location / {{
{body}
        }}
    }}"""


@pytest.fixture
def start_nginx(tmp_path):
    started = []

    def start(upstream_port=None, http=None, port=None):
        """The minimal configuration in front of `upstream_port`, or the given `http` block
        listening (first) on `port`."""
        port = port or free_port()
        proxy = Nginx(tmp_path / f"nginx{len(started)}", http or minimal_http(port, upstream_port), port)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def default_server(start_server, *args):
    return start_server("--scripts", str(ROOT / "scripts"), "--public", str(ROOT / "public"),
                        "--var", "time_interval=0.5", *args)


@needs_nginx
def test_echo_and_idle_push_pass_through(start_server, start_nginx):
    server = default_server(start_server, "--trust-proxy", "127.0.0.1")
    proxy = start_nginx(server.port)
    with websockets.sync.client.connect(f"ws://127.0.0.1:{proxy.port}/ws", open_timeout=5) as ws:
        started = time.monotonic()
        assert ws.recv(timeout=3).startswith("It is: ")
        assert ws.recv(timeout=3).startswith("It is: ")
        assert time.monotonic() - started < 2.5
        ws.send("through nginx")
        for _ in range(10):
            if ws.recv(timeout=3) == "Message received: through nginx":
                break
        else:
            raise AssertionError("no echo through nginx")
    # And the page: plain HTTP passes too.
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert s.recv(64).startswith(b"HTTP/1.1 200")


def raw_handshake_and_close(port, source, forwarded=None):
    """A WebSocket through nginx from the loopback address `source`, closed at once with 1000;
    optionally sending an X-Forwarded-For of its own."""
    with socket.socket() as s:
        s.settimeout(5)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        extra = f"X-Forwarded-For: {forwarded}\r\n" if forwarded else ""
        s.sendall(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 65536:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        assert data.startswith(b"HTTP/1.1 101"), data
        mask = os.urandom(4)
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(struct.pack("!H", 1000)))
        s.sendall(bytes([0x88, 0x80 | 2]) + mask + payload)
        for _ in range(100):  # until luaws's close and the end of the stream
            if not s.recv(4096):
                break


def access_remote(server, count):
    """The remote= of the first `count` access-log lines, in order."""
    deadline = time.time() + 5
    while time.time() < deadline:
        found = re.findall(r"access id=\d+ remote=(\S+) ", server.stderr)
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(server.stderr)


@needs_nginx
def test_trusted_proxy_shows_the_client_address(start_server, start_nginx):
    """The recipe's `X-Forwarded-For $proxy_add_x_forwarded_for` appends the address nginx saw
    to whatever the client sent; luaws (trusting only 127.0.0.1, where nginx connects from)
    takes the rightmost entry that is not a trusted proxy.

    The client connects from 127.0.0.3, an address nobody trusts, as a real client would:
    - without a header of its own, nginx sends `127.0.0.3`: logged remote=127.0.0.3;
    - forging `X-Forwarded-For: 203.0.113.5`, nginx sends `203.0.113.5, 127.0.0.3`: the
      rightmost untrusted entry is still 127.0.0.3, so the forgery is ignored.
    A client on 127.0.0.1 is itself a trusted address, so its own header is believed:
    `203.0.113.5, 127.0.0.1` gives 203.0.113.5. That is the rule working, and the reason a
    loopback test client must not be used to show the forgery being ignored."""
    server = default_server(start_server, "--trust-proxy", "127.0.0.1")
    proxy = start_nginx(server.port)
    raw_handshake_and_close(proxy.port, "127.0.0.3")
    assert access_remote(server, 1) == ["127.0.0.3"]
    raw_handshake_and_close(proxy.port, "127.0.0.3", forwarded="203.0.113.5")
    assert access_remote(server, 2) == ["127.0.0.3", "127.0.0.3"]
    raw_handshake_and_close(proxy.port, "127.0.0.1", forwarded="203.0.113.5")
    assert access_remote(server, 3) == ["127.0.0.3", "127.0.0.3", "203.0.113.5"]


@needs_nginx
def test_untrusted_proxy_shows_the_proxy_address(start_server, start_nginx):
    server = default_server(start_server)
    proxy = start_nginx(server.port)
    raw_handshake_and_close(proxy.port, "127.0.0.3", forwarded="203.0.113.5")
    assert access_remote(server, 1) == ["127.0.0.1"]


@needs_nginx
def test_the_whole_recipe_serves_ws_and_wss(tmp_path, start_server, start_nginx):
    """deploy/nginx-luaws.conf as it stands, but for its ports, its certificate paths and its
    upstream: ws:// on the plain server, wss:// on the TLS one."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem",
                    "-out", "cert.pem", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   cwd=tmp_path, check=True, capture_output=True, timeout=60)
    server = default_server(start_server, "--trust-proxy", "127.0.0.1")
    http_port, https_port = free_port(), free_port()
    text = RECIPE.read_text()
    for old, new in [("listen 80;", f"listen 127.0.0.1:{http_port};"),
                     ("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;"),
                     ("server 127.0.0.1:8000;", f"server 127.0.0.1:{server.port};"),
                     ("/etc/ssl/luaws/fullchain.pem", str(tmp_path / "cert.pem")),
                     ("/etc/ssl/luaws/privkey.pem", str(tmp_path / "key.pem"))]:
        assert old in text, old
        text = text.replace(old, new)
    # Only loopback here: the recipe's IPv6 wildcard listeners go.
    text = re.sub(r"^\s*listen \[::\]:\d+.*\n", "", text, flags=re.M)
    start_nginx(http=text, port=http_port)
    context = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    for url, options in [(f"ws://127.0.0.1:{http_port}/ws", {}),
                         (f"wss://127.0.0.1:{https_port}/ws", {"ssl": context})]:
        with websockets.sync.client.connect(url, open_timeout=5, **options) as ws:
            assert ws.recv(timeout=3).startswith("It is: "), url
            ws.send("hello")
            for _ in range(10):
                if ws.recv(timeout=3) == "Message received: hello":
                    break
            else:
                raise AssertionError(f"no echo over {url}")


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def test_systemd_unit_is_hardened():
    unit = (ROOT / "deploy" / "luaws.service").read_text()
    for directive in ["DynamicUser=yes", "ProtectSystem=strict", "ProtectHome=yes", "NoNewPrivileges=yes",
                      "PrivateTmp=yes", "LimitNOFILE=65536", "ExecReload=/bin/kill -HUP $MAINPID",
                      "KillSignal=SIGTERM", "--config /etc/luaws/luaws.toml"]:
        assert directive in unit, directive


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (no systemd on this machine)")
def test_systemd_unit_verifies(tmp_path):
    unit = (ROOT / "deploy" / "luaws.service").read_text()
    # The binary it names is the one just built, so that verify checks it exists.
    (tmp_path / "luaws.service").write_text(unit.replace("/usr/local/bin/luaws", str(BINARY)))
    done = subprocess.run([SYSTEMD_ANALYZE, "verify", str(tmp_path / "luaws.service")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "luaws.service" not in done.stderr, done.stderr
