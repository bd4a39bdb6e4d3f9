"""Customer DNS benchmark: pocketproxy's DNS (through the phone, over TCP and DoH) vs dnsmasq vs the origin.

``make bench-dns`` (``python3 -m tests.bench.dns``, as root). Everything runs in namespaces this
process creates and deletes in a ``finally`` (also on failure, Ctrl-C, SIGTERM or the deadline)::

    client ns 10.53.0.2 ── veth ── 10.53.0.1 server ns ── veth ── device ns ──┐
              10.54.0.2 ── veth ── 10.54.0.1 peer ns                          bridge ── origin ns
                                   203.0.113.250 ─────────────────────────────┘   203.0.113.10:53, :8443 DoH

- **server**: a :class:`tests.lab.world.World` (device "phone": tinyproxy, or dante with
  ``--device socks5``; the origin with :meth:`World.start_dns`, TTL 3600, and DNS over HTTPS on
  :8443 when ``pocketproxy-doh`` is among ``--peers``). pocketproxy's DNS server
  (:mod:`tests.bench.dns_runner`, the DNS core's public API, its own process) listens on
  10.53.0.1:53 and resolves every miss with DNS over TCP through the phone's proxy
  (``pocketproxy``). A second runner, its own process and cache, listens on 10.53.0.1:5300 and
  resolves every miss with DNS over HTTPS (RFC 8484 GET over TLS, ``origin.test`` resolved by
  the phone, certificate checked against the lab origin's CA, at most 4 keep-alive tunnels) through
  the same phone (``pocketproxy-doh``). The server namespace has no route to the origin (checked
  before and after): its queries can only arrive via the device.
- **peer**: dnsmasq (``dnsmasq-base``, ``--no-daemon``, 10,000-entry cache) on 10.54.0.1:53,
  forwarding over UDP to 203.0.113.10 **directly** (it has no way to use the phone). It lives in
  its own namespace on the origin bridge, so the server namespace stays isolated. The ``origin``
  row is the generator in that namespace asking 203.0.113.10 itself (no cache: the floor).
- **load** (:mod:`tests.bench.dns_load`, its own process, plain UDP sockets): ``--count`` A
  queries, ``--concurrency`` in flight, per-query timeout and a deadline per phase. Uncached =
  every name unique (``*.bench.test`` is a wildcard); cached = ``--distinct`` names warmed up
  once (not measured), then ``--count`` queries cycling over them.

Peers are measured interleaved in the same run (``--peers``, default all four).

Correctness (exit 1 when a check fails; a slow result never fails the run): every query
answered with the right A record; the origin's query log (:class:`tests.lab.world.DNSOrigin`)
shows pocketproxy's misses only from the device's 203.0.113.x over TCP and every unique name
exactly there, pocketproxy-doh's only from the device over ``doh`` and every unique name exactly
once, dnsmasq's only from the peer address, no cached-phase query at the origin, no query from
any other address; the origin's DoH listener accepted connections only from the device and at
most 4 for the whole run (keep-alive); the servers still running at the end.
Output: a table with ratios vs dnsmasq (and pocketproxy-doh vs pocketproxy), and
``tests/bench/results/dns-<timestamp>.json`` (``doh_keepalive``: the DoH connection counts).
"""

import argparse
import collections
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.namespace_run import BenchTimeout, arm_inner_deadline, percentile

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "tests" / "bench" / "results"
DEADLINE = 290  # the whole run, namespaces included
DNSMASQ = "/usr/sbin/dnsmasq"
CLIENT_TO_SERVER = ("10.53.0.2", "10.53.0.1")
CLIENT_TO_PEER = ("10.54.0.2", "10.54.0.1")
PEER_ORIGIN_IP = "203.0.113.250"
TTL = 3600
DOH_PORT = 8443  # the origin's DoH listener (World.start_dns(doh_port=...))
DOH_LISTEN_PORT = 5300  # pocketproxy-doh's runner, on the same server address as pocketproxy's
MAX_DOH_CONNECTIONS = 4  # DNSSettings.max_doh_connections (the default): keep-alive tunnels per device
PEERS = ("pocketproxy", "pocketproxy-doh", "dnsmasq", "origin")
POCKETPROXY = ("pocketproxy", "pocketproxy-doh")
BASELINE = "dnsmasq"
ORIGIN_PROTO = {"pocketproxy": "tcp", "pocketproxy-doh": "doh"}
TAGS = {"pocketproxy": "po", "pocketproxy-doh": "ph", "dnsmasq": "dn", "origin": "or"}  # query name prefixes
RUNNER_FILES = {"pocketproxy": "dns_runner", "pocketproxy-doh": "dns_runner_doh"}  # <name>.stderr etc. in tmp
PATHS = {
    "pocketproxy": "client -> server -> phone's proxy (TCP) -> origin",
    "pocketproxy-doh": "client -> server -> phone's proxy (TLS, HTTP/1.1 GET) -> origin DoH",
    "dnsmasq": "client -> dnsmasq -> origin (UDP, direct: cannot use the phone)",
    "origin": "peer ns -> origin (UDP), authoritative, no cache",
}


class BenchError(Exception):
    """The run was incorrect."""


def summary(latencies):
    return {
        "n": len(latencies),
        "p50_ms": round(percentile(latencies, 50), 3),
        "p90_ms": round(percentile(latencies, 90), 3),
        "p99_ms": round(percentile(latencies, 99), 3),
        "max_ms": round(max(latencies), 3) if latencies else None,
        "mean_ms": round(statistics.fmean(latencies), 3) if latencies else None,
    }


def dnsmasq_version():
    try:
        out = subprocess.run([DNSMASQ, "--version"], capture_output=True, text=True, timeout=10).stdout
        return out.splitlines()[0].split()[2]
    except (OSError, IndexError, subprocess.SubprocessError):
        return None


def wait_udp_listening(ns, address, port, proc, timeout, what):
    from tests.lab.netns import wait_for

    def up():
        if proc.poll() is not None:
            raise BenchError("%s exited with status %s before listening" % (what, proc.returncode))
        out = ns.run("ss", "-Hlun", "sport = :%d" % port, check=False).stdout
        return ("%s:%d" % (address, port)) in out

    wait_for(up, timeout, what="%s on %s:%d" % (what, address, port))


class Bench:
    def __init__(self, args, tmp):
        self.args = args
        self.tmp = Path(tmp)
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
        self.spaces = []
        self.world = None
        self.checks = []  # (ok, text)
        self.phases = []
        self.procs = {}
        self.notes = []
        self.pp_snapshot = None
        self.snapshots = {}  # pocketproxy runner -> its stats snapshot at the end
        self.stats_files = {}  # pocketproxy runner -> its --stats-file
        self.doh = None  # DoH keep-alive summary (connections at the origin)

    # ------------------------------------------------------------------ setup / teardown

    def check(self, ok, text):
        self.checks.append((bool(ok), text))
        if not ok:
            sys.stderr.write("bench-dns: CHECK FAILED: %s\n" % text)
        return ok

    def build(self):
        from tests.lab.internet import Internet
        from tests.lab.netns import Namespace, link
        from tests.lab.world import World

        internet = Internet()  # the origin's internet; this bench's server has no uplink
        self.spaces.append(internet.ns)
        server = Namespace("dsv")
        self.spaces.append(server)
        self.world = World(server, self.tmp / "world", internet)
        doh = "pocketproxy-doh" in self.args.peers
        self.dns = self.world.start_dns(ttl=TTL, doh_port=DOH_PORT if doh else None)
        self.device = self.world.add_device("phone", kind=self.args.device)
        client = Namespace("dcl")
        self.spaces.append(client)
        peer = Namespace("dpr")
        self.spaces.append(peer)
        link(client, CLIENT_TO_SERVER[0], server, CLIENT_TO_SERVER[1])
        link(client, CLIENT_TO_PEER[0], peer, CLIENT_TO_PEER[1])
        self.world.origin.attach(peer, PEER_ORIGIN_IP)
        self.server, self.client, self.peer = server, client, peer
        from tests.lab.internet import route_error

        route = route_error(server, self.dns.address)
        self.check(route is not None, "server namespace has no route to the origin (%s)" % route)
        out = client.run("ip", "route", "get", self.dns.address, check=False)
        self.check(out.returncode != 0, "client namespace has no route to the origin")

    def teardown(self):
        for name, proc in list(self.procs.items()):
            try:
                from tests.lab.netns import stop_process

                stop_process(proc, timeout=5)
            except Exception as e:
                sys.stderr.write("bench-dns: stopping %s: %s\n" % (name, e))
        if self.world is not None:
            try:
                self.world.close()
            except Exception as e:
                sys.stderr.write("bench-dns: world teardown: %s\n" % e)
        for ns in reversed(self.spaces):
            ns.destroy()
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        names = {line.split()[0] for line in left.splitlines() if line.strip()}
        stale = [ns.name for ns in self.spaces if ns.name in names]
        if stale:
            sys.stderr.write("bench-dns: namespaces still exist after teardown: %s\n" % stale)
            return False
        return True

    def start_pocketproxy(self, peer="pocketproxy"):
        """One pocketproxy DNS runner in the server namespace: DNS over TCP on :53
        (``pocketproxy``) or DoH on :DOH_LISTEN_PORT (``pocketproxy-doh``)."""
        base = RUNNER_FILES[peer]
        ready = self.tmp / ("%s.ready" % base)
        stats = self.tmp / ("%s.stats.json" % base)
        stderr = self.tmp / ("%s.stderr" % base)
        self.stats_files[peer] = stats
        if peer == "pocketproxy":
            self.pp_stats, self.pp_stderr = stats, stderr
            where = ["--port", "53", "--resolver", self.dns.address]
        else:
            where = ["--port", str(DOH_LISTEN_PORT), "--doh-url", self.dns.doh_url, "--ca-file", self.dns.ca_cert,
                     "--max-doh-connections", str(MAX_DOH_CONNECTIONS)]
        argv = [sys.executable, "-m", "tests.bench.dns_runner", "--listen", CLIENT_TO_SERVER[1], *where,
                "--upstream", self.device.url, "--ready", str(ready), "--stats-file", str(stats)]
        with open(stderr, "wb") as err:
            proc = self.server.popen(argv, cwd=str(ROOT), env=self.env, stdin=subprocess.DEVNULL, stdout=err,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[peer] = proc
        deadline = time.monotonic() + 20
        while not ready.exists():
            if proc.poll() is not None:
                raise BenchError("%s DNS runner exited (%s): %s" % (peer, proc.returncode, stderr.read_text()[-2000:]))
            if time.monotonic() > deadline:
                raise BenchError("%s DNS runner not ready in 20s: %s" % (peer, stderr.read_text()[-2000:]))
            time.sleep(0.05)

    def start_dnsmasq(self):
        if not os.path.exists(DNSMASQ):
            raise BenchError("%s missing: apt-get install dnsmasq-base (make deps)" % DNSMASQ)
        self.dnsmasq_log = self.tmp / "dnsmasq.stderr"
        argv = [DNSMASQ, "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--no-poll",
                "--server=%s" % self.dns.address, "--listen-address=%s" % CLIENT_TO_PEER[1], "--bind-interfaces",
                "--port=53", "--cache-size=10000", "--dns-forward-max=1000"]
        with open(self.dnsmasq_log, "wb") as err:
            proc = self.peer.popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.procs["dnsmasq"] = proc
        wait_udp_listening(self.peer, CLIENT_TO_PEER[1], 53, proc, 10, "dnsmasq")

    # ------------------------------------------------------------------ phases

    def load(self, peer, prefix, count, distinct, concurrency):
        a = self.args
        port = 53
        if peer == "origin":
            ns, server = self.peer, self.dns.address
        elif peer == "dnsmasq":
            ns, server = self.client, CLIENT_TO_PEER[1]
        elif peer == "pocketproxy-doh":
            ns, server, port = self.client, CLIENT_TO_SERVER[1], DOH_LISTEN_PORT
        else:
            ns, server = self.client, CLIENT_TO_SERVER[1]
        argv = [sys.executable, "-m", "tests.bench.dns_load", "--server", server, "--port", str(port), "--prefix", prefix,
                "--count", str(count), "--distinct", str(distinct), "--concurrency", str(concurrency),
                "--timeout", str(a.timeout), "--deadline", str(a.phase_deadline)]
        out = subprocess.run(ns.argv(*argv), cwd=str(ROOT), env=self.env, capture_output=True, text=True,
                             timeout=a.phase_deadline + a.timeout + 30)
        if out.returncode != 0:
            raise BenchError("load generator (%s) exited %d: %s" % (peer, out.returncode, out.stderr[-2000:]))
        return json.loads(out.stdout.strip().splitlines()[-1])

    def phase(self, peer, mode, concurrency, run):
        a = self.args
        count = a.count if concurrency > 1 else min(a.count, a.serial_count)
        tag = "%s-%s%d-%d-%d" % (TAGS[peer], mode[0], concurrency, run, os.getpid())
        warm = None
        if mode == "cached":
            warm = self.load(peer, tag, a.distinct, a.distinct, a.concurrency)
            self.check(warm["ok"] == a.distinct, "%s cached warm-up run %d: %d/%d answered %s"
                       % (peer, run, warm["ok"], a.distinct, warm["failures"][:3]))
        mark = self.dns.log_mark()
        result = self.load(peer, tag, count, a.distinct if mode == "cached" else 0, concurrency)
        mode = "%s/%d" % (mode, concurrency)
        seen = self.dns.queries(since=mark)
        ok = self.check(result["ok"] == count and result["failed"] == 0,
                        "%s %s run %d: %d/%d answered correctly (failed %d, not sent %d) %s"
                        % (peer, mode, run, result["ok"], count, result["failed"], result["not_sent"],
                           result["failures"][:3]))
        expect_source = self.device.origin_ip if peer in POCKETPROXY else PEER_ORIGIN_IP
        sources = {q.source for q in seen}
        self.check(sources <= {expect_source}, "%s %s run %d: origin saw queries only from %s (saw %s)"
                   % (peer, mode, run, expect_source, sorted(sources)))
        if peer == "pocketproxy":
            protos = {q.proto for q in seen}
            self.check(protos <= {"tcp"}, "pocketproxy %s run %d: origin queries came over TCP via the phone (%s)"
                       % (mode, run, sorted(protos)))
        elif peer == "pocketproxy-doh":
            protos = {q.proto for q in seen}
            self.check(protos <= {"doh"}, "pocketproxy-doh %s run %d: origin queries came over DoH via the phone (%s)"
                       % (mode, run, sorted(protos)))
        names = {q.qname for q in seen}
        if mode.startswith("uncached"):
            wanted = {"%s-%d.bench.test" % (tag, i) for i in range(count)}
            if ok:
                self.check(wanted <= names, "%s %s run %d: every name reached the origin (%d missing)"
                           % (peer, mode, run, len(wanted - names)))
            if ok and peer == "pocketproxy-doh":
                times = collections.Counter(q.qname for q in seen)
                extra = sorted(n for n, k in times.items() if k != 1 or n not in wanted)
                self.check(not extra and len(seen) == count,
                           "pocketproxy-doh %s run %d: each name reached the origin exactly once (%d queries for %d"
                           " names; off: %s)" % (mode, run, len(seen), count, extra[:5]))
        else:
            self.check(len(seen) == 0, "%s cached run %d: no query reached the origin (%d did: %s)"
                       % (peer, run, len(seen), sorted(names)[:5]))
        record = {
            "peer": peer, "mode": mode, "concurrency": concurrency, "run": run, "count": count, "ok": result["ok"], "failed": result["failed"],
            "not_sent": result["not_sent"], "failures": result["failures"], "wall_s": result["wall_s"],
            "qps": result["qps"], "origin_queries": len(seen), "origin_sources": sorted(sources),
            "latency": summary(result["latencies_ms"]), "latencies_ms": result["latencies_ms"],
        }
        if self.dns.doh_port is not None:
            record["origin_doh_connections"] = len(self.dns.doh_connections(since=mark))
        if warm is not None:
            record["warmup"] = {"count": a.distinct, "ok": warm["ok"], "wall_s": warm["wall_s"]}
        self.phases.append(record)
        return record

    def run(self):
        a = self.args
        self.build()
        for peer in POCKETPROXY:
            if peer in a.peers:
                self.start_pocketproxy(peer)
        if "dnsmasq" in a.peers:
            self.start_dnsmasq()
        self.loadavg = [os.getloadavg()]
        for run in range(a.runs):
            for mode, concurrency in self.modes():
                # interleaved, so drift on a shared machine hits every peer alike
                for peer in a.peers:
                    if peer == "origin" and mode == "cached":
                        continue  # authoritative: nothing to cache
                    self.phase(peer, mode, concurrency, run)
        self.loadavg.append(os.getloadavg())
        for name, proc in self.procs.items():
            self.check(proc.poll() is None, "%s still running at the end (exit %s)" % (name, proc.poll()))
        for peer in POCKETPROXY:
            if peer not in self.procs:
                continue
            try:
                os.kill(self.procs[peer].pid, 10)  # SIGUSR1: stats snapshot
                time.sleep(0.3)
                snap = json.loads(self.stats_files[peer].read_text())
            except (OSError, ValueError) as e:
                snap = {"error": repr(e)}
            self.snapshots[peer] = snap
            routed = set(snap.get("route_for_calls", {}))
            what = "route_for" if peer == "pocketproxy" else "%s's route_for" % peer
            self.check(routed <= {CLIENT_TO_SERVER[0]}, "%s saw only the client address (%s)" % (what, sorted(routed)))
            results = set((snap.get("server_stats") or {}).get("queries", {}))
            self.check(results <= {"ok"}, "%s answered every query ok (its counters: %s)" % (peer, sorted(results)))
        self.pp_snapshot = self.snapshots.get("pocketproxy")
        if "pocketproxy-doh" in self.procs:
            self.check_doh_connections()
        all_sources = self.dns.query_sources()
        self.check(all_sources <= {self.device.origin_ip, PEER_ORIGIN_IP},
                   "origin saw no query from any other address (%s)" % sorted(all_sources))
        from tests.lab.internet import route_error

        route = route_error(self.server, self.dns.address)
        self.check(route is not None, "server namespace still has no route to the origin")

    def check_doh_connections(self):
        """Keep-alive: the origin's DoH listener accepted few connections, all from the phone."""
        conns = self.dns.doh_connections()
        own = (self.snapshots.get("pocketproxy-doh") or {}).get("server_stats") or {}
        doh_phases = [p for p in self.phases if p["peer"] == "pocketproxy-doh"]
        self.doh = {
            "origin_connections": len(conns), "origin_connection_sources": sorted(set(conns)),
            "max_doh_connections": MAX_DOH_CONNECTIONS,
            "tunnels_opened": (own.get("upstream") or {}).get("opened"),
            "tunnels_closed": (own.get("upstream") or {}).get("closed"),
            "origin_queries": sum(q.proto == "doh" for q in self.dns.queries()),  # warm-ups included
            "per_phase_new_connections": {"%s run %d" % (p["mode"], p["run"]): p.get("origin_doh_connections")
                                          for p in doh_phases},
        }
        self.check(set(conns) <= {self.device.origin_ip},
                   "every DoH connection at the origin came from the phone %s (saw %s)"
                   % (self.device.origin_ip, sorted(set(conns))))
        self.check(1 <= len(conns) <= MAX_DOH_CONNECTIONS,
                   "DoH keep-alive: %d connection(s) at the origin for the whole run (1..%d)"
                   % (len(conns), MAX_DOH_CONNECTIONS))

    # ------------------------------------------------------------------ report

    def modes(self):
        out = [("uncached", self.args.concurrency), ("cached", self.args.concurrency)]
        if self.args.serial_count and self.args.concurrency > 1:
            out += [("uncached", 1), ("cached", 1)]
        return out

    def rows(self):
        out = {}
        for mode in ["%s/%d" % m for m in self.modes()]:
            for peer in self.args.peers:
                phases = [p for p in self.phases if p["peer"] == peer and p["mode"] == mode]
                if not phases:
                    continue
                lat = [x for p in phases for x in p["latencies_ms"]]
                out[(peer, mode)] = dict(summary(lat), qps=round(statistics.median(p["qps"] for p in phases), 1),
                                         runs=len(phases))
        return out

    def report(self, correct, path):
        rows = self.rows()
        lines = []
        head = "%-15s %-11s %9s %9s %9s %9s   %-6s %-6s %-6s  %s" % (
            "server", "lookups", "q/s", "p50 ms", "p99 ms", "max ms", "q/s x", "p50 x", "p99 x", "path")
        lines.append(head)
        lines.append("-" * len(head))
        for (peer, mode), row in rows.items():
            base = rows.get((BASELINE, mode))
            if base and peer != BASELINE:
                ratios = ("%.2f" % (row["qps"] / base["qps"]) if base["qps"] else "-",
                          "%.2f" % (row["p50_ms"] / base["p50_ms"]) if base["p50_ms"] else "-",
                          "%.2f" % (row["p99_ms"] / base["p99_ms"]) if base["p99_ms"] else "-")
            else:
                ratios = ("1" if peer == BASELINE else "-",) * 3
            lines.append("%-15s %-11s %9.0f %9.2f %9.2f %9.2f   %-6s %-6s %-6s  %s" % (
                peer, mode, row["qps"], row["p50_ms"], row["p99_ms"], row["max_ms"] or 0, *ratios,
                PATHS[peer] if mode == "uncached/%d" % self.args.concurrency else ""))
        a = self.args
        versus = self.doh_vs_tcp(rows)
        if versus:
            lines += ["", "pocketproxy-doh / pocketproxy (DoH vs DNS over TCP, both through the phone):"]
            for mode, r in versus.items():
                lines.append("  %-11s q/s x %s, p50 x %s, p99 x %s" % (
                    mode, *("-" if r[k] is None else "%.2f" % r[k] for k in ("qps", "p50_ms", "p99_ms"))))
        lines += [
            "",
            "lookups = kind/in flight: %d queries per phase with %d in flight, %d one at a time (unloaded latency);"
            " %d run(s); cached = %d names warmed up first (not timed); uncached = every name new. q/s = median of runs,"
            " latencies pooled over runs. Ratios are <server>/dnsmasq: q/s above 1 = faster, latency below 1 = faster."
            % (a.count, a.concurrency, min(a.count, a.serial_count), a.runs, a.distinct),
            "dnsmasq forwards straight to the origin over UDP; pocketproxy carries every miss over TCP through the"
            " phone's %s proxy (%s), the path a customer's query must take. Same machine, shared cores."
            % ("HTTP CONNECT" if a.device == "http" else "SOCKS5", self.device.url),
        ]
        if "pocketproxy-doh" in a.peers:
            lines.append(
                "pocketproxy-doh is a second pocketproxy DNS server (%s:%d, its own process and cache) resolving each"
                " miss with an RFC 8484 GET over TLS (HTTP/1.1, at most %d keep-alive tunnels, so at most %d misses in"
                " flight) through the same phone to %s." % (CLIENT_TO_SERVER[1], DOH_LISTEN_PORT, MAX_DOH_CONNECTIONS,
                                                           MAX_DOH_CONNECTIONS, self.dns.doh_url))
        lines += [
            "environment: %s" % self.environment_line(),
        ]
        for peer, tunnels in (("pocketproxy", "device tunnels"), ("pocketproxy-doh", "DoH tunnels")):
            snap = self.snapshots.get(peer) or {}
            own = snap.get("server_stats") or {}
            if own:
                lines.append("%s's own counters: queries %s, cache hits %s / misses %s, %s opened %s"
                             " (failed %s, closed %s), route_for sources %s, warnings %s" % (
                                 peer, own.get("queries"), own.get("cache", {}).get("hits"),
                                 own.get("cache", {}).get("misses"), tunnels, own.get("upstream", {}).get("opened"),
                                 own.get("upstream", {}).get("failed"), own.get("upstream", {}).get("closed"),
                                 sorted(snap.get("route_for_calls", {})), snap.get("warnings")))
            elif snap:
                lines.append("%s runner: %s" % (peer, json.dumps(snap, default=repr)[:400]))
        if self.doh:
            lines.append("DoH keep-alive: %d TLS connection(s) accepted by the origin for the whole run (from %s) carried"
                         " %d DoH queries; at most %d allowed" % (
                             self.doh["origin_connections"], ", ".join(self.doh["origin_connection_sources"]) or "-",
                             self.doh["origin_queries"], MAX_DOH_CONNECTIONS))
        for ok, text in self.checks:
            if not ok:
                lines.append("FAILED: %s" % text)
        lines.append("checks: %d passed, %d failed" % (sum(ok for ok, _ in self.checks),
                                                        sum(not ok for ok, _ in self.checks)))
        lines.append("correct: %s" % ("yes" if correct else "NO"))
        if path:
            lines.append("json: %s" % path)
        return "\n".join(lines)

    def doh_vs_tcp(self, rows):
        """{mode: {qps, p50_ms, p99_ms}}: pocketproxy-doh / pocketproxy, per mode both have."""
        out = {}
        for (peer, mode), row in rows.items():
            tcp = rows.get(("pocketproxy", mode))
            if peer != "pocketproxy-doh" or tcp is None:
                continue
            out[mode] = {k: (round(row[k] / tcp[k], 3) if tcp[k] else None) for k in ("qps", "p50_ms", "p99_ms")}
        return out

    def environment(self):
        import twisted

        return {
            "python": platform.python_version(), "twisted": twisted.__version__, "kernel": platform.release(),
            "cpus": os.cpu_count(), "dnsmasq": dnsmasq_version(), "device": self.args.device,
            "loadavg": [list(x) for x in getattr(self, "loadavg", [])],
        }

    def environment_line(self):
        env = self.environment()
        load = " -> ".join("%.2f" % x[0] for x in env["loadavg"])
        return "Python %s, Twisted %s, kernel %s, %s CPUs, dnsmasq %s, load %s" % (
            env["python"], env["twisted"], env["kernel"], env["cpus"], env["dnsmasq"], load)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python3 -m tests.bench.dns", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="queries per measured phase")
    parser.add_argument("--distinct", type=int, default=64, help="names in the cached phase")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--serial-count", type=int, default=300, help="queries per one-at-a-time phase (0: none)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=5.0, help="per query, seconds (a miss fails the run)")
    parser.add_argument("--phase-deadline", type=float, default=30.0, help="no new query after this, per phase")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma list of %s" % ",".join(PEERS))
    parser.add_argument("--device", choices=("http", "socks5"), default="http")
    parser.add_argument("--quick", action="store_true", help="200 queries, 16 names, 1 run")
    parser.add_argument("--deadline", type=int, default=DEADLINE, help="seconds for the whole run (namespaces torn down)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the world's logs and configs")
    parser.add_argument("--json", help="default: tests/bench/results/dns-<timestamp>.json")
    args = parser.parse_args(argv)
    args.peers = [p for p in args.peers.split(",") if p]
    unknown = set(args.peers) - set(PEERS)
    if unknown or not args.peers:
        parser.error("unknown peers: %s" % sorted(unknown))
    if args.quick:
        args.count, args.distinct, args.runs, args.serial_count = 200, 16, 1, 50
    if not (1 <= args.concurrency <= 1024 and 1 <= args.count <= 100000 and 1 <= args.distinct <= args.count):
        parser.error("need 1 <= concurrency <= 1024, 1 <= distinct <= count <= 100000")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        sys.stderr.write("bench-dns: needs root (network namespaces)\n")
        return 2
    arm_inner_deadline(args.deadline)
    tmp = tempfile.mkdtemp(prefix="ppbench-dns-")
    bench = Bench(args, tmp)
    error = None
    try:
        bench.run()
    except (BenchError, BenchTimeout, KeyboardInterrupt, AssertionError, subprocess.SubprocessError, OSError) as e:
        error = "%s: %s" % (type(e).__name__, e)
        bench.check(False, "run aborted: %s" % error)
    finally:
        import signal

        signal.alarm(0)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # teardown is bounded; a second signal must not skip it
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        clean = bench.teardown()
        bench.check(clean, "every namespace deleted")
    try:
        return _finish(args, bench, tmp, error)
    finally:
        if args.keep_tmp:
            print("kept: %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _finish(args, bench, tmp, error):
    """Write the JSON, print the table; the exit status."""
    correct = all(ok for ok, _ in bench.checks)
    path = Path(args.json) if args.json else RESULTS / ("dns-%s.json" % time.strftime("%Y%m%d-%H%M%S"))
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = bench.rows()
    data = {
        "args": vars(args), "correct": correct, "error": error, "environment": bench.environment(),
        "rows": [dict(peer=peer, mode=mode, path=PATHS[peer], **row) for (peer, mode), row in rows.items()],
        "doh_vs_tcp": bench.doh_vs_tcp(rows),
        "checks": [{"ok": ok, "check": text} for ok, text in bench.checks], "phases": bench.phases,
        "pocketproxy_runner": bench.pp_snapshot,
        "pocketproxy_doh_runner": bench.snapshots.get("pocketproxy-doh"),
        "doh_keepalive": bench.doh,
        "logs": {
            "pocketproxy": _tail(Path(tmp) / "dns_runner.stderr"), "dnsmasq": _tail(Path(tmp) / "dnsmasq.stderr"),
            "pocketproxy-doh": _tail(Path(tmp) / "dns_runner_doh.stderr"),
        },
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=repr)
    print(bench.report(correct, path))
    if error:
        sys.stderr.write("bench-dns: %s\n" % error)
        for name in ("dns_runner.stderr", "dns_runner_doh.stderr", "dnsmasq.stderr"):
            text = _tail(Path(tmp) / name)
            if text:
                sys.stderr.write("---- %s ----\n%s\n" % (name, text))
    return 0 if correct else 1


def _tail(path, n=3000):
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
