"""Scale benchmark: the whole daemon with 5,000 VPN clients and 10,000 proxied connections.

``make bench-scale`` (``python3 -m tests.bench.scale``, as root) creates two
private network namespaces -- ``server`` and ``client`` -- joined by a veth
pair, re-runs this module inside ``server`` with ``--inside``, and deletes
both namespaces in a ``finally`` (also on failure, Ctrl-C or SIGTERM).

Inside ``server``:

* the real daemon, ``twistd --nodaemon pocketproxy --config X`` started from
  the checkout exactly as :class:`tests.lab.daemon.Daemon` starts it, as its own
  process, with a generated users file (certificate users: no scrypt on the hot
  path), a real kernel ipset and iptables chain, and ``firewall.interface`` set
  to the server end of the veth (which plays ``tun0``: ``10.9.0.1/16``);
* the scripted OpenVPN 2.6 management peer (:mod:`tests.bench.mgmt_peer`) on a
  unix socket, in a Twisted reactor thread of this process;
* the device proxies: one CONNECT sink process (:mod:`tests.bench.sink`)
  listening on one port per device;
* the peers measured in the same run: the direct-to-sink baseline and
  redsocks, REDIRECTed from their own source addresses (``10.78.0.0/24``).

In ``client``: the load generator (:mod:`tests.bench.scale_load`), whose
connections are bound to admitted clients' VPN addresses, which are added to
the client end of the veth, so their SYNs arrive on the server's "tun"
interface and the daemon's own ``POCKETPROXY`` chain REDIRECTs them.

Phases: admit N clients (sequential CONNECT -> client-auth, ESTABLISHED in
batches); SIGKILL the daemon and start it again with the N clients in the
peer's ``status 3`` (reconcile time; the ipset must hold exactly the N
addresses); hold M proxied connections spread over S client addresses (M =
10,000, or what the hard RLIMIT_NOFILE allows) and read the daemon's
VmRSS/VmHWM at M/2 and M; setup rate against the direct baseline and redsocks.
Exit 1 only when the run was incorrect.
"""

import argparse
import ipaddress
import json
import os
import platform
import re
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.bench.namespace_run import BenchTimeout, arm_inner_deadline, percentile, raise_nofile
from tests.lab.netns import stop_process

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "tests" / "bench" / "results"
OUTER_TIMEOUT = 900  # hard limit for the inner run, seconds (the health phase adds about 3 minutes)
INNER_DEADLINE = 870

SUBNET = "10.9.0.0/16"
SERVER_IP = "10.9.0.1"
PEER_NET = "10.78.0.0/24"
PEER_GW = "10.78.0.1"
CLIENT_PRIMARY = "10.78.0.254"
DST_NET = "198.51.100.0/24"
SET_NAME = "ppscale"
CHAIN = "PPSCALE"
PROXY_PORT = 12345
DEVICE_PORT0 = 9100  # device d listens on DEVICE_PORT0 + d (one sink process)
HEALTH_METRICS_PORT = 19105  # the health phase daemon's /metrics (loopback)
SCRAPES = 5  # /metrics scrapes timed per health phase daemon (median reported)
HEALTH_PORT0 = 20000  # the health phase's phones: 20000 + d (a second sink process; reserved ports)
TARGET_HEALTH_CORE_PCT = 2.0  # probing 2,000 devices at the default interval
# name: (destination port the generator dials, relay port or None, sink port)
PATHS = {
    "pocketproxy": (5001, PROXY_PORT, None),
    "direct": (5000, None, 9099),
    "redsocks": (5002, 12002, 9098),
}
FDS_SPARE = 256  # fds the daemon keeps free at the chosen M (as proxy.server.FDS_RESERVED)
WANT_CONNECTIONS = 10000
TARGET_RECONCILE_S = 2.0
TARGET_RSS_BYTES = 300 * 10**6  # MB = 10^6 B


class BenchError(Exception):
    """The run was incorrect: exit non-zero."""


def summary_ms(values):
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 50), 4),
        "p90_ms": round(percentile(values, 90), 4),
        "p99_ms": round(percentile(values, 99), 4),
        "max_ms": round(max(values), 4) if values else None,
        "mean_ms": round(statistics.fmean(values), 4) if values else None,
    }


def sh(*argv, input=None):
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60, input=input)


# --------------------------------------------------------------------------- outer part


def outer(args, passthrough):
    if os.geteuid() != 0:
        sys.stderr.write("bench-scale: needs root (network namespaces, ipset, iptables)\n")
        return 2
    from tests.lab.netns import Namespace, unique_name

    def on_term(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, on_term)
    spaces = []
    rc = 1
    try:
        server = Namespace("ssv")
        spaces.append(server)
        client = Namespace("scl")
        spaces.append(client)
        server_if, client_if = unique_name("sv"), unique_name("cl")
        subprocess.run(
            ["ip", "link", "add", server_if, "netns", server.name, "type", "veth", "peer", "name", client_if, "netns", client.name],
            check=True,
        )
        for ns in (server, client):
            for path, value in (
                ("net/ipv4/ip_local_port_range", "1024 65000"),
                # the health phase's phones listen there: no outgoing connection may hold one first
                ("net/ipv4/ip_local_reserved_ports", "%d-%d" % (HEALTH_PORT0, HEALTH_PORT0 + 9999)),
                ("net/ipv4/tcp_tw_reuse", "1"),
                ("net/core/somaxconn", "8192"),
                ("net/ipv4/tcp_max_syn_backlog", "8192"),
            ):
                ns.run("sh", "-c", "echo %s > /proc/sys/%s" % (value, path))
        server.run("ip", "addr", "add", SERVER_IP + "/16", "dev", server_if)
        server.run("ip", "addr", "add", PEER_GW + "/24", "dev", server_if)
        server.run("ip", "link", "set", server_if, "up")
        client.run("ip", "addr", "add", CLIENT_PRIMARY + "/24", "dev", client_if)
        client.run("ip", "link", "set", client_if, "up")
        client.run("ip", "route", "add", "default", "via", PEER_GW, "dev", client_if)
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
        argv = [sys.executable, "-m", "tests.bench.scale", "--inside", "--client-ns", client.name,
                "--server-if", server_if, "--client-if", client_if, *passthrough]
        proc = server.popen(argv, cwd=str(ROOT), env=env)
        try:
            rc = proc.wait(timeout=OUTER_TIMEOUT)
        except subprocess.TimeoutExpired:
            sys.stderr.write("bench-scale: inner run exceeded %ds; stopping it\n" % OUTER_TIMEOUT)
            rc = 3
    except KeyboardInterrupt:
        sys.stderr.write("bench-scale: interrupted; tearing the namespaces down\n")
        rc = 130
    finally:
        for ns in reversed(spaces):
            ns.destroy()
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for ns in spaces:
            if any(line.split()[:1] == [ns.name] for line in left.splitlines()):
                sys.stderr.write("bench-scale: namespace %s still exists after teardown!\n" % ns.name)
                rc = rc or 4
    if rc < 0:
        rc = 128 - rc
    return rc


# --------------------------------------------------------------------------- helpers inside


def in_root_namespace():
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return False


def proc_status(pid):
    """VmRSS, VmHWM (KiB) and open fds of one process."""
    out = {"rss_kib": 0, "hwm_kib": 0, "fds": 0}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_kib"] = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    out["hwm_kib"] = int(line.split()[1])
        out["fds"] = len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        pass
    return out


def nofile_of(pid):
    """(soft, hard) RLIMIT_NOFILE of ``pid`` from /proc/PID/limits (None = unlimited)."""
    with open("/proc/%d/limits" % pid) as f:
        for line in f:
            if line.startswith("Max open files"):
                parts = line.split()
                soft, hard = parts[3], parts[4]
                return (None if soft == "unlimited" else int(soft), None if hard == "unlimited" else int(hard))
    raise BenchError("no 'Max open files' in /proc/%d/limits" % pid)


class LineProcess:
    """A child process driven by JSON lines on stdin/stdout."""

    def __init__(self, name, argv, tmp, env=None):
        self.name = name
        self.stderr_path = Path(tmp) / ("%s.stderr" % name)
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            argv,
            cwd=str(ROOT),
            env=env or dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            start_new_session=True,  # a terminal Ctrl-C reaches the benchmark, which stops us by PID
        )
        self._buf = b""

    @property
    def pid(self):
        return self.proc.pid

    def read(self, timeout):
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise BenchError("%s did not answer within %.0fs" % (self.name, timeout))
            chunk = os.read(fd, 65536)
            if not chunk:
                raise BenchError("%s exited (%s): %s" % (self.name, self.proc.poll(), self.stderr_tail()))
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg = json.loads(line)
        if "error" in msg:
            raise BenchError("%s: %s" % (self.name, msg["error"]))
        return msg

    def send(self, obj):
        self.proc.stdin.write(json.dumps(obj).encode() + b"\n")
        self.proc.stdin.flush()

    def command(self, text, timeout=15):
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def stderr_tail(self, n=1500):
        try:
            return self.stderr_path.read_bytes()[-n:].decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self._stderr.close()


class LocalSpace:
    """What :class:`tests.lab.daemon.Daemon` needs of a namespace, for the one we already run in."""

    def popen(self, argv, **kwargs):
        return subprocess.Popen(argv, start_new_session=True, **kwargs)

    stop = staticmethod(stop_process)


def scrape_metrics(port, count):
    """``count`` GETs of ``/metrics`` on loopback: the median seconds (the daemon renders the whole
    page in one reactor turn, so this is how long a scrape holds its reactor), bytes and lines."""
    import urllib.request

    times, body = [], b""
    for _ in range(count):
        t0 = time.perf_counter()
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=30) as response:
            body = response.read()
        times.append(time.perf_counter() - t0)
    return {"median_s": round(statistics.median(times), 4), "bytes": len(body), "lines": body.count(b"\n")}


def cpu_seconds(pid):
    """User + system CPU seconds of process ``pid`` so far (``/proc/<pid>/stat``)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def admin_stats(path, timeout=10):
    """``pp stats --json`` over the daemon's admin socket (management dialect)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                raise BenchError("admin socket closed before its banner")
            buf += chunk
        s.sendall(b"pp stats --json\n")
        buf = buf.split(b"\n", 1)[1]
        while b"\nEND" not in b"\n" + buf:
            chunk = s.recv(65536)
            if not chunk:
                raise BenchError("admin socket closed before END")
            buf += chunk
    for line in buf.decode("utf-8", "replace").splitlines():
        if line.startswith("{"):
            return json.loads(line)
    raise BenchError("no JSON in 'pp stats --json': %r" % buf[:300])


# --------------------------------------------------------------------------- the reactor thread


class ReactorThread:
    """Twisted's reactor in a thread of this process (the management peer lives there)."""

    def __init__(self):
        from twisted.internet import reactor
        from twisted.logger import globalLogBeginner

        def observer(event):
            from twisted.logger import LogLevel, formatEvent

            if event.get("log_level") in (LogLevel.error, LogLevel.critical):
                sys.stderr.write("[bench reactor] %s\n" % formatEvent(event))

        globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
        self.reactor = reactor
        self.thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True)
        self.thread.start()

    def call(self, f, *args):
        from twisted.internet.threads import blockingCallFromThread

        return blockingCallFromThread(self.reactor, f, *args)

    def run(self, coro_fn, *args):
        from twisted.internet.defer import ensureDeferred

        return self.call(lambda: ensureDeferred(coro_fn(*args)))

    def stop(self):
        if self.reactor.running:
            self.reactor.callFromThread(self.reactor.stop)
        self.thread.join(10)


# --------------------------------------------------------------------------- the run


class Scale:
    def __init__(self, args, result, tmp):
        self.args = args
        self.result = result
        self.tmp = Path(tmp)
        self.rt = None
        self.peer = None
        self.daemon = None
        self.sink = None
        self.hsink = None
        self.hdaemon = None
        self.gen = None
        self.redsocks = None
        self.vpn_sources = []
        self.peer_sources = []
        self.cids = []
        self.cn = {}
        self.errors = result["errors"]

    def log(self, text):
        sys.stderr.write("[bench-scale %6.1fs] %s\n" % (time.perf_counter() - self.t_start, text))
        sys.stderr.flush()

    # ---------------------------------------------------------------- setup

    def start_sink(self):
        a = self.args
        ports = [DEVICE_PORT0 + d for d in range(a.devices)] + [PATHS["direct"][2], PATHS["redsocks"][2]]
        self.sink = LineProcess(
            "sink",
            [sys.executable, "-m", "tests.bench.sink", "--host", "0.0.0.0", "--ports", ",".join(map(str, ports))],
            self.tmp,
        )
        if not self.sink.read(15).get("ready"):
            raise BenchError("sink did not start")

    def start_generator(self):
        self.gen = LineProcess(
            "generator",
            ["ip", "netns", "exec", self.args.client_ns, sys.executable, "-m", "tests.bench.scale_load"],
            self.tmp,
        )
        msg = self.gen.read(20)
        if not msg.get("ready"):
            raise BenchError("generator did not start: %r" % msg)
        self.result["generator_nofile"] = msg.get("nofile")

    def make_daemon(self):
        from tests.lab.daemon import Daemon

        a = self.args
        devices = {"dev%03d" % d: "http://dev%03d:devpw@127.0.0.1:%d" % (d, DEVICE_PORT0 + d) for d in range(a.devices)}
        users = {}
        for i in range(a.clients):
            users["u%05d" % i] = {"cn": "scale-%05d" % i, "device": "dev%03d" % (i % a.devices)}
        self.admin_path = self.tmp / "admin.sock"
        self.mgmt_path = self.tmp / "mgmt.sock"
        t = time.perf_counter()
        self.daemon = Daemon(
            LocalSpace(),
            self.tmp / "daemon",
            self.mgmt_path,
            users,
            subnet=SUBNET,
            server_address=SERVER_IP,
            devices=devices,
            openvpn={"command_timeout": 10, "reconnect_initial": 0.1, "reconnect_max": 1, "bytecount_interval": 5},
            proxy={"listen": PROXY_PORT, "splice": False, "max_connections_per_client": 10000},
            # verify_interval 0: the peers' INPUT exception (add_sources) stays ahead of our jump.
            firewall={"ipset": SET_NAME, "chain": CHAIN, "interface": a.server_if, "maxelem": 65536, "verify_interval": 0},
            admin={"socket": str(self.admin_path)},
            # Device health (on by default) is measured on its own in the health phase, on against
            # off; here its probes would be CONNECTs the path and hold checks do not expect.
            health={"enabled": False},
        )
        self.result["setup"]["users_file_s"] = round(time.perf_counter() - t, 3)
        self.result["setup"]["users_file_bytes"] = self.daemon.users_path.stat().st_size
        # what the daemon pays for the same file at every start, before it connects to OpenVPN
        from ovpnmgr.directory import Directory

        t = time.perf_counter()
        Directory.load(self.daemon.users_path, ipaddress.IPv4Network(SUBNET), ipaddress.IPv4Address(SERVER_IP))
        self.result["setup"]["users_file_load_s"] = round(time.perf_counter() - t, 3)
        self.result["daemon_argv"] = self.daemon.argv()

    def wait_attached(self, since, timeout, what):
        """Wait until the peer saw ``bytecount`` (sent right after reconcile) after ``since``; returns the marks."""
        deadline = time.monotonic() + timeout
        while True:
            marks = [(w, t) for w, t in list(self.peer.marks) if t >= since]
            if any(w == "bytecount" for w, _ in marks):
                return marks
            if self.daemon.proc.poll() is not None:
                raise BenchError("daemon exited (%s) during %s: %s" % (self.daemon.proc.returncode, what, self.daemon.tail()))
            if time.monotonic() > deadline:
                raise BenchError("%s: no reconcile within %ds; marks %r; log:\n%s" % (what, timeout, marks, self.daemon.tail()))
            time.sleep(0.002)

    def start_daemon(self, what):
        mark = self.daemon.log_mark()
        t_spawn = time.perf_counter()
        self.daemon.start()
        marks = self.wait_attached(t_spawn, 90, what)
        t_connect = next(t for w, t in marks if w == "connect")
        t_status = next(t for w, t in marks if w == "status")
        t_done = next(t for w, t in marks if w == "bytecount")
        line = self.daemon.wait_log(
            r"reconciled with OpenVPN: (\d+) clients \((\d+) pending\), (\d+) ipset members", timeout=10, since=mark
        )
        cap = re.search(r"proxy connection cap (\d+)", self.daemon.log_text()[mark:])
        return {
            "spawn_to_connect_s": round(t_connect - t_spawn, 4),
            "connect_to_status_s": round(t_status - t_connect, 4),
            "status_to_reconciled_s": round(t_done - t_status, 4),
            "connect_to_reconciled_s": round(t_done - t_connect, 4),
            "spawn_to_reconciled_s": round(t_done - t_spawn, 4),
            "log": {"clients": int(line.group(1)), "pending": int(line.group(2)), "members": int(line.group(3))},
            "proxy_cap": int(cap.group(1)) if cap else None,
            "pid": self.daemon.proc.pid,
        }

    # ---------------------------------------------------------------- phases

    async def _admit(self, n, batch):
        from tests.bench.mgmt_peer import cert_connect_env

        lat = []
        pending = []
        t0 = time.perf_counter()
        for i in range(n):
            cid = i
            cn = "scale-%05d" % i
            self.cn[cid] = cn
            await self.peer.connect(cid, cert_connect_env(cid, cn), timeout=10)
            lat.append(self.peer.latency_ms(cid))
            self.cids.append(cid)
            pending.append(cid)
            if len(pending) >= batch:
                self.peer.establish(pending)
                pending = []
        if pending:
            self.peer.establish(pending)
        return lat, time.perf_counter() - t0

    def admission(self):
        a = self.args
        self.log("admitting %d clients (sequential CONNECT -> client-auth)" % a.clients)
        lat, total = self.rt.run(self._admit, a.clients, 250)
        stats = summary_ms(lat)
        stats["total_s"] = round(total, 3)
        stats["per_s"] = round(a.clients / total, 1)
        # population quartiles: does latency grow with the population?
        q = max(1, len(lat) // 4)
        stats["p50_ms_by_quarter"] = [round(percentile(lat[i * q : (i + 1) * q], 50), 4) for i in range(4)]
        self.result["admission"] = stats
        self.wait_established(a.clients, 60, "after admission")
        self.check_members("after admission")
        self.result["memory"]["after_admission"] = proc_status(self.daemon.proc.pid)

    def wait_established(self, n, timeout, step):
        deadline = time.monotonic() + timeout
        while True:
            st = admin_stats(self.admin_path)
            adm = st["admission"]
            if adm["established"] == n and adm["pending"] == 0:
                break
            if time.monotonic() > deadline:
                raise BenchError("%s: daemon has %r, expected %d established" % (step, adm, n))
            time.sleep(0.1)
        if adm["mappings"] != n or adm["addresses_in_use"] != n:
            raise BenchError("%s: %d mappings / %d addresses in use, expected %d" % (step, adm["mappings"], adm["addresses_in_use"], n))
        self.result["checks"].append({"step": step, "admission": adm})
        return st

    def expected_members(self):
        addrs = {ipaddress.IPv4Address(self.peer.pushed[c]) for c in self.cids}
        if len(addrs) != len(self.cids) or len(self.peer.pushed) != len(self.cids):
            raise BenchError("pushed addresses: %d unique for %d clients" % (len(addrs), len(self.cids)))
        return addrs

    def check_members(self, step):
        from tests.bench.subprocess_ipset import kernel_members

        if self.peer.refusals:
            raise BenchError("%s: %d refusals, first %r" % (step, len(self.peer.refusals), self.peer.refusals[0]))
        expected = self.expected_members()
        actual = kernel_members(SET_NAME)
        ok = actual == expected
        self.result["checks"].append(
            {"step": step, "kernel_members": len(actual), "expected": len(expected), "equal": ok}
        )
        if not ok:
            raise BenchError(
                "%s: kernel set %s has %d members, expected %d (%d missing, %d extra)"
                % (step, SET_NAME, len(actual), len(expected), len(expected - actual), len(actual - expected))
            )
        return len(actual)

    def restart(self):
        a = self.args
        rows = []
        for cid in self.cids:
            env = self.peer._envs[cid]
            rows.append(
                {
                    "cid": cid,
                    "common_name": self.cn[cid],
                    "real_address": "%s:%s" % (env["untrusted_ip"], env["untrusted_port"]),
                    "virtual_address": self.peer.pushed[cid],
                }
            )
        self.peer.status_clients = rows
        self.log("SIGKILL the daemon (pid %d); restarting with %d clients in status 3" % (self.daemon.proc.pid, len(rows)))
        self.daemon.kill()
        t = self.start_daemon("restart")
        drift = len(re.findall(r"re-added missing ipset member", self.daemon.log_text()))
        t["members_re_added"] = drift
        self.result["restart"] = t
        if t["log"]["clients"] != a.clients or t["log"]["pending"] != 0:
            raise BenchError("restart: daemon reconciled %r, expected %d established" % (t["log"], a.clients))
        self.wait_established(a.clients, 30, "after restart")
        t["kernel_members"] = self.check_members("after restart")
        kills = [r for r in self.peer.refusals]
        if kills:
            raise BenchError("restart: the daemon refused/killed clients: %r" % kills[:3])
        self.result["memory"]["after_restart"] = proc_status(self.daemon.proc.pid)

    def subprocess_peer(self):
        """The ipset step of a client-connect script alone: ``ipset add`` forked per client, at N members."""
        a = self.args
        name = SET_NAME + "-sp"
        lines = ["create %s hash:ip family inet maxelem 65536" % name]
        lines += ["add %s %s" % (name, self.peer.pushed[c]) for c in self.cids]
        sh("ipset", "restore", input="\n".join(lines) + "\n")
        lat = []
        try:
            for i in range(a.subprocess_samples):
                ip = "10.9.250.%d" % (i % 250 + 1)
                t = time.perf_counter()
                subprocess.run(["ipset", "add", name, ip, "-exist"], check=True)
                lat.append((time.perf_counter() - t) * 1000)
        finally:
            subprocess.run(["ipset", "destroy", name], capture_output=True)
        self.result["subprocess_ipset_add"] = summary_ms(lat)

    def add_sources(self):
        a = self.args
        self.vpn_sources = [self.peer.pushed[c] for c in self.cids[: a.sources]]
        base = ipaddress.IPv4Address("10.78.0.2")
        self.peer_sources = [str(base + i) for i in range(min(a.sources, 250))]
        batch = "".join("addr add %s/32 dev %s\n" % (ip, a.client_if) for ip in self.vpn_sources + self.peer_sources)
        sh("ip", "-n", a.client_ns, "-batch", "-", input=batch)
        # The daemon's POCKETPROXY-IN closes this host to its interface except the proxy port: let
        # the peers' own REDIRECTed connections (to redsocks and the sink) in ahead of its jump.
        sh("iptables", "-w", "-I", "INPUT", "1", "-i", a.server_if, "-s", PEER_NET, "-j", "ACCEPT")
        for name in ("direct", "redsocks"):
            dport, port, sink_port = PATHS[name]
            sh("iptables", "-w", "-t", "nat", "-A", "PREROUTING", "-i", a.server_if, "-s", PEER_NET, "-d", DST_NET,
               "-p", "tcp", "--dport", str(dport), "-j", "REDIRECT", "--to-ports", str(port or sink_port))

    def plan(self):
        """M: the wanted count, or the largest multiple of S that fits the daemon's fd limit and cap."""
        a = self.args
        pid = self.daemon.proc.pid
        soft, hard = nofile_of(pid)
        fds = proc_status(pid)["fds"]
        cap = self.result["restart"]["proxy_cap"] or 0
        room = ((soft or 1 << 30) - fds - FDS_SPARE) // 2
        bounds = [("wanted", a.connections), ("daemon fds (soft %s, hard %s, %d open)" % (soft, hard, fds), room)]
        if cap:
            bounds.append(("daemon max_connections", cap))
        n, why = min((v, w) for w, v in bounds)
        step = len(self.vpn_sources)
        m = n if n == a.connections else max(step, n // step * step)
        self.result["plan"] = {
            "wanted": a.connections,
            "held": m,
            "bound": why,
            "nofile_soft": soft,
            "nofile_hard": hard,
            "daemon_fds_before": fds,
            "daemon_cap": cap,
            "limited": m < a.connections,
        }
        return m

    def hold(self, name, n, sources, checkpoints, on_checkpoint, while_held):
        dport = PATHS[name][0]
        self.gen.send(
            {
                "cmd": "hold",
                "name": name,
                "dport": dport,
                "client_connect": name == "direct",
                "n": n,
                "batch": self.args.batch,
                "sources": sources,
                "checkpoints": checkpoints,
                "timeout": 30,
            }
        )
        while True:
            msg = self.gen.read(120)
            if "checkpoint" in msg:
                on_checkpoint(msg["checkpoint"])
                self.gen.send({"cmd": "go"})
            elif "held" in msg:
                open_s = msg["open_s"]
                try:
                    extra = while_held()
                finally:
                    self.gen.send({"cmd": "release"})
                done = self.gen.read(120)
                if "released" not in done:
                    raise BenchError("%s: generator said %r after release" % (name, done))
                return open_s, extra

    def sink_open(self, ports):
        st = self.sink.command("stats")
        return sum(st["open_by_port"].get(str(p), 0) for p in ports), st

    def proxy_hold(self):
        a = self.args
        m = self.plan()
        pid = self.daemon.proc.pid
        half = m // 2 // len(self.vpn_sources) * len(self.vpn_sources) or m // 2
        points = {0: proc_status(pid)}
        device_ports = [DEVICE_PORT0 + d for d in range(a.devices)]
        self.log("holding %d proxied connections over %d client addresses (RSS checkpoint at the first batch past %d)" % (m, len(self.vpn_sources), half))

        mid = []  # the count actually held at the checkpoint (the first whole batch at or past M/2)

        def checkpoint(held):
            points[held] = proc_status(pid)
            mid.append(held)

        def while_held():
            st = proc_status(pid)
            points[m] = st
            stats = admin_stats(self.admin_path)
            sink_open, _ = self.sink_open(device_ports)
            return {"daemon": st, "stats": stats, "sink_open": sink_open}

        open_s, held = self.hold("pocketproxy", m, self.vpn_sources, [half] if 0 < half < m else [], checkpoint, while_held)
        proxy = held["stats"].get("proxy", {})
        active = proxy.get("active")
        if active != m or held["sink_open"] != m:
            raise BenchError(
                "while %d held: daemon has %s active, the devices (sink) hold %d" % (m, active, held["sink_open"])
            )
        # the daemon closes everything again (its fds return to the baseline)
        base = points[0]["fds"]
        deadline = time.monotonic() + 60
        while proc_status(pid)["fds"] > base + 2:
            if time.monotonic() > deadline:
                raise BenchError("daemon still holds %d fds 60 s after release (baseline %d)" % (proc_status(pid)["fds"], base))
            time.sleep(0.1)
        self.result["hold"] = {
            "held": m,
            "open_s": round(open_s, 3),
            "conns_s": round(m / open_s, 1),
            "points": {str(k): v for k, v in sorted(points.items())},
            "daemon_stats": held["stats"],
            "sink_open": held["sink_open"],
            "fds_after_release": proc_status(pid)["fds"],
        }
        # RSS: measured, and extrapolated to the wanted count when limited
        rss0, rssm = points[0]["rss_kib"] * 1024, points[m]["rss_kib"] * 1024
        mem = {"rss_bytes_0": rss0, "rss_bytes_held": rssm, "hwm_bytes_held": points[m]["hwm_kib"] * 1024}
        half = mid[0] if mid else None
        if half is not None and 0 < half < m:
            slope = (rssm - points[half]["rss_kib"] * 1024) / (m - half)
            mem["per_conn_bytes_half_to_full"] = round(slope)
            mem["rss_bytes_half"] = points[half]["rss_kib"] * 1024
            mem["half"] = half
        else:
            slope = (rssm - rss0) / m
        mem["per_conn_bytes_avg"] = round((rssm - rss0) / m)
        if m < a.connections:
            mem["rss_bytes_extrapolated"] = round(rssm + (a.connections - m) * slope)
            mem["extrapolated_from"] = "%d and %d held" % (half, m) if "half" in mem else "0 and %d held" % m
        self.result["rss"] = mem

    def peers_hold(self, m):
        """The direct baseline opening the same M connections the same way (generator + sink only)."""
        if "direct" not in self.args.peers:
            return
        self.log("direct baseline: holding %d connections" % m)
        open_s, _ = self.hold("direct", m, self.peer_sources, [], lambda n: None, lambda: None)
        self.result["direct_hold"] = {"held": m, "open_s": round(open_s, 3), "conns_s": round(m / open_s, 1)}

    def setup_rates(self):
        a = self.args
        from tests.bench import proxy_relays as pr

        names = ["pocketproxy"] + [p for p in ("redsocks", "direct") if p in a.peers]
        if "redsocks" in names:
            dport, port, sink_port = PATHS["redsocks"]
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            try:
                self.redsocks = pr.Redsocks(
                    "redsocks", port=port, sink_port=sink_port, tmp=self.tmp, client_ip=PEER_NET,
                    nofile=soft, conn_max=(soft - 200) // 6,
                ).start(ROOT)
            except pr.RelayError as e:
                self.result["notes"].append("redsocks not measured: %s" % e)
                names.remove("redsocks")
        out = {}
        for name in names:
            sources = self.vpn_sources if name == "pocketproxy" else self.peer_sources
            self.gen.send(
                {
                    "cmd": "setup",
                    "name": name,
                    "dport": PATHS[name][0],
                    "client_connect": name == "direct",
                    "count": a.setup_count,
                    "concurrency": a.setup_concurrency,
                    "sources": sources,
                    "timeout": 30,
                }
            )
            r = self.gen.read(300)["setup"]
            if r["error_count"] or r["count"] != a.setup_count:
                raise BenchError("setup via %s: %d of %d, errors %r" % (name, r["count"], a.setup_count, r["errors"][:3]))
            out[name] = r
            self.log("setup via %s: %.0f conn/s" % (name, r["conns_s"]))
        if self.redsocks is not None:
            self.result["redsocks_memory_after_setup"] = pr.memory(self.redsocks.pid)
        self.result["setup_rate"] = out

    def verify_path(self):
        """The sink saw exactly the CONNECTs the generator made, per path (the relays sent the original target)."""
        a = self.args
        st = self.sink.command("stats")
        connects = st["connects"]
        dev = sum(v[0] for k, v in connects.items() if int(k.split()[0]) >= DEVICE_PORT0)
        want = self.result["hold"]["held"] + (a.setup_count if "setup_rate" in self.result else 0)
        targets = {k.split()[1] for k, v in connects.items() if int(k.split()[0]) >= DEVICE_PORT0}
        check = {"device_connects": dev, "expected": want, "targets": sorted(targets), "sink_errors": st["errors"]}
        self.result["checks"].append({"step": "path", **check})
        if dev != want or targets != {"198.51.100.2:%d" % PATHS["pocketproxy"][0]}:
            raise BenchError("path: devices saw %d CONNECTs to %s, expected %d to 198.51.100.2:%d"
                             % (dev, sorted(targets), want, PATHS["pocketproxy"][0]))
        stats = admin_stats(self.admin_path)["proxy"]
        self.result["daemon_proxy_stats_end"] = stats
        refused = stats.get("refused") or {}
        upstream_errors = stats.get("upstream_errors") or {}
        if any(refused.values()) or any(upstream_errors.values()):
            raise BenchError("daemon refused %r / upstream errors %r" % (refused, upstream_errors))

    # ---------------------------------------------------------------- device health

    def health_probing(self):
        """A second daemon watching ``--health-devices`` phones (one sink port each, each its own
        exit address) at the default health settings: its CPU over ``--health-window`` s after the
        first interval (probes spread over it), against the same daemon with health off (the peer),
        every probe answered, never more than ``health.concurrency`` in flight."""
        from tests.bench.mgmt_peer import ManagementPeer
        from tests.lab.daemon import Daemon
        from proxy.health import HealthSettings

        a = self.args
        n = a.health_devices
        interval = HealthSettings().interval
        if self.daemon is not None:
            self.daemon.stop()  # the main phases are over: measure the new daemon alone
        ports = [HEALTH_PORT0 + d for d in range(n)]
        self.hsink = LineProcess(
            "hsink", [sys.executable, "-m", "tests.bench.sink", "--host", "127.0.0.1", "--ports", ",".join(map(str, ports))], self.tmp
        )
        if not self.hsink.read(30).get("ready"):
            raise BenchError("health sink did not start")
        devices = {"h%04d" % d: "http://127.0.0.1:%d" % port for d, port in enumerate(ports)}
        users = {"hu%04d" % d: {"cn": "health-%04d" % d, "device": "h%04d" % d} for d in range(n)}
        out = {"devices": n, "interval_s": interval, "window_s": a.health_window}
        for enabled in (False, True):
            mgmt = self.tmp / ("hmgmt-%d.sock" % enabled)
            admin = self.tmp / ("hadmin-%d.sock" % enabled)
            peer = self.rt.call(lambda: ManagementPeer(self.rt.reactor, mgmt).listen())
            daemon = self.hdaemon = Daemon(
                LocalSpace(), self.tmp / ("health-daemon-%d" % enabled), mgmt, users, subnet=SUBNET, server_address=SERVER_IP,
                devices=devices,
                proxy={"listen": PROXY_PORT, "splice": False},
                firewall={"ipset": SET_NAME, "chain": CHAIN, "interface": a.server_if, "maxelem": 65536, "verify_interval": 0},
                admin={"socket": str(admin)},
                metrics={"listen": "tcp:%d:interface=127.0.0.1" % HEALTH_METRICS_PORT},
                dns={"enabled": False},
                health={"enabled": enabled, "target": "http://198.51.100.4/whoami"},
            )
            daemon.start()
            daemon.wait_log(r"reconciled with OpenVPN", timeout=90)
            self.log("health %s: %d devices, waiting one interval (%.0f s) for the first probes to spread" % (
                "on" if enabled else "off (peer)", n, interval))
            f0, fs0, ft0 = cpu_seconds(daemon.proc.pid), admin_stats(admin).get("health"), time.monotonic()
            time.sleep(interval * 1.1 if enabled else 5)
            before_stats = admin_stats(admin)
            if enabled:  # the first interval: every device's first probe, each on a fresh tunnel
                fresh_probes = sum(before_stats["health"]["probes"].values()) - sum(fs0["probes"].values())
                out["first_interval"] = {"cpu_s": round(cpu_seconds(daemon.proc.pid) - f0, 4), "probes": fresh_probes,
                                         "wall_s": round(time.monotonic() - ft0, 3)}
            t0, cpu0 = time.monotonic(), cpu_seconds(daemon.proc.pid)
            time.sleep(a.health_window)
            t1, cpu1 = time.monotonic(), cpu_seconds(daemon.proc.pid)
            after_stats = admin_stats(admin)
            key = "on" if enabled else "off"
            out[key] = {"cpu_s": round(cpu1 - cpu0, 4), "wall_s": round(t1 - t0, 3), "core_pct": round(100 * (cpu1 - cpu0) / (t1 - t0), 3)}
            if enabled:
                h0, h1 = before_stats["health"], after_stats["health"]
                probes = {k: h1["probes"].get(k, 0) - h0["probes"].get(k, 0) for k in set(h0["probes"]) | set(h1["probes"])}
                out["on"].update(probes=probes, probes_per_s=round(sum(probes.values()) / (t1 - t0), 2),
                                 max_in_flight=h1["max_in_flight"], concurrency=h1["concurrency"], states=h1["devices"])
                failed = {k: v for k, v in probes.items() if k != "ok" and v}
                if failed or h1["devices"]["up"] != n:
                    raise BenchError("health probes failed %r; states %r" % (failed, h1["devices"]))
                if h1["max_in_flight"] > h1["concurrency"]:
                    raise BenchError("%d probes in flight, above health.concurrency %d" % (h1["max_in_flight"], h1["concurrency"]))
            out[key]["scrape"] = scrape_metrics(HEALTH_METRICS_PORT, SCRAPES)  # after the CPU window
            daemon.stop()
            self.rt.call(peer.stop)
        on, off, first = out["on"], out["off"], out["first_interval"]
        ok = on["probes"].get("ok", 0)
        idle_rate = off["cpu_s"] / off["wall_s"]
        out["cost_us_per_probe"] = round(1e6 * (on["cpu_s"] - idle_rate * on["wall_s"]) / ok, 1) if ok else None
        out["cost_us_per_fresh_probe"] = (
            round(1e6 * (first["cpu_s"] - idle_rate * first["wall_s"]) / first["probes"], 1) if first["probes"] else None
        )
        # Steady state: one probe in fresh_every / interval opens a new tunnel, the others reuse theirs.
        k = HealthSettings().fresh_every / interval
        if out["cost_us_per_probe"] is not None and out["cost_us_per_fresh_probe"] is not None:
            per = ((k - 1) * out["cost_us_per_probe"] + out["cost_us_per_fresh_probe"]) / k
            out["steady_core_pct"] = round(100 * (idle_rate + per * 1e-6 * n / interval), 3)
        self.result["health"] = out

    # ---------------------------------------------------------------- driver

    def run(self):
        from tests.bench.mgmt_peer import ManagementPeer

        a = self.args
        self.t_start = time.perf_counter()
        self.start_sink()
        self.start_generator()
        self.make_daemon()
        self.rt = ReactorThread()
        self.peer = self.rt.call(lambda: ManagementPeer(self.rt.reactor, self.mgmt_path).listen())
        self.log("starting the daemon (twistd, %d users)" % a.clients)
        self.result["first_start"] = self.start_daemon("first start")
        self.admission()
        self.restart()
        if a.subprocess_samples:
            self.subprocess_peer()
        self.add_sources()
        self.proxy_hold()
        self.result["memory"]["after_hold"] = proc_status(self.daemon.proc.pid)
        self.setup_rates()
        self.peers_hold(self.result["hold"]["held"])
        self.verify_path()
        # still every client admitted and every member present at the end
        self.wait_established(a.clients, 10, "end")
        self.check_members("end")
        if self.daemon.proc.poll() is not None:
            raise BenchError("daemon exited (%s)" % self.daemon.proc.returncode)
        if a.health_devices:
            self.health_probing()

    def stop(self):
        if self.hdaemon is not None and self.hdaemon.proc is not None:
            self.hdaemon.stop()
        for what in ("gen", "redsocks", "sink", "hsink"):
            obj = getattr(self, what)
            if obj is not None:
                try:
                    obj.stop()
                except Exception as e:
                    self.result["notes"].append("stopping %s: %s" % (what, e))
        if self.daemon is not None and self.daemon.proc is not None:
            self.daemon.stop()
            self.result["daemon_log_tail"] = self.daemon.tail(15).splitlines()
            warnings = [l for l in self.daemon.log_text().splitlines() if "#warn]" in l or "#error]" in l or "#critical]" in l]
            self.result["daemon_warnings"] = warnings[:40]
        if self.rt is not None:
            if self.peer is not None:
                try:
                    self.rt.call(self.peer.stop)
                except Exception:
                    pass
            self.rt.stop()


# --------------------------------------------------------------------------- report


def environment():
    import twisted

    def version(argv):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return None

    return {
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "twisted": twisted.__version__,
        "kernel": platform.release(),
        "ipset": version(["ipset", "--version"]),
        "redsocks": version(["redsocks", "-v"]),
        "cpus": os.cpu_count(),
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
    }


def mb(b):
    return b / 1e6


def rows(result, args):
    """(metric, measured, target, verdict, peer, ratio) tuples for the table."""
    out = []
    adm = result.get("admission")
    sp = result.get("subprocess_ipset_add")
    n = "{:,}".format(args.clients)
    if adm:
        ratio = "%.1fx" % (sp["p50_ms"] / adm["p50_ms"]) if sp else "-"
        out.append(("admission p50, CONNECT->client-auth (0->%s)" % n, "%.3f ms" % adm["p50_ms"], "-", "info",
                    "ipset fork alone %.3f ms" % sp["p50_ms"] if sp else "-", ratio))
        ratio = "%.1fx" % (sp["p99_ms"] / adm["p99_ms"]) if sp else "-"
        out.append(("admission p99", "%.3f ms" % adm["p99_ms"], "-", "info",
                    "ipset fork alone %.3f ms" % sp["p99_ms"] if sp else "-", ratio))
        out.append(("admission total, %s clients" % n, "%.2f s (%.0f/s)" % (adm["total_s"], adm["per_s"]), "-", "info", "-", "-"))
    rs = result.get("restart")
    if rs:
        for key, label in (("connect_to_reconciled_s", "reconcile after SIGKILL, mgmt connect->reconciled"),
                           ("spawn_to_reconciled_s", "reconcile after SIGKILL, process start->reconciled")):
            v = rs[key]
            out.append((label, "%.3f s" % v, "< %g s" % TARGET_RECONCILE_S, "PASS" if v < TARGET_RECONCILE_S else "MISS", "-", "-"))
        out.append(("ipset members after restart", "%s of %s" % ("{:,}".format(rs.get("kernel_members", 0)), n),
                    "exactly %s" % n, "OK" if rs.get("kernel_members") == args.clients else "WRONG", "-", "-"))
    plan = result.get("plan")
    hold = result.get("hold")
    if plan and hold:
        held = hold["held"]
        verdict = "LIMITED" if plan["limited"] else "OK"
        out.append(("proxied connections held at once", "{:,} of {:,}".format(held, plan["wanted"]),
                    "{:,}".format(plan["wanted"]), verdict, "-", "-"))
        dh = result.get("direct_hold")
        out.append(("setup rate opening them (batches of %d)" % args.batch, "%.0f conn/s" % hold["conns_s"], "-", "info",
                    "direct %.0f conn/s" % dh["conns_s"] if dh else "-",
                    "%.2f" % (hold["conns_s"] / dh["conns_s"]) if dh else "-"))
    sr = result.get("setup_rate")
    if sr:
        pp = sr["pocketproxy"]
        peer = sr.get("redsocks") or sr.get("direct")
        pname = "redsocks" if "redsocks" in sr else "direct"
        out.append(("setup rate connect/echo/close (%d, %d at once)" % (args.setup_count, args.setup_concurrency),
                    "%.0f conn/s" % pp["conns_s"], "-", "info",
                    "%s %.0f conn/s" % (pname, peer["conns_s"]) if peer else "-",
                    "%.2f" % (pp["conns_s"] / peer["conns_s"]) if peer else "-"))
    hp = result.get("health")
    if hp and "on" in hp:
        on, off = hp["on"], hp["off"]
        pct = on["core_pct"]
        out.append(("health probing, {:,} devices @ {:.0f} s (defaults), measured".format(hp["devices"], hp["interval_s"]),
                    "%.2f %% of a core (%.0f probes/s, %s us each)" % (pct, on["probes_per_s"], hp["cost_us_per_probe"]),
                    "< %g %%" % TARGET_HEALTH_CORE_PCT, "PASS" if pct < TARGET_HEALTH_CORE_PCT else "MISS",
                    "same daemon, health off %.2f %%" % off["core_pct"], "+%.2f pts" % (pct - off["core_pct"])))
        if hp.get("steady_core_pct") is not None:
            steady = hp["steady_core_pct"]
            out.append(("  with a fresh tunnel every 10 min (%s us each)" % hp["cost_us_per_fresh_probe"],
                        "%.2f %% of a core (computed)" % steady, "< %g %%" % TARGET_HEALTH_CORE_PCT,
                        "PASS" if steady < TARGET_HEALTH_CORE_PCT else "MISS", "-", "-"))
        if "scrape" in on:
            sc, so = on["scrape"], off.get("scrape")
            out.append(("/metrics scrape with {:,} devices ({:,} lines)".format(hp["devices"], sc["lines"]),
                        "%.0f ms" % (1000 * sc["median_s"]), "-", "info",
                        "health off %.1f ms (%d lines)" % (1000 * so["median_s"], so["lines"]) if so else "-",
                        "%.1f" % (sc["median_s"] / so["median_s"]) if so and so["median_s"] else "-"))
        out.append(("health probes in flight, most at once", "%d" % on["max_in_flight"], "<= %d" % on["concurrency"],
                    "OK" if on["max_in_flight"] <= on["concurrency"] else "WRONG", "-", "-"))
    mem = result.get("rss")
    memo = result.get("memory", {})
    if "after_restart" in memo:
        out.append(("daemon RSS, %s clients, 0 connections" % n, "%.1f MB" % mb(memo["after_restart"]["rss_kib"] * 1024),
                    "-", "info", "-", "-"))
    if mem and hold:
        held = hold["held"]
        measured_ok = mem["rss_bytes_held"] < TARGET_RSS_BYTES
        at_target = held >= args.connections
        out.append(("daemon RSS, %s clients + %s held" % (n, "{:,}".format(held)), "%.1f MB" % mb(mem["rss_bytes_held"]),
                    "< 300 MB" if at_target else "-", ("PASS" if measured_ok else "MISS") if at_target else "info", "-", "-"))
        out.append(("daemon VmHWM (peak) at that point", "%.1f MB" % mb(mem["hwm_bytes_held"]), "-", "info", "-", "-"))
        if "rss_bytes_extrapolated" in mem:
            v = mem["rss_bytes_extrapolated"]
            out.append(("daemon RSS at {:,} held (EXTRAPOLATED)".format(args.connections), "%.1f MB" % mb(v), "< 300 MB",
                        "PASS" if v < TARGET_RSS_BYTES else "MISS", "-", "-"))
        out.append(("daemon RSS per held connection", "%.1f KiB" % (mem.get("per_conn_bytes_half_to_full", mem["per_conn_bytes_avg"]) / 1024),
                    "-", "info", "-", "-"))
    return out


def report(result, args):
    env = result["environment"]
    print()
    print("environment: Python %s (%s), Twisted %s, kernel %s, %s, %s CPUs, load %s"
          % (env["python"], env["python_executable"], env["twisted"], env["kernel"], env["ipset"], env["cpus"],
             " ".join(env["loadavg_start"])))
    print("daemon: real twistd process (%s), scripted OpenVPN 2.6 management peer on a unix socket in the bench process,"
          " kernel ipset + iptables in a private namespace; MB = 10^6 B" % "pocketproxy --config")
    print()
    table = rows(result, args)
    widths = [max(len(str(r[i])) for r in table + [("metric", "measured", "target", "verdict", "peer (same run)", "ratio")])
              for i in range(6)]
    head = ("metric", "measured", "target", "verdict", "peer (same run)", "ratio")
    fmt = " | ".join("%%-%ds" % w for w in widths)
    print(fmt % head)
    print("-+-".join("-" * w for w in widths))
    for r in table:
        print(fmt % r)
    print()
    plan = result.get("plan")
    if plan and plan["limited"]:
        print("limited by hard nofile %s: held %s of %s (bound: %s; daemon cap %s, %d fds open before)"
              % (plan["nofile_hard"], "{:,}".format(plan["held"]), "{:,}".format(plan["wanted"]), plan["bound"],
                 plan["daemon_cap"], plan["daemon_fds_before"]))
        mem = result.get("rss", {})
        if "rss_bytes_extrapolated" in mem:
            print("RSS at %s is EXTRAPOLATED linearly from the points measured at %s (%.0f B per connection)"
                  % ("{:,}".format(plan["wanted"]), mem["extrapolated_from"],
                     mem.get("per_conn_bytes_half_to_full", mem["per_conn_bytes_avg"])))
    rs = result.get("restart")
    if rs:
        print("restart: process start -> management connect %.3f s, connect -> status 3 asked %.3f s, status 3 -> reconciled %.3f s;"
              " %d members re-added by the reconcile (the kernel set survives SIGKILL)"
              % (rs["spawn_to_connect_s"], rs["connect_to_status_s"], rs["status_to_reconciled_s"], rs["members_re_added"]))
    fs = result.get("first_start")
    if fs:
        print("first start (0 clients): process start -> reconciled %.3f s; the users file (%s users, %.1f MB) takes %.3f s"
              " to load (Directory.load, timed in the bench process), paid at every start before connecting"
              % (fs["spawn_to_reconciled_s"], "{:,}".format(args.clients), result["setup"]["users_file_bytes"] / 1e6,
                 result["setup"].get("users_file_load_s", float("nan"))))
    adm = result.get("admission")
    if adm:
        print("admission p50 by population quarter (ms): %s; peer 'ipset fork alone' = `ipset add` forked per client at %s members,"
              " a lower bound for a client-connect script (make bench-admission compares full stacks)"
              % (" / ".join("%.3f" % v for v in adm["p50_ms_by_quarter"]), "{:,}".format(args.clients)))
    sr = result.get("setup_rate")
    if sr:
        print("setup rate (connect, 1-byte echo, close): " + ", ".join(
            "%s %.0f conn/s p50 %.2f ms p99 %.2f ms" % (k, v["conns_s"], v["p50_ms"], v["p99_ms"]) for k, v in sr.items()))
    for note in result["notes"]:
        print("note: %s" % note)
    print("load average at end: %s" % " ".join(result.get("loadavg_end", [])))
    print()
    print("correct: %s%s" % ("yes" if result["correct"] else "NO", "" if result["correct"] else " -- " + "; ".join(result["errors"])))
    print("results: %s (%.1f s inside the namespace)" % (result["json"], result.get("duration_s", float("nan"))))


# --------------------------------------------------------------------------- inside


def inside(args):
    if in_root_namespace():
        sys.stderr.write("bench-scale: --inside refuses to run in the root network namespace\n")
        return 2
    raise_nofile()
    arm_inner_deadline(INNER_DEADLINE)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = Path(args.json) if args.json else RESULTS / ("scale-%s.json" % stamp)
    result = {
        "errors": [],
        "notes": [],
        "checks": [],
        "memory": {},
        "setup": {},
        "environment": environment(),
        "json": str(json_path),
        "parameters": {k: v for k, v in vars(args).items() if k not in ("inside",)},
        "targets": {"reconcile_s": TARGET_RECONCILE_S, "rss_bytes": TARGET_RSS_BYTES, "connections": args.connections},
    }
    tmp = tempfile.mkdtemp(prefix="ppscale-")
    bench = Scale(args, result, tmp)
    t0 = time.perf_counter()
    try:
        bench.run()
    except (BenchError, BenchTimeout) as e:
        result["errors"].append("%s: %s" % (type(e).__name__, e))
    except KeyboardInterrupt:
        result["errors"].append("interrupted")
    except Exception as e:
        import traceback

        traceback.print_exc()
        result["errors"].append("%s: %s" % (type(e).__name__, e))
    finally:
        signal.alarm(0)
        try:
            bench.stop()
        except Exception as e:
            result["errors"].append("teardown: %s: %s" % (type(e).__name__, e))
    result["duration_s"] = round(time.perf_counter() - t0, 2)
    result["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    result["correct"] = not result["errors"]
    result["table"] = [dict(zip(("metric", "measured", "target", "verdict", "peer", "ratio"), r)) for r in rows(result, args)]
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    report(result, args)
    if args.keep_tmp:
        print("kept: %s (daemon config, users file and log under daemon/)" % tmp)
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if result["correct"] else 1


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python3 -m tests.bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client-ns", help=argparse.SUPPRESS)
    parser.add_argument("--server-if", help=argparse.SUPPRESS)
    parser.add_argument("--client-if", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=5000, help="VPN clients admitted (5000)")
    parser.add_argument("--connections", type=int, default=WANT_CONNECTIONS, help="proxied connections to hold (10000)")
    parser.add_argument("--sources", type=int, default=200, help="client addresses the connections come from (200)")
    parser.add_argument("--devices", type=int, default=20, help="device proxies (ports of the sink) (20)")
    parser.add_argument("--batch", type=int, default=500, help="connections opened at once while building up the hold (500)")
    parser.add_argument("--setup-count", type=int, default=2000, help="connections in the setup-rate test (2000)")
    parser.add_argument("--setup-concurrency", type=int, default=32, help="concurrency of the setup-rate test (32)")
    parser.add_argument("--peers", default="direct,redsocks", help="peers measured in the same run (direct,redsocks; '' for none)")
    parser.add_argument("--subprocess-samples", type=int, default=200, help="`ipset add` forks timed as the admission peer (200; 0 = off)")
    parser.add_argument("--health-devices", type=int, default=2000, help="phones probed in the device health phase (2000; 0 = off)")
    parser.add_argument("--health-window", type=float, default=60.0, help="seconds of CPU measured per health run (60)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the work directory (daemon log, config, users file)")
    parser.add_argument("--json", help="where to write the JSON (default tests/bench/results/scale-<timestamp>.json)")
    args = parser.parse_args(argv)
    args.peers = [p for p in args.peers.split(",") if p]
    if not 1 <= args.sources <= min(args.clients, 250):
        parser.error("need 1 <= --sources <= min(--clients, 250)")
    if args.connections < args.sources or args.clients > 60000 or args.connections > 100000:
        parser.error("need --sources <= --connections <= 100000 and --clients <= 60000")
    if not 1 <= args.devices <= 900:
        parser.error("need 1 <= --devices <= 900")
    unknown = set(args.peers) - {"direct", "redsocks"}
    if unknown:
        parser.error("unknown peers: %s" % ", ".join(sorted(unknown)))
    if args.inside:
        return inside(args)
    passthrough = [a for a in argv if a != "--inside"]
    return outer(args, passthrough)


if __name__ == "__main__":
    sys.exit(main())
