#!/usr/bin/env python3
"""Runs the same WebSocket load against luaws and its peers, one at a time, on loopback, and
prints one table. Driven by Benchmarks/compare.sh (which installs and builds everything).

Every figure comes from Benchmarks/wsbench (a C load generator that checks every reply):
messages/s, latency percentiles, and the server's CPU time per message read from
/proc/PID/stat (utime+stime of all its processes over the measured window).

--quick: only the two 16-byte loads. --full: also 19,000 idle connections with the 10 s push.
--sizes: only the 1 KiB and 64 KiB echo loads of JSON-like text, each without and with
permessage-deflate (wsbench -j, -z), against Node, nginx + ngx_lua and luaws (default scripts,
Swift-only, 2 event loops); a peer that does not agree to permessage-deflate is reported as not
supporting it. --scale: only 50, 500, 2,000 and 5,000 connections with 2 messages of 16 B in
flight each, against luaws (1 event loop), Node and nginx + ngx_lua, with each one's growth
from 50 to 5,000. The run without --quick has both.
--check BASELINE --now NOW [--tolerance PCT] (compare.sh --check runs instructions.sh for NOW):
compares two `Benchmarks/instructions.sh --json` files, prints baseline / now / change, and
exits 1 if a figure grew by more than PCT % (default 5), else 0. Starts nothing.
--io: only the loads of hooks that wait (luaws alone): luaws.sleep(0), luaws.http.request to a
local nginx, and fan-out to 1,000 subscribers over 2 processes with --cluster on a local
redis-server, beside one process without Redis and redis-benchmark's PUBLISH rate. The full
run (without --quick) ends with them too.
--tls: only the saturating 16-byte echo over wss, luaws (1 event loop, default scripts, serving
TLS itself with --tls-cert/--tls-key) against nginx + ngx_lua (1 worker, nginx terminating TLS),
beside the same two over plain ws. wsbench speaks plain ws to a socat TLS client proxy (one
process per connection) that speaks TLS to the server; only the server's CPU is counted."""
import json
import os
import resource
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
IO_ONLY = "--io" in sys.argv
TLS_ONLY = "--tls" in sys.argv
SIZES_ONLY = "--sizes" in sys.argv
SCALE_ONLY = "--scale" in sys.argv
# Each load with many connections ends after SCALE_MESSAGES replies or DURATION seconds.
SCALE_MESSAGES = int(os.environ.get("SCALE_MESSAGES", "1000000"))
SCALE_CONNECTIONS = [50, 500, 2000, 5000]
# Fan-out: messages published per run (each reaches every subscriber), after FANOUT_WARMUP.
FANOUT_MESSAGES = int(os.environ.get("FANOUT_MESSAGES", "1000"))
FANOUT_WARMUP = int(os.environ.get("FANOUT_WARMUP", "100"))
FANOUT_SUBSCRIBERS = 1000


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


def nginx_peer(tls=None):
    """nginx + ngx_lua; with tls=(cert, key), its listener terminates TLS with that PEM pair."""
    conf_dir = Path(tempfile.mkdtemp(prefix="luaws-nginx-"))
    conf_dir.chmod(0o755)  # nginx workers run as an unprivileged user
    (conf_dir / "ws_echo.lua").write_text((ROOT / "Benchmarks/peers/nginx/ws_echo.lua").read_text())
    template = (ROOT / "Benchmarks/peers/nginx/nginx.conf.in").read_text().replace("@DIR@", str(conf_dir))
    if tls:
        listen = "listen 127.0.0.1:@PORT@;"
        assert listen in template
        template = template.replace(listen, f"listen 127.0.0.1:@PORT@ ssl;\n    ssl_certificate {tls[0]};\n"
                                            f"    ssl_certificate_key {tls[1]};\n"
                                            # nginx before 1.23.4 offers TLS 1.3 only when asked
                                            f"    ssl_protocols TLSv1.2 TLSv1.3;")
    (conf_dir / "nginx.conf.in").write_text(template)

    class NginxPeer(Peer):
        def start(self, port):
            (conf_dir / "nginx.conf").write_text(template.replace("@PORT@", str(port)))
            super().start(port)
    return NginxPeer("nginx + ngx_lua (Lua loop), 1 worker" + (", nginx terminating TLS" if tls else ""),
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


def wsbench(port, pids, *args, backend=None, ports=None):
    urls = [f"ws://127.0.0.1:{p}/ws" for p in (ports or [port])]
    cmd = [str(WSBENCH), *args, "-P", ",".join(map(str, pids))]
    if backend:
        cmd += ["-B", ",".join(map(str, backend))]
    # wsbench bounds itself (connections open within 20 s, then -w + -d, -H or the fan-out's -d);
    # this is the bound of last resort.
    try:
        out = subprocess.run(cmd + urls, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return {"error": f"wsbench {' '.join(args)} did not end within 600 s"}
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": out.stderr.strip() or out.stdout.strip()}


def measure(key, loads):
    """Runs every load whose peer list (the third item, None: every peer) has `key`."""
    loads = [(n, a) for n, a, *who in loads if not who or who[0] is None or key in who[0]]
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
    if "unsupported" in r:
        return "-"
    v = r.get(field)
    return f"{v:,.{digits}f}" if isinstance(v, (int, float)) else "-"


# ---------------------------------------------------------------- hooks that wait (--io)

PEERS_DIR = ROOT / "Benchmarks/peers"
SATURATING = ["-c", "50", "-p", "16", "-s", "16"]


def luaws_peer(name, script, *extra):
    return Peer(name, [LUAWS, "--port", "@PORT@", "--threads", "1", "--log-level", "error",
                       "--scripts", str(script), *extra])


def failed(r):
    return ("error" in r or r.get("errors", 0) or r.get("mismatches", 0) or r.get("finished") is False
            or r.get("subscribers_complete", r.get("subscribers")) != r.get("subscribers"))


def median_by(outcomes, field):
    """The median of the runs that passed every check, by `field`; with how many did not."""
    good = [r for r in outcomes if not failed(r) and r.get(field) is not None]
    bad = len(outcomes) - len(good)
    if not good:
        return dict(outcomes[-1], failed_runs=bad) if outcomes else {"error": "no run"}
    good.sort(key=lambda r: r[field])
    return dict(good[len(good) // 2], runs=len(outcomes), failed_runs=bad, all_runs=[r.get(field) for r in outcomes])


def thread_ticks(pid):
    """CPU ticks of each thread of `pid`, summed by thread name without its number
    (NIO-ELT-1-#0 and NIO-ELT-1-#1 are NIO-ELT-1)."""
    ticks = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip().split("#")[0].rstrip("-")
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            ticks[name] = ticks.get(name, 0) + int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return ticks


def interleaved(servers, args, backend=None):
    """Runs the same load REPEAT times against each started server, alternating between them, so
    that the machine's noise falls on all of them alike; the median by server CPU per message.
    Each result also has `threads`: the share of the process's CPU (warm-up included) by thread
    name (NIO-ELT: luaws's event loop; NIO-SGLTN: AsyncHTTPClient's own loops)."""
    outcomes = {key: [] for key in servers}
    for _ in range(REPEAT):
        for key, (peer, port) in servers.items():
            before = thread_ticks(peer.proc.pid)
            r = wsbench(port, peer.pids(), *args, backend=backend(key) if backend else None)
            after = thread_ticks(peer.proc.pid)
            spent = {name: after[name] - before.get(name, 0) for name in after}
            total = sum(spent.values())
            if total > 0:
                r["threads"] = {name: round(t / total, 3) for name, t in spent.items() if t > 0}
            outcomes[key].append(r)
            time.sleep(0.5)
    return {key: median_by(runs, "server_cpu_us_per_msg") for key, runs in outcomes.items()}


def start_all(peers):
    started = {}
    try:
        for key, peer in peers.items():
            port = free_port()
            peer.start(port)
            started[key] = (peer, port)
    except Exception:
        stop_all(started)
        raise
    return started


def stop_all(started):
    for peer, _ in started.values():
        try:
            peer.stop()
        except Exception:
            pass


def http_backend_peer():
    conf_dir = Path(tempfile.mkdtemp(prefix="luaws-backend-"))
    conf_dir.chmod(0o755)  # nginx workers run as an unprivileged user
    (conf_dir / "tmp").mkdir()
    template = (PEERS_DIR / "nginx/http_backend.conf.in").read_text().replace("@DIR@", str(conf_dir))

    class Backend(Peer):
        def start(self, port):
            (conf_dir / "nginx.conf").write_text(template.replace("@PORT@", str(port)))
            super().start(port)
    return Backend("nginx, 1 worker, return 200 (no Lua)",
                   ["nginx", "-p", str(conf_dir), "-c", str(conf_dir / "nginx.conf")], children=True)


def redis_peer():
    return Peer("redis-server", ["redis-server", "--bind", "127.0.0.1", "--port", "@PORT@", "--save", "",
                                 "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"])


def run_io(d):
    results = {}

    # 1. The price of one wait: the plain echo against the same echo with luaws.sleep(0) first.
    print("-- io: sleep(0)", file=sys.stderr, flush=True)
    servers = start_all({
        "echo": luaws_peer("luaws, scripts/echo.lua", ROOT / "scripts/echo.lua"),
        "sleep0": luaws_peer("luaws, echo after luaws.sleep(0)", PEERS_DIR / "luaws/sleep_echo.lua"),
    })
    try:
        results["sleep"] = interleaved(servers, [*SATURATING, "-d", d])
        # One message in flight per connection: no batching to lose, so the difference is the
        # wait itself (suspend, timer, resume) more nearly than under the saturating load.
        results["sleep_pingpong"] = interleaved(servers, ["-c", "50", "-p", "1", "-s", "16", "-d", d])
    finally:
        stop_all(servers)
    time.sleep(1)

    # 2. A hook that calls HTTP: each message is one GET to a local nginx whose body is the answer.
    print("-- io: http", file=sys.stderr, flush=True)
    backend = http_backend_peer()
    bport = free_port()
    backend.start(bport)
    try:
        servers = start_all({
            "echo": luaws_peer("luaws, scripts/echo.lua", ROOT / "scripts/echo.lua"),
            "http": luaws_peer("luaws, answer = body of luaws.http.request to nginx", PEERS_DIR / "luaws/http_echo.lua",
                               "--var", f"backend=http://127.0.0.1:{bport}/echo"),
        })
        try:
            results["http"] = interleaved(servers, [*SATURATING, "-d", d], backend=lambda key: backend.pids())
        finally:
            stop_all(servers)
    finally:
        backend.stop()
    time.sleep(1)

    # 3. Fan-out: 1 publisher, 1,000 subscribers.
    fan_args = ["-m", "fanout", "-c", str(FANOUT_SUBSCRIBERS), "-p", "16", "-s", "16", "-n", str(FANOUT_MESSAGES),
                "-W", str(FANOUT_WARMUP), "-d", "30"]
    script = PEERS_DIR / "luaws/fanout.lua"
    redis = redis_peer()
    rport = free_port()
    print("-- io: fan-out over Redis", file=sys.stderr, flush=True)
    redis.start(rport)
    try:
        url = f"redis://127.0.0.1:{rport}"
        servers = start_all({
            "a": luaws_peer("luaws A", script, "--cluster", "--redis", url, "--redis-required"),
            "b": luaws_peer("luaws B", script, "--cluster", "--redis", url, "--redis-required"),
        })
        try:
            pids = [p for peer, _ in servers.values() for p in peer.pids()]
            ports = [port for _, port in servers.values()]
            runs = []
            for _ in range(REPEAT):
                runs.append(wsbench(ports[0], pids, *fan_args, backend=redis.pids(), ports=ports))
                time.sleep(1)
            results["fanout_cluster"] = median_by(runs, "server_cpu_us_per_delivery")
        finally:
            stop_all(servers)
        print("-- io: redis-benchmark PUBLISH", file=sys.stderr, flush=True)
        results["redis_publish"] = {}
        for label, extra in [("50 clients", []), ("50 clients, pipeline 16", ["-P", "16"])]:
            out = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(rport), "-n", "200000", "-c", "50",
                                  *extra, "--csv", "PUBLISH", "bench:none", "0123456789abcdef"],
                                 capture_output=True, text=True, timeout=120).stdout
            rows = [line.replace('"', "").split(",") for line in out.strip().splitlines()]
            try:
                header, row = rows[0], rows[-1]
                results["redis_publish"][label] = {h: (float(v) if h != "test" else v) for h, v in zip(header, row)}
            except (IndexError, ValueError):
                results["redis_publish"][label] = {"error": out.strip()}
    finally:
        redis.stop()
    time.sleep(1)

    # Without Redis, one process: with 1 event loop (1 core, where the cluster has 2 processes of
    # 1 loop), and with 2 event loops (as many cores as the cluster).
    for key, threads in [("fanout_local", "1"), ("fanout_local_2", "2")]:
        print(f"-- io: fan-out in one process, {threads} event loop(s)", file=sys.stderr, flush=True)
        peer = luaws_peer("luaws, one process", script)
        peer.argv[peer.argv.index("--threads") + 1] = threads
        servers = start_all({"one": peer})
        try:
            _, port = servers["one"]
            runs = []
            for _ in range(REPEAT):
                runs.append(wsbench(port, peer.pids(), *fan_args))
                time.sleep(1)
            results[key] = median_by(runs, "server_cpu_us_per_delivery")
        finally:
            stop_all(servers)
    return results


def errs_of(r):
    if "error" in r:
        return "error"
    n = r.get("errors", 0) + r.get("mismatches", 0)
    return f"{n} ({r['failed_runs']} of {r.get('runs', '?')} runs failed)" if r.get("failed_runs") else n


def diff(a, b, field):
    try:
        return f"{b[field] - a[field]:,.2f}"
    except (KeyError, TypeError):
        return "-"


def print_io(results):
    print(f"\n## luaws: hooks that wait — {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, loopback, "
          f"1 event loop per luaws process, median of {REPEAT} runs by server CPU per message\n")
    print("### luaws.sleep(0) and luaws.http.request, 16 B\n")
    print("Each pair ran alternately against two luaws processes started side by side. The HTTP backend is "
          "nginx (1 worker, `return 200 \"Message received: $arg_m\"`, no Lua), so every reply wsbench checks "
          "went through it; its CPU is counted apart.\n")
    print("| load | luaws | msg/s | server CPU µs/msg | backend CPU µs/msg | p50 µs | p99 µs | errors |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    sat, pp = "saturating 50×16 in flight", "ping-pong 50×1"
    rows = [(sat, "scripts/echo.lua (plain Lua echo)", results["sleep"]["echo"]),
            (sat, "echo after `luaws.sleep(0)`", results["sleep"]["sleep0"]),
            (pp, "scripts/echo.lua (plain Lua echo)", results["sleep_pingpong"]["echo"]),
            (pp, "echo after `luaws.sleep(0)`", results["sleep_pingpong"]["sleep0"]),
            (sat, "scripts/echo.lua (run beside the HTTP hook)", results["http"]["echo"]),
            (sat, "answer = body of `luaws.http.request` to nginx", results["http"]["http"])]
    for load, title, r in rows:
        print(f"| {load} | {title} | {fmt(r, 'msg_per_s')} | {fmt(r, 'server_cpu_us_per_msg', 2)} | "
              f"{fmt(r, 'backend_cpu_us_per_msg', 2)} | {fmt(r, 'p50_us')} | {fmt(r, 'p99_us')} | {errs_of(r)} |")
    shares = results["http"]["http"].get("threads", {})
    if shares:
        print("\nCPU of the HTTP-calling luaws by thread: " + ", ".join(
            f"{name} {share * 100:.0f} %" for name, share in sorted(shares.items(), key=lambda x: -x[1])) +
            " (NIO-ELT: its event loop, Lua included; NIO-SGLTN: AsyncHTTPClient's loops).")
    print(f"\nOne `luaws.sleep(0)` round trip: {diff(results['sleep']['echo'], results['sleep']['sleep0'], 'server_cpu_us_per_msg')} "
          f"µs of server CPU per message under the saturating load (a waiting hook holds back its connection's "
          f"next messages, so the batching of 16 messages per read is lost too), "
          f"{diff(results['sleep_pingpong']['echo'], results['sleep_pingpong']['sleep0'], 'server_cpu_us_per_msg')} µs "
          f"in ping-pong; one `luaws.http.request`: "
          f"{diff(results['http']['echo'], results['http']['http'], 'server_cpu_us_per_msg')} µs in luaws "
          f"(plus the backend's).\n")

    print(f"### Fan-out: 1 publisher, {FANOUT_SUBSCRIBERS:,} subscribers, 16 B, {FANOUT_MESSAGES:,} messages "
          f"(after {FANOUT_WARMUP}), at most 16 not yet received by everyone\n")
    print("Every subscriber must receive every message in order (wsbench -m fanout checks each). "
          "CPU per delivered message: all luaws processes; Redis apart. The publisher connects to the first "
          "process. Deliveries/s is bounded by the cores the set-up may use (one per event loop) and by the "
          "window of 16 messages: compare CPU per delivery first.\n")
    print("| set-up | deliveries/s | published/s | luaws CPU µs/delivery | Redis CPU µs/delivery | p50 µs | p99 µs | "
          "subscribers complete | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for title, r in [("2 luaws processes × 1 event loop (500 + 500 subscribers), --cluster over redis-server",
                      results["fanout_cluster"]),
                     ("1 luaws process × 1 event loop, no Redis (1,000 subscribers)", results["fanout_local"]),
                     ("1 luaws process × 2 event loops, no Redis (1,000 subscribers)", results["fanout_local_2"])]:
        complete = "error" if "error" in r else f"{r.get('subscribers_complete', 0):,}/{r.get('subscribers', 0):,}"
        print(f"| {title} | {fmt(r, 'delivered_per_s')} | {fmt(r, 'published_per_s')} | "
              f"{fmt(r, 'server_cpu_us_per_delivery', 2)} | {fmt(r, 'backend_cpu_us_per_delivery', 2)} | "
              f"{fmt(r, 'p50_us')} | {fmt(r, 'p99_us')} | {complete} | {errs_of(r)} |")
    rc = results["fanout_cluster"]
    if isinstance(rc.get("backend_cpu_us_per_delivery"), (int, float)):
        print(f"\nRedis's CPU per published message in the cluster run: "
              f"{rc['backend_cpu_us_per_delivery'] * rc.get('subscribers', 0):,.0f} µs (one PUBLISH in, one message "
              f"out to each luaws process; /proc counts in 10 ms ticks, so this is rough).")
    for label, r in results["redis_publish"].items():
        if "error" in r:
            print(f"\nredis-benchmark PUBLISH ({label}): error {r['error']}")
        else:
            print(f"\nredis-benchmark PUBLISH to a channel with no subscriber ({label}, 16 B): "
                  f"{r.get('rps', 0):,.0f} PUBLISH/s, p50 {r.get('p50_latency_ms', 0):.3f} ms")
    print("\nRaw results (JSON):\n")
    print("```")
    print(json.dumps(results, indent=None))
    print("```")


# ---------------------------------------------------------------- wss (--tls)

def self_signed_pair():
    """A throw-away self-signed RSA 2048 certificate and key (PEM) for 127.0.0.1, in a temp dir."""
    d = Path(tempfile.mkdtemp(prefix="luaws-tls-"))
    d.chmod(0o755)
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    key.chmod(0o644)  # nginx reads it as root, but keep it simple for any user
    return cert, key


class TlsProxied(Peer):
    """A TLS server behind a socat TLS client proxy: wsbench connects in plain ws to `port`, where
    socat (one forked process per connection) opens a TLS connection to the server on a port of its
    own. pids() and proc are the server's alone, so the proxy's CPU is never counted."""

    def __init__(self, server):
        super().__init__(server.name, server.argv)
        self.server = server

    def start(self, port):
        self.server_port = free_port()
        self.server.start(self.server_port)
        self.proc = self.server.proc
        self.proxy = subprocess.Popen(
            ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,nodelay",
             f"OPENSSL:127.0.0.1:{self.server_port},verify=0,nodelay"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_port(port)
        time.sleep(0.3)

    def pids(self):
        return self.server.pids()

    def stop(self):
        try:
            os.killpg(self.proxy.pid, 15)  # socat and the children it forked: its own session
        except ProcessLookupError:
            pass
        try:
            self.proxy.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proxy.pid, 9)
            self.proxy.wait()
        self.server.stop()

    def negotiated(self):
        """Protocol and cipher the server picks for an OpenSSL client (openssl s_client)."""
        out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{self.server_port}"],
                             input="", capture_output=True, text=True, timeout=20).stdout
        for line in out.splitlines():
            if line.startswith("New, "):
                return line.strip()
        return "?"


def run_tls(d):
    cert, key = self_signed_pair()
    luaws_args = PEERS["luaws"].argv
    servers = start_all({
        "luaws-tls": TlsProxied(Peer("luaws, default Lua scripts, 1 event loop, wss (luaws terminating TLS)",
                                     [*luaws_args, "--tls-cert", str(cert), "--tls-key", str(key)])),
        "nginx-tls": TlsProxied(nginx_peer(tls=(cert, key))),
        "luaws": Peer("luaws, default Lua scripts, 1 event loop, plain ws", luaws_args),
        "nginx": nginx_peer(),
    })
    try:
        ciphers = {k: servers[k][0].negotiated() for k in ("luaws-tls", "nginx-tls")}
        print("-- tls: saturating 50x16 in flight, 16 B", file=sys.stderr, flush=True)
        results = interleaved(servers, [*SATURATING, "-d", d])
    finally:
        stop_all(servers)
    for key, c in ciphers.items():
        results[key]["negotiated"] = c
    titles = {"luaws-tls": "luaws, 1 event loop, default scripts", "nginx-tls": "nginx + ngx_lua, 1 worker",
              "luaws": "luaws, 1 event loop, default scripts", "nginx": "nginx + ngx_lua, 1 worker"}
    return results, titles


def print_tls(results, titles):
    print(f"\n## wss: luaws against nginx + ngx_lua terminating TLS — {time.strftime('%Y-%m-%d')}, "
          f"{os.cpu_count()} cores, loopback, saturating 50×16 in flight, 16 B, {DURATION:g} s per run after 1 s "
          f"warm-up, median of {REPEAT} runs by server CPU per message (the four servers ran side by side, "
          f"the runs alternating between them)\n")
    print("Over TLS, wsbench speaks plain ws to a `socat` TLS client proxy (one process per connection, "
          "`OPENSSL:…,verify=0`) which speaks TLS to the server: only the server's CPU is counted "
          "(its PIDs, from /proc), never the proxy's, but the proxy shares the 2 cores with the server and bounds "
          "msg/s, so compare server CPU per message first. Self-signed RSA 2048 certificate. "
          "Negotiated with an OpenSSL client: " + "; ".join(
              f"{titles[k].split(',')[0]}: {results[k].get('negotiated', '?')}" for k in ("luaws-tls", "nginx-tls")) +
          ".\n")
    print("| server | transport | msg/s | server CPU µs/msg | p50 µs | p99 µs | errors |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for key, transport in [("luaws-tls", "wss (TLS in luaws)"), ("nginx-tls", "wss (TLS in nginx)"),
                           ("luaws", "ws"), ("nginx", "ws")]:
        r = results[key]
        print(f"| {titles[key]} | {transport} | {fmt(r, 'msg_per_s')} | {fmt(r, 'server_cpu_us_per_msg', 2)} | "
              f"{fmt(r, 'p50_us')} | {fmt(r, 'p99_us')} | {errs_of(r)} |")
    print(f"\nTLS's price in server CPU per message: luaws "
          f"{diff(results['luaws'], results['luaws-tls'], 'server_cpu_us_per_msg')} µs, nginx + ngx_lua "
          f"{diff(results['nginx'], results['nginx-tls'], 'server_cpu_us_per_msg')} µs.\n")
    print("Raw results (JSON):\n")
    print("```")
    print(json.dumps(results, indent=None))
    print("```")


ALL_PEERS = ["reference", "node", "nginx", "luaws", "luaws-builtin", "luaws-2"]
# The reference (uvicorn) is left out of the loads added with issue 13: it is the slowest by far
# at 16 B and refuses connections short of 5,000.
SIZE_PEERS = ["node", "nginx", "luaws", "luaws-builtin", "luaws-2"]
SCALE_PEERS = ["node", "nginx", "luaws"]
SIZES = [("1 KiB", 1024), ("64 KiB", 65536)]


def size_load(label, deflate):
    return f"ping-pong 50×{label} JSON-like text, " + ("permessage-deflate" if deflate else "uncompressed")


def size_loads(d):
    """1 KiB and 64 KiB, each without and with permessage-deflate, on the same JSON-like text
    (wsbench -j: it compresses about 2.2:1 on its own, as chat messages do)."""
    return [(size_load(label, z), ["-c", "50", "-p", "1", "-s", str(size), "-j", *(["-z"] if z else []), "-d", d],
             SIZE_PEERS)
            for label, size in SIZES for z in (False, True)]


def scale_load(c):
    return f"{c:,} connections × 2 in flight, 16 B"


def scale_loads(d):
    """Growing work: C connections, each with 2 messages in flight; ends after SCALE_MESSAGES
    replies or DURATION seconds (and wsbench waits at most 20 s for the connections to open)."""
    return [(scale_load(c), ["-c", str(c), "-p", "2", "-s", "16", "-n", str(SCALE_MESSAGES), "-d", d], SCALE_PEERS)
            for c in SCALE_CONNECTIONS]


def errors_of(r):
    if "error" in r:
        return "error"
    return r.get("errors", 0) + r.get("mismatches", 0) + max(0, r.get("connections", 0) - r.get("open", r.get("connections", 0)))


def cpu_of(r):
    v = r.get("server_cpu_us_per_msg")
    return v if isinstance(v, (int, float)) and v > 0 and not errors_of(r) else None


def print_echo_table(name, keys, table):
    print(f"### {name}\n")
    print("| server | msg/s | server CPU µs/msg | p50 µs | p99 µs | p99.9 µs | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key in keys:
        title, results = table[key]
        r = results[name]
        print(f"| {title} | {fmt(r, 'msg_per_s')} | {fmt(r, 'server_cpu_us_per_msg', 2)} | {fmt(r, 'p50_us')} | "
              f"{fmt(r, 'p99_us')} | {fmt(r, 'p999_us')} | {errors_of(r)} |")
    print()
    if "16 B" in name and "luaws" in keys and "luaws-2" in keys:
        one, two = table["luaws"][1][name], table["luaws-2"][1][name]
        if cpu_of(one) and cpu_of(two):
            print(f"2 loops / 1 loop CPU per message: {cpu_of(two) / cpu_of(one):.2f}× "
                  f"({cpu_of(two):.2f} vs {cpu_of(one):.2f} µs; p99 {fmt(two, 'p99_us')} µs at 2 loops, "
                  f"{fmt(one, 'p99_us')} µs at 1)\n")
        else:
            print("2 loops / 1 loop CPU per message: - (a run failed)\n")


def print_size_tables(keys, table):
    for label, size in SIZES:
        plain, deflated = size_load(label, False), size_load(label, True)
        print(f"### ping-pong 50×{label} JSON-like text, without and with permessage-deflate\n")
        print("| server | permessage-deflate | msg/s | server CPU µs/msg | p50 µs | p99 µs | bytes/msg on the wire "
              "(sent / received) | errors |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for key in keys:
            title, results = table[key]
            for name, z in ((plain, "off"), (deflated, "on")):
                r = results[name]
                if "unsupported" in r:
                    print(f"| {title} | {z} | not supported | | | | | |")
                    continue
                wire = (f"{r['wire_bytes_out_per_msg']:,.0f} / {r['wire_bytes_in_per_msg']:,.0f}"
                        if "wire_bytes_out_per_msg" in r else "-")
                print(f"| {title} | {z} | {fmt(r, 'msg_per_s')} | {fmt(r, 'server_cpu_us_per_msg', 2)} | "
                      f"{fmt(r, 'p50_us')} | {fmt(r, 'p99_us')} | {wire} | {errors_of(r)} |")
        prices = []
        for key in keys:
            title, results = table[key]
            a, b = results[plain], results[deflated]
            if "unsupported" in b:
                prices.append(f"{title}: not supported")
            elif cpu_of(a) and cpu_of(b):
                prices.append(f"{title}: +{cpu_of(b) - cpu_of(a):,.2f} µs (×{cpu_of(b) / cpu_of(a):.1f})")
        print(f"\npermessage-deflate's price in server CPU per message ({size:,}-byte messages, replies "
              f"{size + 18:,} bytes, each compressed on its own): " + "; ".join(prices) + ".\n")


def print_scale_table(keys, table):
    print(f"### Cost as the work grows: C connections × 2 messages of 16 B in flight each (each run ends "
          f"after {SCALE_MESSAGES:,} replies or {DURATION:g} s)\n")
    print("| server | connections | msg/s | server CPU µs/msg | p50 µs | p99 µs | p99.9 µs | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for key in keys:
        title, results = table[key]
        for c in SCALE_CONNECTIONS:
            r = results[scale_load(c)]
            print(f"| {title} | {c:,} | {fmt(r, 'msg_per_s')} | {fmt(r, 'server_cpu_us_per_msg', 2)} | "
                  f"{fmt(r, 'p50_us')} | {fmt(r, 'p99_us')} | {fmt(r, 'p999_us')} | {errors_of(r)} |")
    print()
    lo, hi = scale_load(SCALE_CONNECTIONS[0]), scale_load(SCALE_CONNECTIONS[-1])
    for key in sorted(keys, key=lambda k: k != "luaws"):
        title, results = table[key]
        a, b = cpu_of(results[lo]), cpu_of(results[hi])
        growth = f"×{b / a:.2f} ({a:.2f} → {b:.2f} µs/msg)" if a and b else "- (a run failed)"
        lead = "**luaws growth factor**" if key == "luaws" else f"{title} growth"
        print(f"{lead}, CPU per message at {SCALE_CONNECTIONS[-1]:,} ÷ at {SCALE_CONNECTIONS[0]:,} connections: "
              f"{growth}\n")


def enough_descriptors(needed):
    """Raises the soft limit on open files to the hard one, and the hard one too when allowed
    (root); says so when `needed` (per process) is still out of reach."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return
        except (ValueError, OSError):
            print(f"-- ulimit -n: hard limit {hard} < {needed}: the largest loads will fail", file=sys.stderr)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---------------------------------------------------------------- regression guard (--check)

def option(name, default=None):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv and sys.argv.index(name) + 1 < len(sys.argv) \
        else default


def check_instructions(baseline_path, now_path, tolerance):
    """Compares the figures of two `instructions.sh --json` files: a table baseline / now /
    change, and 1 if any figure grew by more than `tolerance` %, else 0. A figure in only one
    of the files is shown and not judged."""
    baseline = json.loads(Path(baseline_path).read_text())
    now = json.loads(Path(now_path).read_text())

    def figure(entry):
        return next(((k[len("instructions_per_"):], v) for k, v in entry.items() if k.startswith("instructions_per_")),
                    (None, None))

    print(f"\n### Instructions per message (Benchmarks/instructions.sh): now against {baseline_path}, "
          f"tolerance +{tolerance:g} %\n")
    print("| figure | baseline | now | change | |")
    print("|---|---:|---:|---:|---|")
    grown = []
    for name in list(baseline) + [k for k in now if k not in baseline]:
        unit, base = figure(baseline.get(name, {}))
        unit_now, value = figure(now.get(name, {}))
        label = f"{name} (per {unit or unit_now})"
        if base is None or value is None:
            print(f"| {label} | {base if base is not None else '-'} | {value if value is not None else '-'} | - | "
                  f"not compared |")
            continue
        change = (value - base) / base * 100
        verdict = "ok"
        if change > tolerance:
            verdict = f"**grew past +{tolerance:g} %**"
            grown.append(f"{name} {change:+.1f} %")
        print(f"| {label} | {base:,} | {value:,} | {change:+.2f} % | {verdict} |")
    print()
    if grown:
        print(f"check: FAILED: {', '.join(grown)} (tolerance +{tolerance:g} %)")
        return 1
    print(f"check: ok, no figure grew by more than {tolerance:g} %")
    return 0


def main():
    if "--check" in sys.argv:
        sys.exit(check_instructions(option("--check"), option("--now"), float(option("--tolerance", "5"))))
    d = str(DURATION)
    # 1,000 subscribers, 5,000 active and 19,000 idle connections: the servers inherit the limit.
    enough_descriptors(20000)
    if TLS_ONLY:
        print_tls(*run_tls(d))
        return
    if IO_ONLY:
        print_io(run_io(d))
        return
    sixteen = [
        ("ping-pong 50×16 B", ["-c", "50", "-p", "1", "-s", "16", "-d", d]),
        ("saturating 50×16 in flight, 16 B", ["-c", "50", "-p", "16", "-s", "16", "-d", d]),
    ]
    if SIZES_ONLY or SCALE_ONLY:
        loads = (size_loads(d) if SIZES_ONLY else []) + (scale_loads(d) if SCALE_ONLY else [])
        order = [k for k in ALL_PEERS if (SIZES_ONLY and k in SIZE_PEERS) or (SCALE_ONLY and k in SCALE_PEERS)]
    elif QUICK:
        loads, order = sixteen, ALL_PEERS
    else:
        loads = sixteen + [
            ("ping-pong 50×4 KiB", ["-c", "50", "-p", "1", "-s", "4096", "-d", d]),
            ("ping-pong 50×64 KiB", ["-c", "50", "-p", "1", "-s", "65536", "-d", d]),
            ("ping-pong 1×16 B", ["-c", "1", "-p", "1", "-s", "16", "-d", d]),
            ("ping-pong 500×16 B", ["-c", "500", "-p", "1", "-s", "16", "-d", d]),
            *size_loads(d),
            *scale_loads(d),
            ("idle 5,000", ["-m", "idle", "-c", "5000", "-H", "4"]),
        ]
        order = ALL_PEERS
    table = {}
    for key in order:
        print(f"-- {key}", file=sys.stderr, flush=True)
        table[key] = measure(key, loads)

    def ran(name):
        return [k for k in order if name in table[k][1]]

    print(f"\n## luaws and its peers — {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, loopback, "
          f"wsbench (C, 1 thread), {DURATION:g} s per load after 1 s warm-up, "
          f"16-byte loads: median of {REPEAT} runs by server CPU per message\n")
    names = [n for n, *_ in loads]
    for name in names:
        if name.startswith("idle") or name in {size_load(l, z) for l, _ in SIZES for z in (False, True)} \
                or name in {scale_load(c) for c in SCALE_CONNECTIONS}:
            continue
        print_echo_table(name, ran(name), table)
    if size_load(SIZES[0][0], False) in names:
        print_size_tables(ran(size_load(SIZES[0][0], False)), table)
    if scale_load(SCALE_CONNECTIONS[0]) in names:
        print_scale_table(ran(scale_load(SCALE_CONNECTIONS[0])), table)
    if "idle 5,000" in names:
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

    if not (QUICK or SIZES_ONLY or SCALE_ONLY):
        print_io(run_io(d))


if __name__ == "__main__":
    main()
