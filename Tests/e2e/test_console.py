"""The live dev console (issue 12, part 3): /luaws/console in headless Chromium (a socket to any
path, frames both ways with timestamps, the server's reloads, script errors and logs as they
happen), and its event stream, /luaws/events (Server-Sent Events), with raw sockets: history,
live events, keep-alive, a client that never reads, the subscriber bound, SIGTERM with a stream
open, and where the console is served (not on the public port without --admin-on-public)."""
import asyncio
import json
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import websockets
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

from conftest import BINARY, replace, run, status, wait_until, write
from test_browser import browser  # noqa: F401  (the headless Chromium fixture)

ROOT = Path(__file__).resolve().parents[2]
ECHO = (ROOT / "scripts" / "echo.lua").read_text()
BROKEN_ECHO = "return { on_message = function(conn, msg)\n  conn:send(\nend }\n"  # echo.lua:3
# Logs every message (luaws.log), echoes binary messages, fails on "boom" (boom.lua:4).
TOOLS = """return {
  on_message = function(conn, msg, kind)
    luaws.log("info", "heard " .. (kind == "text" and msg or #msg .. " bytes"))
    if msg == "boom" then error("kaboom") end
    if kind == "binary" then conn:send_binary(msg) end
  end,
}
"""


def get(url, timeout=5):
    """(status, content type, body) of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read()


class EventStream:
    """A raw-socket client of /luaws/events: the response head, then events and comments as they
    come (chunked transfer decoded by hand, so nothing is buffered behind the test's back)."""

    def __init__(self, base, path="/luaws/events", headers=(), rcvbuf=None, read_head=True):
        url = urllib.parse.urlparse(base)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(5)
        self.sock.connect((url.hostname, url.port))
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {url.hostname}\r\nAccept: text/event-stream\r\n{extra}\r\n".encode())
        self.raw = b""
        self.text = ""
        self.pos = 0
        self.status = None
        if read_head:
            self.read_head()

    def _receive(self, deadline):
        self.sock.settimeout(max(0.01, deadline - time.time()))
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the server closed the stream")
        self.raw += data

    def read_head(self, timeout=5):
        deadline = time.time() + timeout
        while b"\r\n\r\n" not in self.raw:
            self._receive(deadline)
        head, self.raw = self.raw.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        self.chunked = "chunked" in self.headers.get("transfer-encoding", "")

    def _decode(self):
        """Moves whole chunks from `raw` to `text`; False once the last chunk came."""
        if not self.chunked:
            self.text += self.raw.decode()
            self.raw = b""
            return True
        start = 0
        done = False
        while True:
            line_end = self.raw.find(b"\r\n", start)
            if line_end < 0:
                break
            size = int(self.raw[start:line_end], 16)
            if size == 0:
                done = True
                break
            if len(self.raw) < line_end + 2 + size + 2:
                break
            self.text += self.raw[line_end + 2:line_end + 2 + size].decode()
            start = line_end + 2 + size + 2
        self.raw = self.raw[start:]
        return not done

    def next(self, timeout=5):
        """The next block: {"comment": ...} (comments, `retry:`) or {"id", "event", "data"};
        EOFError at the end."""
        deadline = time.time() + timeout
        while True:
            end = self.text.find("\n\n", self.pos)
            if end >= 0:
                break
            if not self._decode() and self.text.find("\n\n", self.pos) < 0:
                raise EOFError("the stream ended")
            if self.text.find("\n\n", self.pos) < 0:
                self._receive(deadline)
        block = self.text[self.pos:end]
        self.pos = end + 2
        if self.pos > 1 << 20:  # what was read goes, now and then
            self.text = self.text[self.pos:]
            self.pos = 0
        fields = {"event": "message", "data": []}
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                fields["data"].append(value)
            elif name:
                fields[name] = value
        if not fields["data"]:
            return {"comment": block}
        fields["data"] = "\n".join(fields["data"])
        return fields

    def until(self, predicate, timeout=10):
        """Reads events (JSON-decoded `message` ones) until one satisfies `predicate`; returns it."""
        deadline = time.time() + timeout
        while True:
            block = self.next(timeout=max(0.01, deadline - time.time()))
            if block.get("event") == "message":
                event = json.loads(block["data"])
                if predicate(event):
                    return event

    def close(self):
        self.sock.close()


def rss_kb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.fixture
def scripts(tmp_path):
    return write(tmp_path / "scripts", {"echo.lua": ECHO, "tools.lua": TOOLS})


# ---------------------------------------------------------------- in a browser

def test_console_in_a_browser(scripts, start_server, browser):  # noqa: F811
    server = start_server("--scripts", str(scripts))
    wait = WebDriverWait(browser, 15)
    browser.get(server.admin + "/luaws/console")
    wait.until(EC.text_to_be_present_in_element((By.ID, "events-status"), "live"))
    # History: the start-up line was there before the page opened.
    wait.until(EC.text_to_be_present_in_element((By.ID, "events"), "plugins: echo, tools"))
    browser.execute_script("window.sameDocument = 42")

    # The page knows the public listener although the admin listener served it.
    path = browser.find_element(By.ID, "path")
    assert path.get_attribute("value") == "/ws"
    path.clear()
    path.send_keys("/ws?x=1")
    browser.find_element(By.ID, "connect").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "ws-status"), f"connected to ws://127.0.0.1:{server.port}/ws?x=1"))

    payload = browser.find_element(By.ID, "payload")
    payload.send_keys("hello console")
    browser.find_element(By.ID, "send").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "frames"), "Message received: hello console"))
    sent = browser.find_element(By.CSS_SELECTOR, "#frames li.sent.text")
    received = browser.find_element(By.CSS_SELECTOR, "#frames li.received.text")
    assert "hello console" in sent.text and "13 bytes" in sent.text
    assert re.match(r"\d\d:\d\d:\d\d\.\d\d\d ← text 31 bytes Message received: hello console$", received.text), received.text

    # Binary, from hex, and its echo.
    payload.clear()
    payload.send_keys("de ad be ef")
    Select(browser.find_element(By.ID, "send-as")).select_by_value("hex")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#frames li.received.binary")) == 1)
    assert "4 bytes de ad be ef" in browser.find_element(By.CSS_SELECTOR, "#frames li.sent.binary").text
    assert "4 bytes de ad be ef" in browser.find_element(By.CSS_SELECTOR, "#frames li.received.binary").text

    # luaws.log from a script, live, with its plugin.
    wait.until(EC.text_to_be_present_in_element((By.ID, "events"), "heard hello console"))
    logged = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#events li.log") if "heard hello console" in e.text]
    assert "[tools]" in logged[0] and re.match(r"\d\d:\d\d:\d\d\.\d\d\d log info", logged[0]), logged

    # A script error, with its file:line.
    Select(browser.find_element(By.ID, "send-as")).select_by_value("text")
    payload.clear()
    payload.send_keys("boom")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#events li.error"))
    error = browser.find_element(By.CSS_SELECTOR, "#events li.error").text
    assert "tools.lua:4" in error and "on_message" in error and "kaboom" in error, error

    # A broken script on disk: the failed reload with file:line, without reloading the page.
    replace(scripts / "echo.lua", BROKEN_ECHO)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#events li.reload.failed"))
    failed = browser.find_element(By.CSS_SELECTOR, "#events li.reload.failed").text
    assert "echo.lua:3" in failed and "previous scripts keep serving" in failed, failed

    # Fixed: a successful reload.
    replace(scripts / "echo.lua", ECHO)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#events li.reload.ok"))
    assert "ok: version 2, plugins: echo, tools" in browser.find_element(By.CSS_SELECTOR, "#events li.reload.ok").text
    assert browser.execute_script("return window.sameDocument") == 42

    # The filters hide a kind.
    browser.find_element(By.ID, "show-log").click()
    assert all(not e.is_displayed() for e in browser.find_elements(By.CSS_SELECTOR, "#events li.log"))
    assert browser.find_element(By.CSS_SELECTOR, "#events li.reload.ok").is_displayed()

    # Disconnect with a code and reason of one's own: the close both ways.
    browser.find_element(By.ID, "close-code").send_keys("4000")
    browser.find_element(By.ID, "close-reason").send_keys("bye")
    browser.find_element(By.ID, "disconnect").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "ws-status"), "disconnected (4000"))
    assert "close 4000 bye" in browser.find_element(By.CSS_SELECTOR, "#frames li.sent.close").text
    assert "close 4000" in browser.find_element(By.CSS_SELECTOR, "#frames li.received.close").text  # the server's answer
    assert server.wait_for_log(r"access .*path=/ws .*code=4000")


def test_console_on_the_public_port_with_admin_on_public(scripts, start_server, browser):  # noqa: F811
    server = start_server("--scripts", str(scripts), "--admin-on-public", admin=False)
    wait = WebDriverWait(browser, 15)
    browser.get(server.http + "/luaws/console")
    wait.until(EC.text_to_be_present_in_element((By.ID, "events-status"), "live"))
    browser.find_element(By.ID, "connect").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "ws-status"), f"connected to ws://127.0.0.1:{server.port}/ws"))
    payload = browser.find_element(By.ID, "payload")
    payload.send_keys("same port")
    payload.send_keys(Keys.CONTROL, Keys.ENTER)  # Ctrl+Enter sends
    wait.until(EC.text_to_be_present_in_element((By.ID, "frames"), "Message received: same port"))


# ---------------------------------------------------------------- the event stream

def test_events_replay_history_then_stream_live(scripts, start_server):
    server = start_server("--scripts", str(scripts), "--console-keep-alive", "0.3")
    # An error that happened before the console opened is there when it does.
    replace(scripts / "echo.lua", BROKEN_ECHO)
    assert wait_until(lambda: status(server)["last_reload"]["ok"] is False)

    stream = EventStream(server.admin)
    try:
        assert stream.status == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers["cache-control"] == "no-store"
        start = stream.until(lambda e: e["kind"] == "log" and e["message"].startswith("plugins:"))
        assert start["level"] == "info" and re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", start["time"])
        failed = stream.until(lambda e: e["kind"] == "reload")
        assert failed["ok"] is False and failed["file"] == "echo.lua" and failed["line"] == 3
        assert failed["error"].startswith("echo.lua:3:") and failed["level"] == "error"

        # Live: the fix, a log line of a script and a script error.
        replace(scripts / "echo.lua", ECHO)
        fixed = stream.until(lambda e: e["kind"] == "reload")
        assert fixed["ok"] is True and fixed["version"] == 2 and fixed["plugins"] == ["echo", "tools"]

        async def talk():
            async with websockets.connect(server.url) as ws:
                await ws.send("over the wire")
                await ws.send("boom")
                await ws.send("after")
                await asyncio.sleep(0.2)
        run(talk())
        logged = stream.until(lambda e: e["kind"] == "log" and "over the wire" in e["message"])
        assert logged["plugin"] == "tools" and logged["source"] == "ScriptHost"
        error = stream.until(lambda e: e["kind"] == "error")
        assert (error["plugin"], error["hook"], error["file"], error["line"]) == ("tools", "on_message", "tools.lua", 4)
        assert error["error"] == "tools.lua:4: kaboom"
        stream.until(lambda e: "heard after" in e["message"])  # the chain went on

        # Nothing for a while: keep-alive comments (every 0.3 s here, 15 s by default).
        deadline = time.time() + 3
        while time.time() < deadline:
            block = stream.next(timeout=3)
            if "comment" in block:
                break
        else:
            pytest.fail("no keep-alive comment")
    finally:
        stream.close()
    # The reload lines are in the log once each, and in the stream once each (as reload events).
    assert len(re.findall(r"reload \(.*\) failed", server.stderr)) == 1


def test_a_reconnecting_client_gets_only_what_it_missed(scripts, start_server):
    server = start_server("--scripts", str(scripts))
    first = EventStream(server.admin)
    block = first.next()
    while block.get("event") != "message":
        block = first.next()
    seen = block["id"]
    epoch, last = seen.split("-")
    first.close()
    replace(scripts / "echo.lua", ECHO.replace("Message received", "Got"))
    assert wait_until(lambda: status(server)["version"] == 2)
    again = EventStream(server.admin, headers=[("Last-Event-ID", seen)])
    try:
        ids = []
        while True:
            block = again.next()
            if block.get("event") == "message":
                assert block["id"].startswith(epoch + "-")
                ids.append(int(block["id"].split("-")[1]))
                if json.loads(block["data"])["kind"] == "reload":
                    break
        assert ids == list(range(int(last) + 1, int(last) + 1 + len(ids)))
    finally:
        again.close()
    # An id of another process (one before a restart, say): the whole history.
    other = EventStream(server.admin, headers=[("Last-Event-ID", "abc-1")])
    try:
        block = other.next()
        while block.get("event") != "message":
            block = other.next()
        assert block["id"] == f"{epoch}-1"
    finally:
        other.close()


def test_a_client_that_never_reads_costs_bounded_memory(tmp_path, start_server):
    # Every message logs 3 KB: 20,000 messages are 60 MB of events for a subscriber that reads
    # nothing (and a small receive buffer, so the kernel holds little of it for the client).
    chatty = 'local pad = string.rep("x", 3000)\nreturn { on_message = function(conn, msg) luaws.log("info", msg .. pad); conn:send(msg) end }\n'
    server = start_server("--scripts", str(write(tmp_path / "s", {"chatty.lua": chatty})), "--threads", "2")

    async def flood(count, batch=200):
        async with websockets.connect(server.url, max_queue=None) as ws:
            for start in range(0, count, batch):
                for i in range(start, start + batch):
                    await ws.send(str(i))
                for _ in range(batch):
                    await ws.recv()

    run(flood(2_000))  # the allocator's steady state, before measuring
    stuck = EventStream(server.admin, rcvbuf=4096, read_head=False)
    time.sleep(0.3)
    before = rss_kb(server.proc.pid)
    started = time.time()
    run(flood(20_000), timeout=120)
    grown = rss_kb(server.proc.pid) - before
    assert grown < 16 * 1024, f"RSS grew by {grown} kB with a subscriber that reads nothing"
    assert time.time() - started < 90

    # The server still answers, the console too; the stuck client, once it reads, learns what
    # it missed.
    assert get(server.admin + "/healthz")[0] == 200
    stuck.read_head()
    assert stuck.status == 200
    deadline = time.time() + 20
    while True:
        block = stuck.next(timeout=max(0.01, deadline - time.time()))
        if block.get("event") == "skipped":
            assert int(block["data"]) > 1000
            break
    stuck.close()


def test_subscribers_are_bounded(start_server, scripts):
    server = start_server("--scripts", str(scripts))
    streams = [EventStream(server.admin) for _ in range(16)]
    try:
        assert [s.status for s in streams] == [200] * 16
        status_code, _, body = get(server.admin + "/luaws/events")
        assert status_code == 503 and b"Too many event stream subscribers" in body
        # One leaves: there is room again (once the server has seen it go).
        streams.pop().close()

        def subscribed():
            stream = EventStream(server.admin)
            if stream.status == 200:
                streams.append(stream)
                return True
            stream.close()
            return False
        assert wait_until(subscribed)
        assert get(server.admin + "/luaws/events")[0] == 503
    finally:
        for stream in streams:
            stream.close()


def test_sigterm_with_an_open_stream_exits_at_once(scripts, start_server):
    server = start_server("--scripts", str(scripts))
    reader = EventStream(server.admin)
    stuck = EventStream(server.admin, rcvbuf=4096, read_head=False)
    reader.until(lambda e: e["message"].startswith("plugins:"))
    started = time.time()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=5) == 0
    assert time.time() - started < 3
    # The reader saw the stream end.
    with pytest.raises((EOFError, ConnectionError)):
        while True:
            reader.next(timeout=5)
    reader.close()
    stuck.close()


def test_the_console_is_not_public_without_admin_on_public(scripts, start_server):
    server = start_server("--scripts", str(scripts), "--public", str(ROOT / "public"))
    for path in ("/luaws/console", "/luaws/console/info", "/luaws/events"):
        assert get(server.http + path)[0] == 404, path
    status_code, content_type, body = get(server.admin + "/luaws/console")
    assert status_code == 200 and content_type.startswith("text/html") and b"luaws console" in body
    status_code, content_type, body = get(server.admin + "/luaws/console/info")
    info = json.loads(body)
    assert status_code == 200 and content_type == "application/json"
    assert (info["scheme"], info["host"], info["port"], info["paths"]) == ("ws", "127.0.0.1", server.port, ["/ws"])


def test_console_paths_are_reserved_for_plugin_routes_only_where_served(tmp_path, start_server):
    route = 'return { routes = { ["GET /luaws/events"] = function() return 200, {}, "mine" end } }\n'
    scripts = write(tmp_path / "s", {"r.lua": route})
    out = subprocess.run([str(BINARY), "--port", "0", "--scripts", str(scripts), "--admin-on-public"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "route GET /luaws/events collides with a path the server serves itself" in out.stderr
    # Without --admin-on-public the public port's /luaws/events is the plugin's.
    server = start_server("--scripts", str(scripts))
    assert get(server.http + "/luaws/events")[2] == b"mine"


def test_console_info_says_wss_with_tls(tmp_path, start_server):
    from test_ops import PKI
    cert, key = PKI(tmp_path / "pki").pair("server", "2001")
    server = start_server("--scripts", str(write(tmp_path / "s", {"echo.lua": ECHO})), "--tls-cert", str(cert), "--tls-key", str(key),
                          "--ws-path", "/ws", "--ws-path", "/chat")
    info = json.loads(get(server.admin + "/luaws/console/info")[2])
    assert (info["scheme"], info["host"], info["port"]) == ("wss", "127.0.0.1", server.port)
    assert sorted(info["paths"]) == ["/chat", "/ws"]


def test_console_info_leaves_a_wildcard_host_to_the_page(tmp_path):
    # (Not through start_server: it listens on 127.0.0.1.)
    proc = subprocess.Popen([str(BINARY), "--host", "0.0.0.0", "--port", "0", "--admin", "127.0.0.1:0",
                             "--scripts", str(write(tmp_path / "s", {"echo.lua": ECHO}))],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = int(re.search(r"://0\.0\.0\.0:(\d+)", proc.stdout.readline()).group(1))
        admin = re.search(r"admin on (http://127\.0\.0\.1:\d+)", proc.stdout.readline()).group(1)
        info = json.loads(get(admin + "/luaws/console/info")[2])
        assert (info["scheme"], info["host"], info["port"]) == ("ws", None, port)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
