"""Full-path benchmark: the shipped OpenVPN tuning, measured on the real path, with and without.

``make bench-path`` (``python3 -m tests.bench.path``, as root) builds the lab of the
integration tests (:class:`tests.lab.openvpn.Lab`, :class:`tests.lab.world.World`, all in
namespaces it tears down) and measures one customer's traffic on the whole path::

    client ns ── OpenVPN client ══UDP══ OpenVPN server ── REDIRECT ── pocketproxy (twistd)
        ── the phone's proxy (dante SOCKS5 by default; tinyproxy with --device http) ── origin

The server runs ``conf/openvpn/server.conf`` (lab paths swapped in) and the client a profile from
``pocketproxyctl client-config``, both exactly as shipped ("shipped"); the same two files with
every tuning directive (:data:`TUNING`) removed ("stock", OpenVPN 2.6's defaults); and stock plus
one shipped group at a time ("+fast-io", ...), all in the same run.
The server and the client are restarted for each variant; pocketproxy, the phone and the origin
stay. ``--passes`` times over all variants in turn (so drift hits every variant alike), each
pass measuring per variant:

- download MB/s (10^6 B/s) of ``GET /blob/N`` from the origin (sha256 verified), ``--rounds``
  times, and the OpenVPN server's and client's CPU seconds per GiB over those downloads;
- time to first byte of ``GET /whoami`` on a new connection (``--requests`` samples), which
  includes the REDIRECT, pocketproxy's SOCKS5/CONNECT to the phone and the phone's connect.

Reported: the median download over all passes, first byte p50/p90 over all samples, CPU per GiB
over all downloads; ratios are against "stock" in the same run. A table goes to stdout, JSON to
``tests/bench/results/path-<timestamp>.json`` (or ``--json``). Exit 1 if a check failed (a
download hashed wrong, a variant's tunnel did not come up, the origin saw anything but the phone).
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "tests" / "bench" / "results"
NETCLIENT = ROOT / "tests" / "lab" / "netclient.py"

#: The shipped directives ``make bench-path`` treats as tuning (removed for "stock"), by group.
TUNING = {
    "fast-io": ("fast-io",),
    "buffers": ("sndbuf", "rcvbuf"),
    "txqueuelen": ("txqueuelen",),
    "ciphers": ("data-ciphers",),
}
TUNING_DIRECTIVES = {directive for group in TUNING.values() for directive in group}
VARIANTS = ("stock", "+fast-io", "+buffers", "+txqueuelen", "+ciphers", "shipped")


def variant_lines(lines, variant):
    """``lines`` (the shipped server config or client profile) as ``variant`` has them."""
    if variant == "shipped":
        return list(lines)
    kept = set(TUNING.get(variant.lstrip("+"), ()))
    return [line for line in lines if (line.split() or [""])[0] not in TUNING_DIRECTIVES - kept]


def cpu_seconds(pid):
    """utime + stime of ``pid`` in seconds (``/proc/<pid>/stat``)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def udp_rcvbuf_errors(ns):
    """``Udp: RcvbufErrors`` of namespace ``ns`` (datagrams dropped because a socket buffer was full)."""
    lines = [line.split() for line in ns.run("cat", "/proc/net/snmp").stdout.splitlines() if line.startswith("Udp:")]
    return int(lines[1][lines[0].index("RcvbufErrors")])


def tun_tx_dropped(ns):
    """Packets the namespace's tun devices dropped on transmit (their queue to OpenVPN was full)."""
    links = json.loads(ns.run("ip", "-s", "-j", "link", "show", "type", "tun").stdout or "[]")
    return sum(link.get("stats64", {}).get("tx", {}).get("dropped", 0) for link in links)


def drops(server_ns, client_ns):
    """``(UDP receive-buffer drops on both ends, the server tun's TX drops)`` so far."""
    return udp_rcvbuf_errors(server_ns) + udp_rcvbuf_errors(client_ns), tun_tx_dropped(server_ns)


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100.0 * (len(ordered) - 1))))]


class Bench:
    def __init__(self, args, workdir):
        self.args = args
        self.workdir = Path(workdir)
        self.checks = []
        self.rows = {}
        self.files = {}  # variant -> its tuning lines, server and client, as run

    def check(self, ok, text):
        self.checks.append((bool(ok), text))
        if not ok:
            sys.stderr.write("bench-path: CHECK FAILED: %s\n" % text)
        return ok

    def netclient(self, ns, *argv, timeout=120):
        out = ns.run(sys.executable, str(NETCLIENT), "--timeout", str(timeout), *argv, check=False, timeout=timeout + 30)
        try:
            return json.loads(out.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            return {"error": (out.stderr or out.stdout).strip()[-300:]}

    def run(self):
        from tests.lab.daemon import Daemon
        from tests.lab.openvpn import Lab
        from tests.lab.origin_server import blob_sha256
        from tests.lab.world import World
        from tests.package.shipped import profiles

        self.size = self.args.mib * 1024 * 1024
        self.expected_sha = blob_sha256(self.size)
        with Lab(self.workdir / "lab", start_server=False) as lab, \
                World(lab.server_ns, self.workdir / "world", lab.internet) as world:
            phone = world.add_device("phone", kind=self.args.device)
            daemon = Daemon(lab.server_ns, self.workdir / "daemon", lab.server.mgmt_socket,
                            {"alice": {"password": "alice-pw"}}, devices={"phone": phone.url}).start()
            try:
                daemon.wait_log(r"transparent proxy listening", timeout=30)
                profile = profiles(daemon.config_path, ("alice",), lab.pki)["alice"]
                base = lab.add_client("alice", username="alice", password="alice-pw", start=False)
                samples = {v: {"speeds": [], "firsts": [], "cpu": 0.0, "bytes": 0, "udp_drops": 0, "tun_drops": 0}
                           for v in self.args.variants}
                for number in range(self.args.passes):
                    for variant in self.args.variants:
                        client, server = self.start_variant(lab, variant, profile, base, number)
                        if client is None or not self.sample(world, client, server, variant, samples[variant]):
                            return
                for variant, got in samples.items():
                    self.rows[variant] = self.summary(variant, got)
                sources = world.origin_sources()
                self.check(sources <= world.phone_addresses(), "the origin saw only the phone (%s)" % sorted(sources))
                self.check(lab.internet.leaked() == {"customer": 0, "server": 0},
                           "the internet counted no leak (%s)" % lab.internet.leaked())
            finally:
                daemon.stop()

    def start_variant(self, lab, variant, profile, base, number):
        """Restart the OpenVPN server and client with ``variant``'s files; ``(client, server)`` once
        the tunnel is up, ``(None, None)`` if it did not come up."""
        from tests.package.shipped import PEER_CHECK, SOURCE_SERVER_CONF, ProfileClient, ShippedServer, lab_server_lines

        class VariantServer(ShippedServer):
            def config_lines(inner):
                lines = lab_server_lines(inner.conf_path, inner.pki, inner.mgmt_socket, inner.log_path,
                                         inner.pid_path, inner.drop)
                return variant_lines(lines, variant)

        for proc in [*lab.clients, lab.server]:  # the client first: the server's RESTART would make it pause
            if proc is not None and proc.running:
                proc.stop(timeout=30)
        tag = "%s-%d" % (variant, number)
        server = VariantServer(lab.server_ns, str(self.workdir / ("server-" + tag)), lab.pki, SOURCE_SERVER_CONF,
                               lab.server.mgmt_socket, drop=PEER_CHECK)
        lab.server = server
        server.start().wait_ready()
        client_profile = "\n".join(variant_lines(profile.splitlines(), variant)) + "\n"
        client = ProfileClient(base.ns, str(self.workdir / ("client-" + tag)), lab.pki, "alice", base.remote,
                               client_profile, port=base.port, username="alice", password="alice-pw", dev=base.dev)
        lab.clients[:] = [client]
        client.start()
        self.files[variant] = {
            "server": [line for line in server.config_lines() if line.split()[0] in TUNING_DIRECTIVES],
            "client": [line for line in client_profile.splitlines() if (line.split() or [""])[0] in TUNING_DIRECTIVES],
        }
        try:
            client.wait_connected(timeout=60)
        except AssertionError as e:
            self.check(False, "%s: tunnel did not come up (%s)" % (variant, str(e).splitlines()[0]))
            return None, None
        return client, server

    def sample(self, world, client, server, variant, into):
        """One pass of ``variant``: first-byte samples, then the downloads; False if a check failed."""
        from tests.lab.world import ORIGIN_IP

        whoami = "http://%s/whoami" % ORIGIN_IP
        self.netclient(client.ns, "fetch", whoami, timeout=30)  # warm-up: ARP, the phone's proxy, the dial path
        for _ in range(self.args.requests):
            got = self.netclient(client.ns, "fetch", whoami, timeout=30)
            if not self.check(got.get("body", "").strip() in world.phone_addresses(), "%s: whoami %s" % (variant, got)):
                return False
            into["firsts"].append(got["first_byte_seconds"] * 1000.0)
        cpu_before = cpu_seconds(server.pid) + cpu_seconds(client.pid)
        udp_before, tun_before = drops(server.ns, client.ns)
        for _ in range(self.args.rounds):
            got = self.netclient(client.ns, "fetch", "http://%s/blob/%d" % (ORIGIN_IP, self.size), timeout=300)
            if not self.check(got.get("sha256") == self.expected_sha and got.get("length") == self.size,
                              "%s: blob of %d bytes intact (%s)"
                              % (variant, self.size, {k: got.get(k) for k in ("length", "error")})):
                return False
            into["speeds"].append(got["mb_per_s"])
            into["bytes"] += self.size
        into["cpu"] += cpu_seconds(server.pid) + cpu_seconds(client.pid) - cpu_before
        udp_after, tun_after = drops(server.ns, client.ns)
        into["udp_drops"] += udp_after - udp_before
        into["tun_drops"] += tun_after - tun_before
        log = client.log_text()
        buffers = [line.split("Socket Buffers: ", 1)[1] for line in log.splitlines() if "Socket Buffers:" in line]
        cipher = [m.group(1) for m in re.finditer(r"PUSH_REPLY,.*?cipher ([A-Z0-9-]+)", log)]
        into["buffers"] = buffers[-1] if buffers else None
        into["cipher"] = cipher[-1] if cipher else None
        sys.stderr.write("bench-path: %-16s %7.1f MB/s  first byte p50 %.2f ms\n"
                         % (variant, into["speeds"][-1], percentile(into["firsts"][-self.args.requests:], 50)))
        return True

    def summary(self, variant, got):
        return {
            "variant": variant, "files": self.files.get(variant),
            "mb_per_s": statistics.median(got["speeds"]), "mb_per_s_all": got["speeds"],
            "udp_rcvbuf_drops_per_gib": got["udp_drops"] / (got["bytes"] / 2**30),
            "tun_tx_drops_per_gib": got["tun_drops"] / (got["bytes"] / 2**30),
            "ttfb_p50_ms": percentile(got["firsts"], 50), "ttfb_p90_ms": percentile(got["firsts"], 90),
            "openvpn_cpu_s_per_gib": got["cpu"] / (got["bytes"] / 2**30),
            "client_socket_buffers": got.get("buffers"), "cipher": got.get("cipher"),
        }


def table(rows, baseline="stock"):
    base = rows.get(baseline, {})
    lines = ["%-16s %7s %13s %7s %8s %8s %9s %11s %10s  %s" % (
        "variant", "MB/s", "min-max", "x stock", "TTFB p50", "TTFB p90", "CPU-s/GiB", "UDP drops/GiB",
        "tun drops", "cipher")]
    for name, row in rows.items():
        if "mb_per_s" not in row:
            lines.append("%-16s (failed)" % name)
            continue
        ratio = row["mb_per_s"] / base["mb_per_s"] if base.get("mb_per_s") else float("nan")
        lines.append("%-16s %7.1f %6.1f-%-6.1f %7.2f %5.2f ms %5.2f ms %9.1f %11.0f %10.0f  %s" % (
            name, row["mb_per_s"], min(row["mb_per_s_all"]), max(row["mb_per_s_all"]), ratio,
            row["ttfb_p50_ms"], row["ttfb_p90_ms"], row["openvpn_cpu_s_per_gib"], row["udp_rcvbuf_drops_per_gib"],
            row["tun_tx_drops_per_gib"], row["cipher"] or "-"))
    lines.append("(MB/s: median of every download, min-max beside it; CPU-s/GiB: OpenVPN server + client;"
                 " drops per GiB downloaded: UDP RcvbufErrors on both ends, the server tun's TX drops)")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("socks5", "http"), default="socks5",
                        help="the phone's proxy: dante SOCKS5 (default) or tinyproxy (2 KiB relay, slower)")
    parser.add_argument("--mib", type=int, default=200, help="download size per round (MiB)")
    parser.add_argument("--passes", type=int, default=5, help="passes over all variants (median reported)")
    parser.add_argument("--rounds", type=int, default=1, help="downloads per variant and pass")
    parser.add_argument("--requests", type=int, default=10, help="first-byte samples per variant and pass")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--json", help="where to write the JSON (default tests/bench/results/path-<timestamp>.json)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("make bench-path needs root (network namespaces, tun, iptables)")
    # SIGTERM (timeout, CI) unwinds like Ctrl-C, so every namespace and process goes with the lab.
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    workdir = tempfile.mkdtemp(prefix="pocketproxy-bench-path-")
    bench = Bench(args, workdir)
    started = time.monotonic()
    try:
        bench.run()
    except KeyboardInterrupt:
        print("bench-path: interrupted; lab torn down")
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    with open("/proc/sys/net/core/rmem_max") as f:
        rmem_max = int(f.read())
    print("\nbench-path: customer -> OpenVPN 2.6 -> pocketproxy -> phone (%s) -> origin; per variant %d x %d MiB,"
          " %d first-byte samples" % (args.device, args.passes * args.rounds, args.mib, args.passes * args.requests))
    print("host: %s, %d CPUs, net.core.rmem_max %d, %.0f s\n" % (platform.platform(), os.cpu_count(), rmem_max,
                                                                time.monotonic() - started))
    print(table(bench.rows))
    failed = [text for ok, text in bench.checks if not ok]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = Path(args.json) if args.json else RESULTS / ("path-%s.json" % stamp)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({
        "benchmark": "path", "time": stamp, "parameters": {k: v for k, v in vars(args).items() if k != "json"},
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "rmem_max": rmem_max},
        "tuning": TUNING, "rows": bench.rows, "checks": [{"ok": ok, "text": text} for ok, text in bench.checks],
    }, indent=1) + "\n")
    print("\nJSON: %s" % json_path)
    print("correct: %s" % ("NO" if failed else "yes"))
    if failed:
        print("FAILED checks:\n  " + "\n  ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
