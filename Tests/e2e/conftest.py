"""End-to-end fixtures: start the real luaws binary on an ephemeral loopback port."""
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("LUAWS_BIN", ROOT / ".build" / "debug" / "luaws"))


class Server:
    """A running luaws process. `stderr` collects its log lines as they come.

    With `admin` (the default) it also gets an admin listener on a free port (`--admin`), whose
    base URL is `self.admin`: /luaws/status, /metrics, /healthz and /readyz are served there
    only. Without it, `self.admin` is None unless the arguments ask for one themselves.
    """

    def __init__(self, args, cwd=ROOT, admin=True):
        if admin and "--admin" not in args:
            args = [*args, "--admin", "127.0.0.1:0"]
        self.proc = subprocess.Popen(
            [str(BINARY), "--host", "127.0.0.1", "--port", "0", *args],
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self._stderr = []
        threading.Thread(target=self._drain, daemon=True).start()
        line = self.proc.stdout.readline()
        # http:// when plain, https:// with --tls-cert.
        match = re.search(r"(https?)://127\.0\.0\.1:(\d+)", line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"luaws did not start: {line!r} {self.stderr}")
        self.scheme = match.group(1)
        self.port = int(match.group(2))
        ws = "wss" if self.scheme == "https" else "ws"
        self.url = f"{ws}://127.0.0.1:{self.port}/ws"
        self.http = f"{self.scheme}://127.0.0.1:{self.port}"
        self.admin = None
        if "--admin" in args:
            line = self.proc.stdout.readline()
            match = re.search(r"admin on http://127\.0\.0\.1:(\d+)", line)
            if not match:
                self.proc.kill()
                raise RuntimeError(f"luaws printed no admin address: {line!r} {self.stderr}")
            self.admin_port = int(match.group(1))
            self.admin = f"http://127.0.0.1:{self.admin_port}"

    def _drain(self):
        for line in self.proc.stderr:
            self._stderr.append(line)

    @property
    def stderr(self):
        return "".join(self._stderr)

    def wait_for_log(self, pattern, timeout=5):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if re.search(pattern, self.stderr):
                return True
            time.sleep(0.05)
        return False

    def stop(self, sig=signal.SIGTERM, timeout=10):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def start_server():
    """start_server(*args) -> Server; every server started is stopped after the test."""
    started = []

    def start(*args, cwd=ROOT, admin=True):
        server = Server(list(args), cwd=cwd, admin=admin)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(start_server):
    """The default scripts and page, with the idle push shortened to 0.5 s."""
    return start_server("--scripts", str(ROOT / "scripts"), "--public", str(ROOT / "public"),
                        "--var", "time_interval=0.5")


# ---------------------------------------------------------------- helpers shared by the test files

def run(coro, timeout=60):
    """Runs a coroutine to completion, bounded in time."""
    import asyncio
    return asyncio.run(asyncio.wait_for(coro, timeout))


def write(folder, files):
    """Writes {name: text} into `folder` (made if needed) and returns it: a scripts folder."""
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def replace(path, text):
    """Writes like an editor that saves through a temporary file and a rename."""
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def status(server):
    """/luaws/status from the server's admin listener, as JSON."""
    import json
    import urllib.request
    with urllib.request.urlopen(server.admin + "/luaws/status", timeout=5) as r:
        return json.loads(r.read())


def wait_until(predicate, timeout=5):
    """Polls `predicate` every 50 ms for at most `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False
