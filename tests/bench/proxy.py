"""Relay benchmark: pocketproxy vs redsocks vs socat on the same REDIRECT path.

``make bench-proxy`` (``python3 -m tests.bench.proxy``, as root) creates a
private network namespace and re-runs this module inside it with
``--inside``; the veth pair, the route, the REDIRECT rules, every relay, the
sink and the load generator exist only there, and the namespace is deleted in
a ``finally`` (also on failure, Ctrl-C or SIGTERM).

Path, the same for every relay: the generator (source 10.77.0.1) connects to
198.51.100.x:<port per relay>; ``nat OUTPUT`` REDIRECTs that SYN to the
relay's port on 127.0.0.1. pocketproxy and redsocks read SO_ORIGINAL_DST and
send ``CONNECT 198.51.100.x:<port>`` to the sink (:mod:`tests.bench.sink`);
socat is a plain forwarder and the client sends the CONNECT line itself; the
``direct`` baseline is REDIRECTed straight to the sink. The sink plays
count/echo/banner by the target's last octet.

Measured per relay, side by side in one run (method of §8 of the transparent
proxy notes): 1-stream and 64-stream upload throughput (1 MiB sends, SHUT_WR,
byte count verified), relay CPU per GiB (``/proc/<pid>/stat`` over the process
tree), connection setup rate (1-byte echo each), connect → first banner byte,
and RSS/fds with idle proxied connections: 10,000, or per relay the largest
multiple of 500 that fits RLIMIT_NOFILE in every process (relay, generator,
sink) when the limit cannot be raised that far. Every connection is
checked end to end; afterwards the REDIRECT rule counters and the sink's
per-target CONNECT counts must equal the number of connections made. Exit 1 if
any check failed.
"""

import argparse
import json
import os
import platform
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.namespace_run import BenchTimeout, arm_inner_deadline, raise_nofile

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "tests" / "bench" / "results"
OUTER_TIMEOUT = 900  # hard limit for the whole inner run (default mode takes about 1 minute)
INNER_DEADLINE = 870
NOFILE = 262144  # wanted: > 10,000 idle × 6 fds (redsocks splice: 2 sockets + 2 pipes) with room to spare
IDLE_TARGET = 10000  # the "10,000 idle proxied connections under 150 MB RSS"
IDLE_TARGET_RSS_BYTES = 150 * 10**6  # MB = 10^6 B, as in MB/s
IDLE_STEP = 500  # N per relay is a multiple of this when a limit caps it
FDS_SPARE = 256  # fds left free in every process at the chosen N (as proxy.server.FDS_RESERVED)
REDSOCKS_FDS = 6  # redsocks with splice (its default): 2 sockets + 2 pipes per connection, even idle
FORKED_CHILD_KIB = 1024  # MemAvailable budget per forked relay child (socat: ~60 KiB PSS each measured)

CLIENT_IP = "10.77.0.1"
GATEWAY_IP = "10.77.0.2"
DST_NET = "198.51.100.0/24"
VETH = ("ppbxa", "ppbxb")

# name: (destination port the generator dials, relay listen port, sink port)
PORTS = {
    "direct": (5000, None, 9000),
    "pocketproxy": (5001, 12001, 9001),
    "redsocks": (5002, 12002, 9002),
    "socat": (5003, 12003, 9003),
    "pocketproxy-nosplice": (5004, 12004, 9004),
    "redsocks-nosplice": (5005, 12005, 9005),
    "socat-b128k": (5006, 12006, 9006),
}
DEFAULT_RELAYS = ("direct", "pocketproxy", "redsocks", "socat")
BASELINE = "redsocks"


class BenchError(Exception):
    """The run was incorrect."""


# --------------------------------------------------------------------------- outer part


def outer(args, passthrough):
    if os.geteuid() != 0:
        sys.stderr.write("bench-proxy: needs root (network namespace, iptables REDIRECT)\n")
        return 2

    from tests.bench.namespace_run import run_inside

    return run_inside("bench-proxy", "bpx", "tests.bench.proxy", passthrough, OUTER_TIMEOUT)


# --------------------------------------------------------------------------- inside: setup


def in_root_namespace():
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return False


def sh(*argv):
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30)


def setup_network(relays):
    """Inside our namespace only: sysctls, veth pair, route to DST_NET, one REDIRECT per relay."""
    for path, value in (
        ("net/ipv4/ip_local_port_range", "1024 65000"),
        ("net/ipv4/tcp_tw_reuse", "1"),
        ("net/core/somaxconn", "8192"),
    ):
        Path("/proc/sys", path).write_text(value)
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "link", "add", VETH[0], "type", "veth", "peer", "name", VETH[1])
    sh("ip", "addr", "add", CLIENT_IP + "/24", "dev", VETH[0])
    sh("ip", "link", "set", VETH[0], "up")
    sh("ip", "link", "set", VETH[1], "up")
    sh("ip", "route", "add", DST_NET, "via", GATEWAY_IP, "dev", VETH[0])
    for name in relays:
        dport, port, sink_port = PORTS[name]
        sh(
            "iptables",
            "-w",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            DST_NET,
            "--dport",
            str(dport),
            "-j",
            "REDIRECT",
            "--to-ports",
            str(port or sink_port),
        )


def redirect_counts():
    """Packets matched per REDIRECT rule, by destination port: nat sees only a connection's first packet."""
    out = subprocess.run(
        ["iptables", "-w", "-t", "nat", "-L", "OUTPUT", "-n", "-v", "-x"], capture_output=True, text=True, timeout=30
    ).stdout
    counts = {}
    for line in out.splitlines():
        parts = line.split()
        if "REDIRECT" in parts:
            for p in parts:
                if p.startswith("dpt:"):
                    counts[int(p[4:])] = int(parts[0])
    return counts


class SinkProcess:
    """The sink, driven over its stdin/stdout line protocol."""

    def __init__(self, ports, tmp):
        self.stderr = open(Path(tmp) / "sink.stderr", "wb")
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.sink", "--ports", ",".join(str(p) for p in ports)],
            cwd=str(ROOT),
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            start_new_session=True,
        )
        self._buf = b""
        ready = self._line(15)
        if not ready.get("ready"):
            raise BenchError("sink did not start: %r" % ready)

    @property
    def pid(self):
        return self.proc.pid

    def _line(self, timeout):
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise BenchError("sink did not answer within %ds" % timeout)
            chunk = os.read(fd, 65536)
            if not chunk:
                raise BenchError("sink exited (%s)" % self.proc.poll())
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def command(self, cmd, timeout=15):
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()
        return self._line(timeout)

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.stderr.close()


def pocketproxy_max_connections(splice, idle):
    """``--max-connections`` for the runner: None (the product default) unless ``idle`` connections exceed it.

    With splice on, pocketproxy derives its cap from RLIMIT_NOFILE at 3 fds per connection (a spliced
    connection holds 2 pipes more); idle connections are never spliced and hold 2, so the idle test may
    raise the cap to what the product derives for 2 fds each. The relay runs at the same hard limit as we do.
    """
    from proxy.server import fd_derived_limit

    if idle <= fd_derived_limit(splice):
        return None
    return fd_derived_limit(False)


def make_relay(name, tmp, idle=0):
    from tests.bench import proxy_relays as pr

    dport, port, sink_port = PORTS[name]
    common = dict(port=port, sink_port=sink_port, tmp=tmp, client_ip=CLIENT_IP)
    if name.startswith("pocketproxy"):
        splice = name == "pocketproxy"
        return pr.PocketProxy(
            name,
            python=pr.python_for_pocketproxy(),
            splice=splice,
            max_connections=pocketproxy_max_connections(splice, idle),
            **common,
        )
    if name.startswith("redsocks"):
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        splice = False if name.endswith("nosplice") else None
        per = 2 if splice is False else REDSOCKS_FDS
        return pr.Redsocks(name, splice=splice, nofile=nofile, conn_max=(nofile - 200) // per, **common)
    if name.startswith("socat"):
        return pr.Socat(name, buffer=131072 if name.endswith("b128k") else None, **common)
    raise ValueError(name)


# --------------------------------------------------------------------------- inside: measurements


class Bench:
    """Runs every phase for every relay, recording results and errors per relay."""

    def __init__(self, args, result, relays, sink, targets):
        self.args = args
        self.result = result
        self.relays = relays  # name -> Relay (no entry for direct)
        self.sink = sink
        self.targets = targets  # name -> Target
        self.expected = {name: {} for name in targets}  # name -> {ip: connections}
        self.broken = {}  # name -> first error

    def log(self, text):
        sys.stderr.write("[bench-proxy %6.1fs] %s\n" % (time.monotonic() - self.result["_t0"], text))
        sys.stderr.flush()

    def rec(self, name):
        return self.result["relays"].setdefault(name, {})

    def expect(self, name, ip, n):
        self.expected[name][ip] = self.expected[name].get(ip, 0) + n

    def fail(self, name, phase, err):
        text = "%s/%s: %s: %s" % (name, phase, type(err).__name__, err)
        self.log("ERROR " + text)
        self.result["errors"].append(text)
        relay = self.relays.get(name)
        if relay is not None and not relay.alive():
            self.broken.setdefault(name, text)
            self.result["errors"].append("%s died: %s" % (name, relay.stderr_tail(600)))

    def names(self):
        return [n for n in self.targets if n not in self.broken]

    def cpu(self, name):
        relay = self.relays.get(name)
        if relay is None:
            return None
        relay.settle(timeout=10)
        return relay.cpu()

    def measured(self, name, phase, fn, *expect):
        """Run ``fn()`` with the relay's (and sink's, and our own) CPU measured around it."""
        from tests.bench.proxy_relays import cpu_seconds

        relay = self.relays.get(name)
        c0 = self.cpu(name)
        s0 = cpu_seconds(self.sink.pid)
        g0 = resource.getrusage(resource.RUSAGE_SELF)
        try:
            for ip, n in expect:
                self.expect(name, ip, n)
            out = fn()
        except Exception as e:
            self.fail(name, phase, e)
            return None
        c1 = self.cpu(name)
        g1 = resource.getrusage(resource.RUSAGE_SELF)
        out["sink_cpu_s"] = cpu_seconds(self.sink.pid) - s0
        out["generator_cpu_s"] = (g1.ru_utime + g1.ru_stime) - (g0.ru_utime + g0.ru_stime)
        if relay is not None:
            out["relay_cpu_s"] = c1 - c0
            if not relay.alive():
                self.fail(name, phase, BenchError("relay process exited"))
                return None
        return out

    # ---------------------------------------------------------------- phases

    def smoke(self):
        """One of each exchange per relay before anything is timed; a relay failing here is skipped."""
        from tests.bench import proxy_load as pl

        for name in list(self.targets):
            t = self.targets[name]
            try:
                self.expect(name, pl.COUNT_IP, 1)
                pl.upload(t, 1, 1 << 20, self.args.timeout)
                self.expect(name, pl.ECHO_IP, 1)
                r = pl.setup_rate(t, 1, 1, self.args.timeout)
                if r["error_count"]:
                    raise BenchError(r["errors"][0])
                self.expect(name, pl.BANNER_IP, 1)
                pl.ttfb(t, 1, 0, self.args.timeout)
            except Exception as e:
                self.fail(name, "smoke", e)
                self.broken.setdefault(name, "smoke test failed: %s" % e)

    def throughput(self, key, streams, per_stream):
        from tests.bench import proxy_load as pl

        for run in range(self.args.runs):
            for name in self.names():
                out = self.measured(
                    name,
                    key,
                    lambda: pl.upload(self.targets[name], streams, per_stream, self.args.timeout),
                    (pl.COUNT_IP, streams),
                )
                if out is None:
                    continue
                gib = out["bytes"] / (1 << 30)
                if "relay_cpu_s" in out:
                    out["relay_cpu_s_per_gib"] = out["relay_cpu_s"] / gib
                    out["relay_core_pct"] = 100 * out["relay_cpu_s"] / out["seconds"]
                out["sink_cpu_s_per_gib"] = out["sink_cpu_s"] / gib
                self.rec(name).setdefault(key, {"runs": []})["runs"].append(out)
                self.log(
                    "%-22s %s run %d: %8.1f MB/s%s"
                    % (
                        name,
                        key,
                        run + 1,
                        out["mb_s"],
                        ", relay %.2f CPU-s/GiB" % out["relay_cpu_s_per_gib"] if "relay_cpu_s" in out else "",
                    )
                )
        for name in self.names():
            entry = self.rec(name).get(key)
            if entry:
                runs = entry["runs"]
                entry["mb_s"] = statistics.median(r["mb_s"] for r in runs)
                if "relay_cpu_s" in runs[0]:
                    entry["relay_cpu_s_per_gib"] = statistics.median(r["relay_cpu_s_per_gib"] for r in runs)
                    entry["relay_core_pct"] = statistics.median(r["relay_core_pct"] for r in runs)

    def setup(self):
        from tests.bench import proxy_load as pl

        a = self.args
        for name in self.names():
            t = self.targets[name]
            self.expect(name, pl.ECHO_IP, a.setup_warmup)
            try:
                pl.setup_rate(t, a.setup_warmup, a.concurrency, a.timeout)
            except Exception as e:
                self.fail(name, "setup warm-up", e)
                continue
            out = self.measured(
                name, "setup", lambda: pl.setup_rate(t, a.setup, a.concurrency, a.timeout), (pl.ECHO_IP, a.setup)
            )
            if out is None:
                continue
            if out["error_count"]:
                self.fail(
                    name,
                    "setup",
                    BenchError("%d connections failed, first: %s" % (out["error_count"], out["errors"][0])),
                )
            if "relay_cpu_s" in out and out["count"]:
                out["relay_cpu_us_per_conn"] = 1e6 * out["relay_cpu_s"] / out["count"]
            self.rec(name)["setup"] = out
            self.log("%-22s setup: %7.0f conn/s, p50 %.3f ms" % (name, out["conns_s"], out["p50_ms"]))

    def first_byte(self):
        from tests.bench import proxy_load as pl

        a = self.args
        for name in self.names():
            t = self.targets[name]
            out = self.measured(
                name,
                "ttfb",
                lambda: pl.ttfb(t, a.ttfb, a.ttfb_warmup, a.timeout),
                (pl.BANNER_IP, a.ttfb + a.ttfb_warmup),
            )
            if out is not None:
                self.rec(name)["ttfb"] = out
                self.log("%-22s first byte: p50 %.3f ms, p99 %.3f ms" % (name, out["p50_ms"], out["p99_ms"]))

    def idle_plan(self, relay):
        """N for one relay: the wanted count, or the largest multiple of IDLE_STEP with which every process
        holding these connections stays within its own RLIMIT_NOFILE (FDS_SPARE left free): the relay at
        its fds per idle connection, the generator (this process) and the sink at 1 each. A relay that forks
        per connection (socat) is bounded by the processes that may still be forked instead; a relay with a
        connection cap of its own by that cap."""
        from tests.bench.proxy_relays import process_budget, process_fds

        nofile = self.result["nofile"]

        def room(base, per):
            return (nofile - base - FDS_SPARE) // per

        bounds = {
            "generator fds (1/conn)": room(process_fds(os.getpid()), 1),
            "sink fds (1/conn)": room(process_fds(self.sink.pid), 1),
        }
        if relay.forks_per_conn:
            n, what = process_budget(FORKED_CHILD_KIB)
            bounds["processes (%s)" % what] = n
        else:
            bounds["relay fds (%d/conn)" % relay.idle_fds_per_conn] = room(
                process_fds(relay.pid), relay.idle_fds_per_conn
            )
        if relay.max_connections:
            bounds["relay max_connections"] = relay.max_connections
        fit, bound = min((max(0, b) // IDLE_STEP * IDLE_STEP, what) for what, b in bounds.items())
        wanted = self.args.idle
        return {
            "n": min(wanted, fit),
            "wanted": wanted,
            "capped": fit < wanted,
            "bound_by": bound if fit < wanted else "wanted",
            "nofile": nofile,
            "relay_fds_per_conn": relay.idle_fds_per_conn,
            "relay_forks_per_conn": relay.forks_per_conn,
            "bounds": bounds,
        }

    def idle(self):
        from tests.bench import proxy_load as pl
        from tests.bench.proxy_relays import process_fds

        a = self.args
        for name in self.names():
            relay = self.relays.get(name)
            if relay is None:
                continue
            t = self.targets[name]
            relay.settle(timeout=10)
            sink_port = str(PORTS[name][2])
            deadline = time.monotonic() + 10
            while self.sink.command("stats")["open_by_port"].get(sink_port) and time.monotonic() < deadline:
                time.sleep(0.05)  # earlier connections of this relay still closing
            plan = self.idle_plan(relay)
            n = plan["n"]
            if n <= 0:
                self.rec(name)["idle"] = {"plan": plan, "skipped": "no idle connection fits (%s)" % plan["bound_by"]}
                self.log("%-22s idle: skipped, nothing fits (%s)" % (name, plan["bound_by"]))
                continue
            before = relay.memory()
            main_fds = process_fds(relay.pid)
            sink_before = self.sink.command("stats")["open_by_port"].get(sink_port, 0)
            self.log(
                "%-22s idle: %d connections (%s; RLIMIT_NOFILE %d)"
                % (name, n, "capped by " + plan["bound_by"] if plan["capped"] else "as wanted", plan["nofile"])
            )

            def while_held():
                time.sleep(0.5)
                mem = relay.memory()
                mem["sink_open"] = self.sink.command("stats")["open_by_port"].get(sink_port, 0) - sink_before
                if relay.kind == "pocketproxy":
                    mem["proxy_stats"] = relay.stats()
                return mem

            half = {}

            def progress(count):
                if count <= a.idle_batch:
                    # N was chosen for the declared fds per connection: stop before EMFILE if that is wrong
                    per = (process_fds(relay.pid) - main_fds) / count
                    if per > relay.idle_fds_per_conn + 0.05:
                        raise BenchError(
                            "relay holds %.2f fds per idle connection in one process, N=%d was chosen for %d"
                            % (per, n, relay.idle_fds_per_conn)
                        )
                if not half and count >= n // 2:
                    half.update(relay.memory(), connections=count)

            self.expect(name, pl.ECHO_IP, n)
            try:
                opened, held = pl.hold_idle(t, n, a.idle_batch, a.timeout, while_held, progress)
            except Exception as e:
                self.fail(name, "idle", e)
                relay.settle(timeout=30, fds=before["fds"])
                continue
            t_close = time.perf_counter()
            settled = relay.settle(timeout=60, fds=before["fds"])
            after = relay.memory()
            out = {
                "connections": n,
                "plan": plan,
                "open_seconds": opened,
                "before": before,
                "held": held,
                "after_close": after,
                "close_seconds": time.perf_counter() - t_close,
                "released": settled,
                "rss_kib_per_conn": (held["rss_kib"] - before["rss_kib"]) / n,
                "pss_kib_per_conn": (held["pss_kib"] - before["pss_kib"]) / n,
                "fds_per_conn": (held["fds"] - before["fds"]) / n,
                "half": half,
            }
            if plan["capped"] and n < IDLE_TARGET:
                # linear extrapolation to 10,000 with the larger of the average and the marginal N/2 -> N cost
                rss_slope, pss_slope = out["rss_kib_per_conn"], out["pss_kib_per_conn"]
                if half and half["connections"] < n:
                    out["rss_kib_per_conn_marginal"] = (held["rss_kib"] - half["rss_kib"]) / (n - half["connections"])
                    out["pss_kib_per_conn_marginal"] = (held["pss_kib"] - half["pss_kib"]) / (n - half["connections"])
                    rss_slope = max(rss_slope, out["rss_kib_per_conn_marginal"])
                    pss_slope = max(pss_slope, out["pss_kib_per_conn_marginal"])
                out["rss_kib_at_10000_extrapolated"] = before["rss_kib"] + IDLE_TARGET * rss_slope
                out["pss_kib_at_10000_extrapolated"] = before["pss_kib"] + IDLE_TARGET * pss_slope
            self.rec(name)["idle"] = out
            if held["sink_open"] != n:
                self.fail(name, "idle", BenchError("sink held %d connections, expected %d" % (held["sink_open"], n)))
            if not settled:
                self.fail(
                    name,
                    "idle",
                    BenchError(
                        "relay fds did not return to %d within 60 s of closing (now %d, %d processes)"
                        % (before["fds"], after["fds"], after["processes"])
                    ),
                )
            if not relay.alive():
                self.fail(name, "idle", BenchError("relay process exited"))
            self.log(
                "%-22s idle %d: RSS %.1f MiB (%+.2f KiB/conn), %d fds, opened in %.1f s, fds back to %d in %.1f s"
                % (
                    name,
                    n,
                    held["rss_kib"] / 1024,
                    out["rss_kib_per_conn"],
                    held["fds"],
                    opened,
                    after["fds"],
                    out["close_seconds"],
                )
            )

    def profile(self):
        """cProfile pocketproxy's reactor over the per-connection path (setup + first byte); not timed."""
        from tests.bench import proxy_load as pl

        a = self.args
        for name, relay in self.relays.items():
            if relay.kind != "pocketproxy" or name in self.broken:
                continue
            t = self.targets[name]
            relay.profile()
            try:
                self.expect(name, pl.ECHO_IP, a.setup)
                out = pl.setup_rate(t, a.setup, a.concurrency, a.timeout)
                self.expect(name, pl.BANNER_IP, a.ttfb)
                lat = pl.ttfb(t, a.ttfb, 0, a.timeout)
            except Exception as e:
                self.fail(name, "profile", e)
                continue
            finally:
                text = relay.profile()
            path = RESULTS / ("proxy-profile-%s.txt" % name)
            path.write_text(
                "cProfile of %s's reactor: %d connections (%d concurrent, connect + 1-byte echo + close; %.0f conn/s"
                " under the profiler), then %d sequential first-byte connections (p50 %.3f ms under the profiler)\n\n%s"
                % (name, a.setup, a.concurrency, out["conns_s"], a.ttfb, lat["p50_ms"], text or "(no report)")
            )
            self.rec(name)["profile"] = str(path)
            raw = relay.tmp / ("%s.profile.txt.pstats" % name)
            if raw.exists():  # the raw pstats, for views the text leaves out (callers of anything)
                shutil.copyfile(raw, path.with_suffix(".pstats"))
            self.log("%-22s profile written to %s" % (name, path))

    def verify(self):
        """REDIRECT counters and sink CONNECT targets must equal what we made, relay by relay."""
        counts = redirect_counts()
        connects = self.sink.command("stats")
        self.result["sink_stats"] = connects
        self.result["redirect_packets"] = counts
        by_port = {}
        for key, (n, _) in connects["connects"].items():
            port, target = key.split(" ", 1)
            by_port.setdefault(int(port), {})[target] = n
        for name, target in self.targets.items():
            dport, _, sink_port = PORTS[name]
            want_total = sum(self.expected[name].values())
            seen = by_port.get(sink_port, {})
            want = {"%s:%d" % (ip, dport): n for ip, n in self.expected[name].items()}
            check = {
                "connections": want_total,
                "redirected": counts.get(dport),
                "sink_targets": seen,
            }
            self.rec(name)["path"] = check
            if name in self.broken or any(e.startswith(name + "/") for e in self.result["errors"]):
                continue  # counts are meaningless after a failed phase; the error is already recorded
            if counts.get(dport) != want_total:
                self.fail(
                    name,
                    "verify",
                    BenchError(
                        "REDIRECT rule for port %d matched %s connections, made %d"
                        % (dport, counts.get(dport), want_total)
                    ),
                )
            if seen != want:
                self.fail(name, "verify", BenchError("sink saw CONNECT targets %r, expected %r" % (seen, want)))
        if connects.get("errors"):
            self.result["errors"].append("sink errors: %r" % connects["errors"])
        for name, relay in self.relays.items():
            if relay.kind == "pocketproxy" and relay.alive():
                stats = relay.stats()
                self.rec(name)["proxy_stats"] = stats
                want_total = sum(self.expected[name].values())
                failed = any(e.startswith(name + "/") for e in self.result["errors"])
                if stats is not None and name not in self.broken and not failed:
                    bad = {k: stats.get(k) for k in ("refused", "upstream_errors") if stats.get(k)}
                    if bad or stats.get("accepted") != want_total or stats.get("relayed") != want_total:
                        self.fail(
                            name,
                            "verify",
                            BenchError(
                                "proxy counted accepted=%s relayed=%s %r for %d connections"
                                % (stats.get("accepted"), stats.get("relayed"), bad, want_total)
                            ),
                        )


# --------------------------------------------------------------------------- inside: run + report


def environment():
    import twisted

    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(argv, pick):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return pick((out.stdout + out.stderr).splitlines())
        except (OSError, subprocess.SubprocessError, IndexError):
            return "?"

    pp_twisted = version(
        ["/usr/bin/python3", "-c", "import sys, twisted; print(sys.version.split()[0], twisted.__version__)"],
        lambda lines: lines[0],
    )
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "pocketproxy_python_twisted": pp_twisted,
        "redsocks": version(["redsocks", "-v"], lambda lines: lines[0]),
        "socat": version(["socat", "-V"], lambda lines: [l for l in lines if "socat version" in l][0].split(" on ")[0]),
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
        "fs_nr_open": _read(Path("/proc/sys/fs/nr_open")),
    }


def _read(path):
    try:
        return path.read_text().strip()
    except OSError:
        return None


def run_inside(args, result, tmp):
    from tests.bench import proxy_load as pl

    names = list(args.relays)
    setup_network(names)
    sink = SinkProcess(sorted({PORTS[n][2] for n in names}), tmp)
    relays = {}
    try:
        bench = Bench(
            args,
            result,
            relays,
            sink,
            {n: pl.Target(n, PORTS[n][0], n == "direct" or n.startswith("socat")) for n in names},
        )
        for name in names:
            if name == "direct":
                continue
            relay = make_relay(name, tmp, args.idle)
            relays[name] = relay
            try:
                relay.start(ROOT)
            except Exception as e:
                bench.fail(name, "start", e)
                bench.broken[name] = "did not start: %s" % e
        bench.log("relays up: %s; sink pid %d" % (", ".join("%s=%d" % (n, r.pid) for n, r in relays.items()), sink.pid))
        bench.smoke()
        a = args
        bench.log("throughput, 1 stream × %d MiB, %d run(s)" % (a.single_mib, a.runs))
        bench.throughput("single", 1, a.single_mib << 20)
        per = (a.multi_mib << 20) // a.streams
        bench.log("throughput, %d streams × %d MiB, %d run(s)" % (a.streams, per >> 20, a.runs))
        bench.throughput("multi", a.streams, per)
        bench.log("connection setup, %d connections, %d concurrent" % (a.setup, a.concurrency))
        bench.setup()
        bench.log("time to first byte, %d samples" % a.ttfb)
        bench.first_byte()
        result["environment"]["loadavg_timed_end"] = open("/proc/loadavg").read().split()[:3]
        if a.idle:
            bench.log(
                "idle connections: %d per relay, or the most that fit RLIMIT_NOFILE %d in every process"
                % (a.idle, result["nofile"])
            )
            bench.idle()
        if a.profile:
            bench.profile()
        bench.verify()
        for name, relay in relays.items():
            result["relays"].setdefault(name, {})["stderr"] = relay.stderr_tail(2000)
        result["broken"] = bench.broken
    finally:
        for relay in relays.values():
            relay.stop()
        sink.stop()


def fmt(value, spec):
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return spec % value


def report(result, args):
    env = result["environment"]
    names = list(args.relays)
    rel = result["relays"]
    print()
    print(
        "machine: %s CPUs (%s), kernel %s; bench Python %s, Twisted %s; pocketproxy on /usr/bin/python3 %s; %s; %s"
        % (
            env["cpus"],
            env["cpu"],
            env["kernel"],
            env["python"],
            env["twisted"],
            env["pocketproxy_python_twisted"],
            env["redsocks"],
            env["socat"],
        )
    )
    print(
        "method: generator, relays and sink share the cores, one network namespace; every relay behind nat OUTPUT"
        " REDIRECT; MB/s = 10^6 B/s; relay CPU from /proc/<pid>/stat over the process tree; %s"
        % ("medians of %d runs" % args.runs if args.runs > 1 else "1 run (--quick)")
    )
    print()

    def get(name, *path):
        v = rel.get(name, {})
        for p in path:
            if not isinstance(v, dict):
                return None
            v = v.get(p)
        return v

    mib = lambda kib: kib / 1024 if kib is not None else None  # noqa: E731
    same_n = "same N"  # ratio only where the relay held as many idle connections as the baseline
    rows = [
        ("1 stream, MB/s", lambda n: get(n, "single", "mb_s"), "%.0f", True),
        ("1 stream, relay CPU-s/GiB", lambda n: get(n, "single", "relay_cpu_s_per_gib"), "%.2f", True),
        ("1 stream, relay % of a core", lambda n: get(n, "single", "relay_core_pct"), "%.0f", False),
        ("%d streams, MB/s" % args.streams, lambda n: get(n, "multi", "mb_s"), "%.0f", True),
        ("%d streams, relay CPU-s/GiB" % args.streams, lambda n: get(n, "multi", "relay_cpu_s_per_gib"), "%.2f", True),
        ("%d streams, relay %% of a core" % args.streams, lambda n: get(n, "multi", "relay_core_pct"), "%.0f", False),
        ("setup, connections/s", lambda n: get(n, "setup", "conns_s"), "%.0f", True),
        ("setup, p50 ms", lambda n: get(n, "setup", "p50_ms"), "%.3f", True),
        ("setup, relay CPU µs/conn", lambda n: get(n, "setup", "relay_cpu_us_per_conn"), "%.0f", True),
        ("first byte, p50 ms", lambda n: get(n, "ttfb", "p50_ms"), "%.3f", True),
        ("first byte, p99 ms", lambda n: get(n, "ttfb", "p99_ms"), "%.3f", True),
        ("idle connections held (N)", lambda n: get(n, "idle", "connections"), "%d", False),
        ("idle, RSS MiB at N", lambda n: mib(get(n, "idle", "held", "rss_kib")), "%.1f", same_n),
        ("idle, RSS KiB/conn at N", lambda n: get(n, "idle", "rss_kib_per_conn"), "%.2f", True),
        ("idle, PSS MiB at N", lambda n: mib(get(n, "idle", "held", "pss_kib")), "%.1f", same_n),
        ("idle, fds at N", lambda n: get(n, "idle", "held", "fds"), "%d", same_n),
        ("idle, fds/conn", lambda n: get(n, "idle", "fds_per_conn"), "%.2f", True),
        ("idle, processes at N", lambda n: get(n, "idle", "held", "processes"), "%d", False),
        (
            "10,000 idle, RSS MiB, extrapolated",
            lambda n: mib(get(n, "idle", "rss_kib_at_10000_extrapolated")),
            "%.1f",
            True,
        ),
        (
            "10,000 idle, PSS MiB, extrapolated",
            lambda n: mib(get(n, "idle", "pss_kib_at_10000_extrapolated")),
            "%.1f",
            True,
        ),
    ]
    others = [n for n in names if n not in ("direct", BASELINE)]
    ratio_cols = ["%s/%s" % (n, BASELINE) for n in others] if BASELINE in names else []
    w0 = max(len(r[0]) for r in rows) + 1
    widths = [max(9, len(n)) for n in names]
    header = "%-*s" % (w0, "") + " | ".join("%*s" % (w, n) for w, n in zip(widths, names))
    if ratio_cols:
        header += " || " + " | ".join(ratio_cols)
    print(header)
    print("-" * len(header))
    held_n = {n: get(n, "idle", "connections") for n in names}
    for label, pick, spec, with_ratio in rows:
        values = {n: pick(n) for n in names}
        if all(v is None for v in values.values()):
            continue
        line = "%-*s" % (w0, label) + " | ".join("%*s" % (w, fmt(values[n], spec)) for w, n in zip(widths, names))
        if ratio_cols:
            cells = []
            base = values.get(BASELINE)
            for n, col in zip(others, ratio_cols):
                v = values.get(n)
                ok = with_ratio is True or (with_ratio == same_n and held_n[n] == held_n.get(BASELINE))
                cells.append("%*s" % (len(col), "%.2fx" % (v / base) if ok and v is not None and base else "-"))
            line += " || " + " | ".join(cells)
        print(line)
    print()
    notes = []
    for name in names:
        if name in result.get("broken", {}):
            notes.append("%s: skipped after failure: %s" % (name, result["broken"][name]))
    if get("direct", "single", "runs"):
        notes.append(
            "direct = generator -> REDIRECT -> sink, no relay: the ceiling of this generator and sink"
            " (sink %.2f CPU-s/GiB single stream)" % get("direct", "single", "runs")[0]["sink_cpu_s_per_gib"]
        )
    notes.append(
        "setup = %s connections, %d concurrent, each connect + 1-byte echo + close (%d warm-up first);"
        " first byte = connect() -> first banner byte, %d sequential samples on a non-sniffed port"
        % (format(args.setup, ","), args.concurrency, args.setup_warmup, args.ttfb)
    )
    notes += idle_notes(result, names, get)
    notes.append(
        "socat forks one child per connection: its CPU includes the reaped children (cutime/cstime), its RSS/PSS/fds"
        " are summed over the process tree; socat and direct clients send the CONNECT line themselves, and their"
        " first-byte time includes that round trip"
    )
    paths = []
    for n in names:
        p = get(n, "path")
        if p:
            targets = ", ".join("%s ×%d" % (t, c) for t, c in sorted(p["sink_targets"].items()))
            paths.append("%s %s/%s (%s)" % (n, p["redirected"], p["connections"], targets))
    if paths:
        notes.append(
            "path check, REDIRECT matches / connections made (CONNECT targets the sink saw): " + "; ".join(paths)
        )
    for n in names:
        st = get(n, "proxy_stats")
        if st:
            notes.append(
                "%s counters: accepted %s, relayed %s, refused %s, upstream errors %s, sniffed %s, max_connections %s,"
                " splice %s"
                % (
                    n,
                    st.get("accepted"),
                    st.get("relayed"),
                    st.get("refused") or 0,
                    st.get("upstream_errors") or 0,
                    st.get("sniffed"),
                    st.get("max_connections"),
                    st.get("splice_stats") or st.get("splice"),
                )
            )
    for note in notes:
        print("  " + note)
    print()
    ok = result["correct"]
    print("correct: %s%s" % ("yes" if ok else "NO", "" if ok else "\n  - " + "\n  - ".join(result["errors"])))
    print(
        "results: %s (%.0f s inside the namespace; load average %s at start, %s after the timed phases, %s at end,"
        " after the idle phase's processes)"
        % (
            result.get("json"),
            result.get("duration_s", float("nan")),
            " ".join(env.get("loadavg_start", [])),
            " ".join(env.get("loadavg_timed_end", ["-"])),
            " ".join(env.get("loadavg_end", [])),
        )
    )


def idle_notes(result, names, get):
    """How N was chosen per relay, what the 10,000 rows are, and the issue's idle-memory target."""
    plans = {n: get(n, "idle", "plan") for n in names if get(n, "idle", "plan")}
    if not plans:
        return []
    first = next(iter(plans.values()))
    held = {n: get(n, "idle", "connections") for n in plans}
    per = []
    for n, plan in plans.items():
        if plan["relay_forks_per_conn"]:
            how = "one process per connection"
        else:
            how = "%d fds/conn in one process" % plan["relay_fds_per_conn"]
        bound = "capped by " + plan["bound_by"] if plan["capped"] else "as wanted"
        per.append("%s %s (%s; %s)" % (n, format(held[n] or 0, ","), how, bound))
    notes = [
        "idle: N per relay = %s wanted, or the largest multiple of %d with which every process holding them (the"
        " relay, the generator and the sink, 1 fd/conn each) stays within its RLIMIT_NOFILE of %d with %d fds spare"
        " (the hard limit; raising it needs CAP_SYS_RESOURCE); a relay forking per connection is bounded by pids and"
        " memory instead: %s. Each idle connection is proven by a 1-byte echo, and the relay's fds must return to"
        " their baseline after closing"
        % (format(first["wanted"], ","), IDLE_STEP, first["nofile"], FDS_SPARE, "; ".join(per))
    ]
    extrapolated = [n for n in plans if get(n, "idle", "rss_kib_at_10000_extrapolated") is not None]
    if extrapolated:
        notes.append(
            "10,000 rows: only for relays not measured at 10,000 (%s), linear from the baseline with the larger of"
            " the average and the N/2 -> N per-connection cost"
            % ", ".join("%s measured at %s" % (n, format(held[n], ",")) for n in extrapolated)
        )
    for n in plans:
        st = get(n, "idle", "held", "proxy_stats") or {}
        default = st.get("max_connections_default")
        if default and st.get("max_connections") != default:
            notes.append(
                "%s: max_connections raised from its default %s (RLIMIT_NOFILE %d at 3 fds/conn with splice) to %s"
                " (2 fds/conn: idle connections are not spliced) so that N fits; with the defaults it refuses"
                " connections beyond %s"
                % (n, format(default, ","), first["nofile"], format(st["max_connections"], ","), format(default, ","))
            )
        if not n.startswith("pocketproxy") or not held[n]:
            continue
        if held[n] >= IDLE_TARGET:
            rss, how = get(n, "idle", "held", "rss_kib"), "measured at %s" % format(held[n], ",")
        elif get(n, "idle", "rss_kib_at_10000_extrapolated") is not None:
            rss = get(n, "idle", "rss_kib_at_10000_extrapolated")
            measured = get(n, "idle", "held", "rss_kib") / 1024
            how = "extrapolated; measured at %s: %.1f MiB" % (format(held[n], ","), measured)
        else:
            continue
        notes.append(
            "target, 10,000 idle proxied connections under 150 MB RSS: %s %.1f MiB = %.1f MB (%s): %s"
            % (n, rss / 1024, rss * 1024 / 1e6, how, "PASS" if rss * 1024 < IDLE_TARGET_RSS_BYTES else "MISS")
        )
    return notes


def inside(args):
    if in_root_namespace():
        sys.stderr.write("bench-proxy: --inside refuses to run in the root network namespace\n")
        return 2
    nofile = raise_nofile(NOFILE)
    arm_inner_deadline(INNER_DEADLINE)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = Path(args.json) if args.json else RESULTS / ("proxy-%s.json" % stamp)
    result = {
        "environment": environment(),
        "parameters": {k: v for k, v in vars(args).items() if k not in ("inside", "json")},
        "nofile": nofile,
        "relays": {},
        "errors": [],
        "json": str(json_path),
        "_t0": time.monotonic(),
    }
    tmp = Path(tempfile.mkdtemp(prefix="ppbench-proxy-"))
    try:
        run_inside(args, result, tmp)
    except (Exception, BenchTimeout, KeyboardInterrupt) as e:
        result["errors"].append("%s: %s" % (type(e).__name__, e))
        if not isinstance(e, (BenchError, BenchTimeout, KeyboardInterrupt)):
            import traceback

            traceback.print_exc()
    finally:
        signal.alarm(0)
        for p in sorted(tmp.iterdir()):
            p.unlink()
        tmp.rmdir()
    result["duration_s"] = time.monotonic() - result.pop("_t0")
    result["environment"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    result["correct"] = not result["errors"]
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    report(result, args)
    return 0 if result["correct"] else 1


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python3 -m tests.bench.proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 run (about 10 s)")
    parser.add_argument(
        "--relays",
        default=",".join(DEFAULT_RELAYS),
        help="comma-separated, from: %s (default %%(default)s)" % ", ".join(PORTS),
    )
    parser.add_argument("--runs", type=int, help="throughput runs per relay, median reported (3; 1 with --quick)")
    parser.add_argument("--single-mib", type=int, help="1-stream upload size (1024; 64 with --quick)")
    parser.add_argument("--multi-mib", type=int, help="multi-stream total upload size (2048; 128 with --quick)")
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams (64)")
    parser.add_argument("--setup", type=int, help="connections in the setup-rate test (2000; 300 with --quick)")
    parser.add_argument("--setup-warmup", type=int, default=100, help="unmeasured connections first (100)")
    parser.add_argument("--concurrency", type=int, default=32, help="setup-rate concurrency (32)")
    parser.add_argument("--ttfb", type=int, help="first-byte samples (300; 50 with --quick)")
    parser.add_argument("--ttfb-warmup", type=int, default=20)
    parser.add_argument(
        "--idle",
        type=int,
        help="idle connections wanted per relay (10000; 1000 with --quick; 0 = skip); a relay gets fewer, a multiple"
        " of 500, when its fds per idle connection, the generator's or the sink's do not fit RLIMIT_NOFILE",
    )
    parser.add_argument("--idle-batch", type=int, default=500)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also cProfile pocketproxy over one extra setup + first-byte pass (results/proxy-profile-*.txt)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="per-socket operation timeout, s (30)")
    parser.add_argument("--json", help="where to write the JSON (default tests/bench/results/proxy-<timestamp>.json)")
    args = parser.parse_args(argv)
    q = args.quick
    for name, full, quick in (
        ("runs", 3, 1),
        ("single_mib", 1024, 64),
        ("multi_mib", 2048, 128),
        ("setup", 2000, 300),
        ("ttfb", 300, 50),
        ("idle", IDLE_TARGET, 1000),
    ):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    args.relays = [r.strip() for r in args.relays.split(",") if r.strip()]
    unknown = [r for r in args.relays if r not in PORTS]
    if unknown or not args.relays:
        parser.error("unknown relay(s) %s; choose from %s" % (", ".join(unknown), ", ".join(PORTS)))
    if args.runs < 1 or args.streams < 1 or args.multi_mib * (1 << 20) // args.streams < 1 << 20:
        parser.error("need runs >= 1 and at least 1 MiB per stream")
    if args.inside:
        return inside(args)
    passthrough = [a for a in argv if a != "--inside"]
    return outer(args, passthrough)


if __name__ == "__main__":
    sys.exit(main())
