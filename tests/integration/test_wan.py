"""WAN realism: the whole data path with a cellular-like device link (issue 6, item 2).

The phone sits behind :class:`tests.lab.wan.WanLink`: a tun pair joined by a userspace
forwarder (300 ms ± 100 ms one way, order kept per direction) and ``iptables -m statistic``
dropping 3 % of the packets entering each end (no ``netem`` on these kernels)::

    alice ── OpenVPN ── server ns: pocketproxy :12345 ══ WAN ══ device "phone" ── origin 203.0.113.10
                          192.168.255.1 ppwan…        300±100 ms  192.168.255.2   (devices only)
                                                      3 %/dir     tinyproxy :8080

Checked under those conditions, one lab for the module (about 75 s in all):

- the emulator itself: RTT ≈ 2 × delay over pings, loss ≈ p from kernel counters (own namespaces);
- (a) a 20 MiB download through the full path arrives intact within :data:`DOWNLOAD_BOUND`;
- (b) nothing timed out meanwhile: no timeout, setup-stuck, upstream-failure or forced-close line
  in the daemon log;
- (c) sniffing port 80 adds no more than its budget to the time to first byte, against a port
  that is not sniffed (8081, redirected to the origin's :80 inside the origin namespace), as a
  median of paired, concurrent requests;
- (d) an SSH-style session opened before the download stays idle across the WAN for
  ≥ :data:`MIN_IDLE` s with keepalive shortened to :data:`KEEPALIVE` s (probes do cross the WAN,
  and losing some of them kills nothing) and still echoes afterwards. The defaults' 10-minute
  story (idle_timeout 3600 s, half-closed 60 s) is shown with a fake clock in
  ``tests/unit/test_keepalive_idle.py``.

The congestion control is pinned to ``bbr`` on both ends of the WAN link (``cubic`` cannot be
selected inside these namespaces; only the host's allowed list, here reno and bbr). Loss-based Reno/CUBIC at 3 % loss and
~0.8 s RTT are bounded by ~1.2/sqrt(p) segments per RTT (≈ 15 KB/s), far too slow for 20 MiB
in a test; the report in the module's output says which algorithm ran.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from tests.lab.childlines import ChildLines
from tests.lab.daemon import Daemon
from tests.lab.netns import Namespace, require_root, require_tools, wait_for
from tests.lab.openvpn import OPENVPN, Lab
from tests.lab.origin_server import blob_sha256
from tests.lab.wan import HERE as WAN_SCRIPT
from tests.lab.wan import WanLink
from tests.lab.world import ORIGIN_IP, TINYPROXY, World

NETCLIENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lab", "netclient.py")
PROXY_PORT = 12345
DELAY, JITTER, LOSS = 0.3, 0.1, 0.03
KEEPALIVE = 10  # s; the default is 120 (probes every 30 s, 4 of them): shortened so probes happen in the test
MIN_IDLE = 45.0  # s; the idle session stays silent at least this long (the downloads run meanwhile)
SNIFF_BUDGET = 0.2  # the default, written out because (c) measures against it
SNIFF_TOLERANCE = 0.15  # s, on top of the budget, for the medians of paired differences
PLAIN_PORT = 8081  # not in sniff_ports; the origin namespace redirects it to its HTTP :80
ECHO_PORT = 2222  # a server-first echo service without an idle timeout (the origin's :22 cuts at 60 s)
BLOB = 20 * 1024 * 1024
# Measured on the 2-core lab VM (bbr): the full path 23-28 s (0.75-0.90 MB/s, 4 runs); the bare WAN
# (Python sender, no OpenVPN/pocketproxy/tinyproxy) 21 s and once 76 s, so BBR under 3 % loss has a
# long tail. The bound is ~2x the slowest run seen: a relay that stalls (lost backpressure resume,
# a window that never opens) or a connection cut and retried would exceed it, a healthy one does not.
DOWNLOAD_BOUND = 150.0
USERS = {"alice": {"password": "alice-pw", "device": "phone"}}
FORBIDDEN = re.compile(
    r"closed \d+ proxied connections on timeout|stuck in setup|upstream failed|closing \d+ live connections|Traceback"
)

ECHO_SERVER = r"""
import socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(16)
def serve(conn):
    with conn:
        conn.sendall(b"SSH-2.0-wan-idle\r\n")
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

# An SSH-style session: banner, one echo, then silence until a line on stdin, then one more echo.
IDLE_CLIENT = r"""
import json, socket, sys, time
def line(sock):
    buf = b""
    while not buf.endswith(b"\n"):
        data = sock.recv(4096)
        if not data:
            raise EOFError("closed after %r" % buf)
        buf += data
    return buf
def echo(sock, msg):
    sock.sendall(msg)
    got = b""
    while len(got) < len(msg):
        data = sock.recv(4096)
        if not data:
            raise EOFError("closed after %r" % got)
        got += data
    return got
def say(**kw):
    print(json.dumps(kw), flush=True)
try:
    started = time.monotonic()
    sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
    banner = line(sock)
    first = echo(sock, b"before-idle\n")
    say(phase="open", banner=banner.decode(), echo=first.decode(), seconds=time.monotonic() - started)
    idle_from = time.monotonic()
    sys.stdin.readline()
    idle = time.monotonic() - idle_from
    sent = time.monotonic()
    second = echo(sock, b"after-idle\n")
    say(phase="after", echo=second.decode(), idle_seconds=idle, echo_seconds=time.monotonic() - sent)
    sock.close()
except Exception as e:
    say(phase="error", error="%s: %s" % (type(e).__name__, e))
"""

# Paired time-to-first-byte: each round fetches /whoami on both ports at the same moment.
TTFB_CLIENT = r"""
import json, socket, sys, threading, time
host, ports, rounds = sys.argv[1], [int(p) for p in sys.argv[2].split(",")], int(sys.argv[3])
def fetch(port, out):
    started = time.monotonic()
    try:
        sock = socket.create_connection((host, port), timeout=20)
        sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: origin.test\r\nConnection: close\r\n\r\n")
        first = sock.recv(65536)
        ttfb = time.monotonic() - started
        body = first
        while True:
            data = sock.recv(65536)
            if not data:
                break
            body += data
        sock.close()
        out[port] = {"ttfb": ttfb, "status": body.split(b"\r\n", 1)[0].decode("latin-1"),
                     "body": body.split(b"\r\n\r\n", 1)[-1].decode("latin-1").strip()}
    except Exception as e:
        out[port] = {"error": "%s: %s" % (type(e).__name__, e), "seconds": time.monotonic() - started}
results = []
for _ in range(rounds):
    out = {}
    threads = [threading.Thread(target=fetch, args=(port, out)) for port in ports]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.append({str(port): out[port] for port in ports})
    time.sleep(0.3)
print(json.dumps(results))
"""


@dataclass
class Env:
    lab: Lab
    world: World
    wan: WanLink
    daemon: Daemon
    client: object
    ip: str
    idle: subprocess.Popen
    idle_lines: ChildLines
    idle_opened_at: float
    probes_at_open: int
    congestion: str

    def logs(self):
        return "%s\n%s\n==== pocketproxy ====\n%s" % (self.lab.logs(20), self.world.logs(20), self.daemon.tail(60))


def _netclient(ns, *args, timeout=30):
    out = ns.run(sys.executable, NETCLIENT, "--timeout", str(timeout), *args, check=False, timeout=timeout + 30)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise AssertionError("netclient %s failed (%s): %s %s" % (args, out.returncode, out.stdout, out.stderr))


def _listening(ns, port):
    return ":%d " % port in ns.run("ss", "-Hltn", check=False).stdout + " "


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Lab + one phone behind the emulated WAN + pocketproxy + alice, and alice's idle session."""
    require_root()
    require_tools(OPENVPN, "ipset", "iptables", "iptables-save", "ss", "openssl", TINYPROXY)
    base = tmp_path_factory.mktemp("wan")
    with Lab(base / "lab") as lab, World(lab.server_ns, base / "world", lab.internet) as world:
        wan = WanLink(base / "wan", delay=DELAY, jitter=JITTER, loss=LOSS, lifetime=900)
        idle = None
        try:
            phone = world.add_device("phone", username="dev", password="devpw", link_with=wan.link)
            origin_ns = world.origin.ns
            origin_ns.popen([sys.executable, "-c", ECHO_SERVER, ORIGIN_IP, str(ECHO_PORT)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            origin_ns.run("iptables", "-w", "-t", "nat", "-A", "PREROUTING", "-d", ORIGIN_IP, "-p", "tcp",
                          "--dport", str(PLAIN_PORT), "-j", "REDIRECT", "--to-ports", "80")
            wait_for(lambda: _listening(origin_ns, ECHO_PORT), 10, what="origin echo service")
            daemon = Daemon(
                lab.server_ns,
                base / "daemon",
                lab.server.mgmt_socket,
                USERS,
                devices={"phone": phone.url},
               
                proxy={"listen": PROXY_PORT, "bind": ["0.0.0.0"], "sniff_budget": SNIFF_BUDGET,
                       "keepalive": KEEPALIVE},
            ).start()
            daemon.wait_log(r"transparent proxy listening on 0\.0\.0\.0:%d" % PROXY_PORT, timeout=30)
            daemon.wait_log(r"reconciled with OpenVPN", timeout=30)
            client = lab.add_client("alice", username="alice", password=USERS["alice"]["password"])
            ip = client.wait_connected(timeout=30)
            daemon.wait_log(r"admitted user alice ", timeout=20)
            # DOWNLOAD_BOUND assumes BBR (loss-based Reno/CUBIC manage ~15 KB/s here): pin it on both
            # ends of the WAN link instead of inheriting whatever the host's default is.
            for ns in (lab.server_ns, phone.ns):
                ns.run("sysctl", "-qw", "net.ipv4.tcp_congestion_control=bbr")
            congestion = lab.server_ns.run("sysctl", "-n", "net.ipv4.tcp_congestion_control").stdout.strip()
            idle = client.ns.popen([sys.executable, "-c", IDLE_CLIENT, ORIGIN_IP, str(ECHO_PORT)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            idle_lines = ChildLines(idle.stdout)
            opened = idle_lines.json(30, idle)
            assert opened.get("phase") == "open", opened
            assert opened["banner"].startswith("SSH-2.0-wan-idle") and opened["echo"] == "before-idle\n", opened
            print("\nidle session open after %.2f s (banner + one echo over the WAN)" % opened["seconds"])
            yield Env(lab, world, wan, daemon, client, ip, idle, idle_lines, time.monotonic(), _keepalive_probes(lab.server_ns),
                      congestion)
        finally:
            if idle is not None:
                try:
                    idle.stdin.close()
                except OSError:
                    pass
                client_ns = lab.clients[0].ns if lab.clients else None
                if client_ns is not None:
                    client_ns.stop(idle, timeout=5)
            stats = wan.close()
            if stats:
                print("\nWAN forwarder final stats: %s" % json.dumps({k: stats[k] for k in ("a_to_b", "b_to_a")}))


def test_emulator_rtt_and_loss(tmp_path):
    """The emulator alone: ping RTT ≈ 2×delay (within jitter), loss per side ≈ p by kernel counters."""
    require_root()
    require_tools("iptables", "iptables-save")
    a, b = Namespace("wea"), None
    wan = None
    try:
        b = Namespace("web")
        wan = WanLink(tmp_path, delay=DELAY, jitter=JITTER, loss=LOSS, lifetime=120)
        wan.link(a, "192.168.240.1", b, "192.168.240.2")
        # Pings 0.4 s apart (≥ 2×jitter): no packet waits for its predecessor, each sees the bare distribution.
        out = a.run(sys.executable, WAN_SCRIPT, "ping", "192.168.240.2", "--count", "30", "--interval", "0.4",
                    "--timeout", "2", timeout=60)
        pings = json.loads(out.stdout)
        rtts = pings["rtts"]
        floods = [
            a.run(sys.executable, WAN_SCRIPT, "udpflood", "192.168.240.2", "--count", "3000", "--rate", "3000",
                  timeout=30),
            b.run(sys.executable, WAN_SCRIPT, "udpflood", "192.168.240.1", "--count", "3000", "--rate", "3000",
                  timeout=30),
        ]
        assert all(f.returncode == 0 for f in floods)
        # Wait until everything queued has been delivered: the forwarder's delay lines are empty
        # and the far sides' kernel counters have stopped moving.
        last = {}

        def drained():
            queued, seen = wan.stats()["queued"], wan.loss_counters()
            settled = not any(queued.values()) and seen == last.get("seen")
            last["seen"] = seen
            return settled

        wait_for(drained, 10, interval=0.1, what="the WAN to deliver every queued packet")
        counters = wan.loss_counters()
        stats = wan.stats()
    finally:
        if wan is not None:
            wan.close()
        for ns in (b, a):
            if ns is not None:
                ns.destroy()
    mean = statistics.fmean(rtts)
    lost_pings = pings["sent"] - pings["received"]
    print("\nping RTT over %d/%d: mean %.3f s, median %.3f, min %.3f, max %.3f (2×delay = %.3f)"
          % (len(rtts), pings["sent"], mean, statistics.median(rtts), min(rtts), max(rtts), 2 * DELAY))
    print("kernel loss counters: %s" % counters)
    print("forwarder: a->b %d packets (mean delay %.3f), b->a %d packets (mean delay %.3f)" % (
        stats["a_to_b"]["packets"], stats["a_to_b"]["delay_mean"], stats["b_to_a"]["packets"],
        stats["b_to_a"]["delay_mean"]))
    assert len(rtts) >= 20, pings  # a round trip survives with (1-p)^2 ≈ 94 %
    assert abs(mean - 2 * DELAY) <= 0.06, rtts  # the std error of the mean is ≈ 15 ms
    assert min(rtts) >= 2 * (DELAY - JITTER) - 0.005, rtts
    assert max(rtts) <= 2 * (DELAY + JITTER) + 0.05, rtts
    for side in ("a", "b"):
        seen, dropped = counters[side]["seen"], counters[side]["dropped"]
        assert seen >= 3000, counters
        # Binomial std ≈ 0.3 % at n = 3000: ±1.5 % is ~5 sigma, never flaky, still catches p = 0 or 2p.
        assert abs(dropped / seen - LOSS) <= 0.015, counters
    # The forwarder delivered every packet the far side's kernel counted (nothing lost in userspace).
    assert stats["a_to_b"]["packets"] == counters["b"]["seen"], (stats, counters)
    assert stats["b_to_a"]["packets"] == counters["a"]["seen"], (stats, counters)
    for direction in ("a_to_b", "b_to_a"):
        s = stats[direction]
        assert s["dropped_queue"] == 0 and s["write_errors"] == 0, s
        assert DELAY - JITTER - 0.001 <= s["delay_min"] and s["delay_max"] <= DELAY + JITTER + 0.001, s


def test_20mib_download_through_the_wan_is_intact_and_nothing_times_out(env):
    """(a) + (b): 20 MiB through VPN → pocketproxy → WAN → tinyproxy → origin, correct sha256, in bound."""
    mark = env.daemon.log_mark()
    before = env.wan.loss_counters()
    result = _netclient(env.client.ns, "fetch", "http://%s/blob/%d" % (ORIGIN_IP, BLOB), timeout=DOWNLOAD_BOUND)
    after = env.wan.loss_counters()
    assert result.get("status") == 200, "%s\n%s" % (result, env.logs())
    assert result["length"] == BLOB, result
    assert result["sha256"] == blob_sha256(BLOB), result
    seen = after["a"]["seen"] - before["a"]["seen"]
    dropped = after["a"]["dropped"] - before["a"]["dropped"]
    print("\n20 MiB over the WAN (%s): %.1f s, %.3f MB/s, first byte %.2f s; server side lost %d of %d packets"
          " (%.2f %%)"
          % (env.congestion, result["seconds"], result["mb_per_s"], result["first_byte_seconds"], dropped, seen,
             100.0 * dropped / max(seen, 1)))
    assert result["seconds"] <= DOWNLOAD_BOUND, result
    assert dropped > 0, "the WAN lost nothing: the loss rules are not on the path (%s)" % after
    # (b) nothing timed out or was cut while it ran.
    new = env.daemon.log_text()[mark:]
    bad = [line for line in new.splitlines() if FORBIDDEN.search(line)]
    assert not bad, "\n".join(bad)


def test_sniff_budget_adds_at_most_the_budget(env):
    """(c) TTFB on port 80 (Host sniffed, dial in parallel) vs 8081 (not sniffed): median of paired differences."""
    # Each request crosses the WAN ~3 round trips; a loss there costs an RTO (≥ ~1 s), hitting ~1 request in 5.
    # A pair's difference is then off by a second either way, so the median needs a majority of clean pairs:
    # with 11 pairs, 6 pairs with only the sniffed side hit (p ≈ 0.16 each) happen ~0.3 % of runs.
    rounds = 11
    mark = env.daemon.log_mark()
    out = env.client.ns.run(sys.executable, "-c", TTFB_CLIENT, ORIGIN_IP, "80,%d" % PLAIN_PORT, str(rounds),
                            timeout=rounds * 45)
    results = json.loads(out.stdout)
    sniffed, plain, diffs = [], [], []
    for r in results:
        a, b = r["80"], r[str(PLAIN_PORT)]
        assert "ttfb" in a and "ttfb" in b, "%s\n%s" % (r, env.logs())
        assert a["status"].endswith("200 OK") and b["status"].endswith("200 OK"), r
        assert a["body"] == b["body"] == env.world.devices["phone"].origin_ip, r
        sniffed.append(a["ttfb"])
        plain.append(b["ttfb"])
        diffs.append(a["ttfb"] - b["ttfb"])
    added = statistics.median(diffs)
    print("\nTTFB over the WAN, %d pairs: sniffed :80 median %.3f s %s; not sniffed :%d median %.3f s %s;"
          " added by sniffing (median of paired differences) %+.3f s, budget %.1f s"
          % (rounds, statistics.median(sniffed), ["%.2f" % x for x in sniffed], PLAIN_PORT, statistics.median(plain),
             ["%.2f" % x for x in plain], added, SNIFF_BUDGET))
    assert added <= SNIFF_BUDGET + SNIFF_TOLERANCE, diffs
    # The sniffed requests did go out by name (CONNECT origin.test:80), the plain ones by IP.
    log = env.world.devices["phone"].log_text()
    assert "CONNECT origin.test:80 HTTP/1.1" in log and "CONNECT %s:%d HTTP/1.1" % (ORIGIN_IP, PLAIN_PORT) in log
    bad = [line for line in env.daemon.log_text()[mark:].splitlines() if FORBIDDEN.search(line)]
    assert not bad, "\n".join(bad)


def test_idle_ssh_style_session_survives_with_keepalive(env):
    """(d) The session opened before the downloads, silent ≥ MIN_IDLE s across the WAN, still echoes."""
    server = env.lab.server_ns
    # Keepalive is armed on the upstream leg (the one crossing the WAN) of the idle session.
    sockets = server.run("ss", "-tno", "state", "established", "dst", "192.168.255.2", check=False).stdout
    assert re.search(r":8080\s.*timer:\(keepalive", sockets, re.S), sockets
    remaining = MIN_IDLE - (time.monotonic() - env.idle_opened_at)
    if remaining > 0:
        time.sleep(remaining)
    probes = _keepalive_probes(server) - env.probes_at_open
    env.idle.stdin.write("go\n")
    env.idle.stdin.flush()
    result = env.idle_lines.json(30, env.idle)
    print("\nidle session: silent %.1f s, echo after idle took %.2f s, keepalive probes sent by the server "
          "namespace meanwhile: %d" % (result.get("idle_seconds", -1), result.get("echo_seconds", -1),
                                                  probes))
    assert result.get("phase") == "after", "%s\n%s" % (result, env.logs())
    assert result["echo"] == "after-idle\n"
    assert result["idle_seconds"] >= MIN_IDLE - 1
    # Probes crossed the WAN (KEEPALIVE s idle, then one per KEEPALIVE/4 s until answered) and some of them
    # or their answers were lost: that must not matter, 4 unanswered in a row would be needed.
    assert probes >= 2, probes
    bad = [line for line in env.daemon.log_text().splitlines() if FORBIDDEN.search(line)]
    assert not bad, "\n".join(bad)
    stats = env.wan.stats()
    assert stats["a_to_b"]["dropped_queue"] == 0 and stats["b_to_a"]["dropped_queue"] == 0, stats


def _keepalive_probes(ns):
    """The namespace's TcpExt TCPKeepAlive counter (keepalive probes sent)."""
    text = ns.run("cat", "/proc/net/netstat").stdout.splitlines()
    for names, values in zip(text[::2], text[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            return int(table.get("TCPKeepAlive", 0))
    return 0
