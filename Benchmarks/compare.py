#!/usr/bin/env python3
"""Runs the same WebSocket load against luaws and its peers, one at a time, on loopback, and
prints one table. Driven by Benchmarks/compare.sh (which installs and builds everything).

Every figure comes from Benchmarks/wsbench (a C load generator that checks every reply):
messages/s, latency percentiles, and the server's CPU time per message read from
/proc/PID/stat (utime+stime of all its processes over the measured window)."""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".build-bench"
WSBENCH = BENCH / "wsbench"
VENV_PY = BENCH / "venv" / "bin" / "python"
DURATION = float(os.environ.get("DURATION", "5"))
# The machine is shared and noisy: the 16-byte loads run REPEAT times and the median
# (by server CPU per message) is reported.
REPEAT = int(os.environ.get("REPEAT", "3"))
QUICK = "--quick" in sys.argv
FULL = "--full" in sys.argv


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


class Peer:
    def __init__(self, name, argv, cwd=ROOT, env=None, children=False):
        self.name, self.argv, self.cwd, self.env, self.children = name, argv, cwd, env, children

    def start(self, port):
        argv = [a.replace("@PORT@", str(port)) for a in self.argv]
        env = dict(os.environ, **(self.env or {}))
        self.proc = subprocess.Popen(argv, cwd=self.cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port)
        time.sleep(0.3)

    def pids(self):
        pids = [self.proc.pid]
        if self.children:
            out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
            pids += [int(p) for p in out.split()]
        return pids

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def nginx_peer():
    conf_dir = Path(tempfile.mkdtemp(prefix="luaws-nginx-"))
    conf_dir.chmod(0o755)  # nginx workers run as an unprivileged user
    (conf_dir / "ws_echo.lua").write_text((ROOT / "Benchmarks/peers/nginx/ws_echo.lua").read_text())
    template = (ROOT / "Benchmarks/peers/nginx/nginx.conf.in").read_text().replace("@DIR@", str(conf_dir))
    (conf_dir / "nginx.conf.in").write_text(template)

    class NginxPeer(Peer):
        def start(self, port):
            (conf_dir / "nginx.conf").write_text(template.replace("@PORT@", str(port)))
            super().start(port)
    return NginxPeer("nginx + ngx_lua (Lua loop), 1 worker",
                     ["nginx", "-p", "/usr/share/nginx", "-c", str(conf_dir / "nginx.conf")], children=True)


LUAWS = str(ROOT / ".build/release/luaws")
PEERS = {
    "reference": Peer("reference: FastAPI + uvicorn (uvloop, httptools, websockets), 1 worker",
                      [str(VENV_PY), "-m", "uvicorn", "reference_app:app", "--host", "127.0.0.1", "--port", "@PORT@",
                       "--loop", "uvloop", "--http", "httptools", "--ws", "websockets", "--log-level", "warning",
                       "--ws-max-queue", "64"],
                      cwd=ROOT / "Benchmarks/peers"),
    "node": Peer("Node 20 + ws (Debian's node-ws)", ["node", str(ROOT / "Benchmarks/peers/node_ws_echo.js"), "@PORT@"],
                 env={"NODE_PATH": "/usr/share/nodejs"}),
    "nginx": None,  # made on demand
    "luaws": Peer("luaws, default Lua scripts, 1 event loop",
                  [LUAWS, "--port", "@PORT@", "--threads", "1", "--log-level", "error", "--max-connections", "19500"]),
    "luaws-builtin": Peer("luaws, Swift-only echo (--builtin-echo), 1 event loop",
                          [LUAWS, "--port", "@PORT@", "--threads", "1", "--log-level", "error", "--builtin-echo"]),
    "luaws-2": Peer("luaws, default Lua scripts, 2 event loops",
                    [LUAWS, "--port", "@PORT@", "--threads", "2", "--log-level", "error"]),
}


def wsbench(port, pids, *args):
    cmd = [str(WSBENCH), *args, "-P", ",".join(map(str, pids)), f"ws://127.0.0.1:{port}/ws"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": out.stderr.strip() or out.stdout.strip()}


def measure(key, loads):
    peer = PEERS[key] or nginx_peer()
    port = free_port()
    results = {}
    # Idle memory is measured on a freshly started server: memory freed by the echo loads
    # would otherwise be reused by the idle connections and flatter the figure.
    idle = [(n, a) for n, a in loads if a[:2] == ["-m", "idle"]]
    busy = [(n, a) for n, a in loads if a[:2] != ["-m", "idle"]]
    for name, args in idle:
        peer.start(port)
        try:
            results[name] = wsbench(port, peer.pids(), *args)
        finally:
            peer.stop()
        time.sleep(1)
    peer.start(port)
    try:
        for name, args in busy:
            runs = REPEAT if "16 B" in name else 1
            outcomes = []
            for _ in range(runs):
                outcomes.append(wsbench(port, peer.pids(), *args))
                time.sleep(0.5)
            good = [r for r in outcomes if "error" not in r and r.get("server_cpu_us_per_msg") is not None]
            if good:
                good.sort(key=lambda r: r["server_cpu_us_per_msg"] or 0)
                results[name] = dict(good[len(good) // 2], runs=len(outcomes))
            else:
                results[name] = outcomes[-1]
    finally:
        peer.stop()
    return peer.name, results


def fmt(r, field, digits=0):
    if "error" in r:
        return "error"
    v = r.get(field)
    return f"{v:,.{digits}f}" if isinstance(v, (int, float)) else "-"


def main():
    d = str(DURATION)
    loads = [
        ("ping-pong 50×16 B", ["-c", "50", "-p", "1", "-s", "16", "-d", d]),
        ("saturating 50×16 in flight, 16 B", ["-c", "50", "-p", "16", "-s", "16", "-d", d]),
    ]
    if not QUICK:
        loads += [
            ("ping-pong 50×4 KiB", ["-c", "50", "-p", "1", "-s", "4096", "-d", d]),
            ("ping-pong 50×64 KiB", ["-c", "50", "-p", "1", "-s", "65536", "-d", d]),
            ("ping-pong 1×16 B", ["-c", "1", "-p", "1", "-s", "16", "-d", d]),
            ("ping-pong 500×16 B", ["-c", "500", "-p", "1", "-s", "16", "-d", d]),
            ("idle 5,000", ["-m", "idle", "-c", "5000", "-H", "4"]),
        ]
    order = ["reference", "node", "nginx", "luaws", "luaws-builtin", "luaws-2"]
    table = {}
    for key in order:
        print(f"-- {key}", file=sys.stderr, flush=True)
        table[key] = measure(key, loads)

    print(f"\n## luaws and its peers — {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, loopback, "
          f"wsbench (C, 1 thread), {DURATION:g} s per load after 1 s warm-up, "
          f"16-byte loads: median of {REPEAT} runs by server CPU per message\n")
    for name, _ in loads:
        if name.startswith("idle"):
            continue
        print(f"### {name}\n")
        print("| server | msg/s | server CPU µs/msg | p50 µs | p99 µs | p99.9 µs | errors |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for key in order:
            title, results = table[key]
            r = results[name]
            errs = "error" if "error" in r else r.get("errors", 0) + r.get("mismatches", 0)
            print(f"| {title} | {fmt(r, 'msg_per_s')} | {fmt(r, 'server_cpu_us_per_msg', 2)} | {fmt(r, 'p50_us')} | "
                  f"{fmt(r, 'p99_us')} | {fmt(r, 'p999_us')} | {errs} |")
        print()
    if not QUICK:
        print("### RSS per idle connection (5,000 idle connections)\n")
        print("| server | KB per connection | connections open |")
        print("|---|---:|---:|")
        for key in order:
            title, results = table[key]
            r = results["idle 5,000"]
            print(f"| {title} | {fmt(r, 'rss_per_conn_kb', 2)} | {fmt(r, 'open')} |")
        print()
    print("Raw results (JSON):\n")
    print("```")
    print(json.dumps({k: v[1] for k, v in table.items()}, indent=None))
    print("```")

    if FULL:
        print("\n### 19,000 concurrent connections, idle push every 10 s\n")
        peer = Peer("luaws", [LUAWS, "--port", "@PORT@", "--log-level", "error", "--max-connections", "19500"])
        port = free_port()
        peer.start(port)
        try:
            r = wsbench(port, peer.pids(), "-m", "idle", "-c", "19000", "-H", "25", "-e", "10")
        finally:
            peer.stop()
        print(f"connections open: {r.get('open')}, errors: {r.get('errors')}, pushes: {r.get('pushes')} "
              f"(expected ~{19000 * 2}), late by more than 1 s: {r.get('late_pushes')}, "
              f"RSS per connection: {r.get('rss_per_conn_kb')} KB")
        print("```")
        print(json.dumps(r))
        print("```")


if __name__ == "__main__":
    main()
