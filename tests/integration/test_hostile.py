"""Hostile VPN clients against the real daemon: slowloris on the proxy port and the admin
socket, and isolation (what a client must never reach through the proxy).

One lab for the module (torn down at the end, also on failure)::

    alice ─┐                              ┌─ phone    tinyproxy (BasicAuth)  ─┐
    bob   ─┼─ OpenVPN ── server ns ───────┼─ phone2   tinyproxy              ─┼─ origin 203.0.113.10
    dave  ─┘  10.9.0.0/24  pocketproxy    └─ mute     accepts TCP, never answers
                           :12345, admin socket, metrics on 127.0.0.1

The daemon runs with short, explicit timeouts (sniff budget 0.5 s, connect/handshake 2 s,
idle 3 s; the idle sweep runs every 5 s) so each timeout is observable in seconds. Every
helper process is started with ``Namespace.popen`` and bounded by its own deadline.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import pytest

from tests.lab.daemon import Daemon
from tests.lab.netns import require_root, require_tools, wait_for
from tests.lab.openvpn import OPENVPN, Lab
from tests.lab.probes import NETCLIENT, Listener, last_json, probe
from tests.lab.world import ORIGIN_IP, TINYPROXY, World

PROXY_PORT = 12345
SNIFF_BUDGET = 0.5
HANDSHAKE_TIMEOUT = 2.0
IDLE_TIMEOUT = 3.0
SWEEP_INTERVAL = 5.0  # ProxySettings.sweep_interval: not configurable, so the idle cut lands within it
USERS = {
    "alice": {"password": "alice-pw", "device": "phone"},
    "bob": {"password": "bob-pw", "device": "phone2"},
    "dave": {"password": "dave-pw", "device": "mute"},
}

# A TCP client that stays silent or trickles bytes, reporting how and when the connection ended.
_SLOW_CLIENT = r"""
import json, socket, sys, time
host, port, mode, duration, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), sys.argv[5].encode()
started = time.monotonic()
out = {"outcome": "open", "received": 0, "sent": 0}
try:
    s = socket.create_connection((host, port), timeout=5)
    out["connected"] = time.monotonic() - started
    s.settimeout(0.2)
    i = 0
    next_send = time.monotonic()
    while time.monotonic() - started < duration:
        if mode == "trickle" and time.monotonic() >= next_send and i < len(payload):
            s.send(payload[i:i + 1]); i += 1; out["sent"] = i
            next_send += 1.0
        try:
            data = s.recv(65536)
        except socket.timeout:
            continue
        if not data:
            out["outcome"] = "eof"; break
        out["received"] += len(data)
except ConnectionResetError:
    out["outcome"] = "reset"
except OSError as e:
    out["outcome"] = "error"; out["error"] = repr(e)
out["seconds"] = time.monotonic() - started
print(json.dumps(out))
"""

# Listens and completes TCP handshakes (kernel backlog) but never accepts or answers: a mute device.
_MUTE = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64)
open(sys.argv[3], "w").close()
time.sleep(3600)
"""


@dataclass
class Env:
    lab: Lab
    world: World
    daemon: Daemon
    clients: dict
    ips: dict
    admin_path: str
    tmp: str

    def logs(self):
        return "%s\n%s\n==== pocketproxy ====\n%s" % (self.lab.logs(20), self.world.logs(20), self.daemon.tail(60))


def slow_client(ns, host, port, mode, duration, payload=""):
    """Start the slow client in ``ns``; returns the Popen (stdout piped, text)."""
    return ns.popen(
        [sys.executable, "-c", _SLOW_CLIENT, host, str(port), mode, str(duration), payload or "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc, timeout):
    """Wait (bounded) for a slow client and return its JSON report."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError("slow client did not finish within %ss: %s %s" % (timeout, out, err))

    class R:
        stdout, stderr = out, err

    return last_json(R, "slow client")


def whoami(env, client, timeout=10):
    """``GET http://203.0.113.10/whoami`` from ``client``'s namespace through the proxy (netclient's JSON)."""
    out = env.clients[client].ns.run(sys.executable, NETCLIENT, "--timeout", str(timeout), "fetch",
                                     "http://%s/whoami" % ORIGIN_IP, check=False, timeout=timeout + 30)
    return last_json(out, "whoami")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Lab, three devices (one mute), the origin, pocketproxy with short timeouts and an admin socket."""
    require_root()
    require_tools(OPENVPN, "ipset", "iptables", "ss", "openssl", TINYPROXY)
    base = tmp_path_factory.mktemp("hostile")
    sockdir = tempfile.mkdtemp(prefix="pphost-")  # unix socket paths must stay short
    admin_path = os.path.join(sockdir, "admin.sock")
    mute_proc = None
    try:
        with Lab(base / "lab") as lab, World(lab.server_ns, base / "world", lab.internet) as world:
            phone = world.add_device("phone", username="dev", password="devpw")
            phone2 = world.add_device("phone2")
            mute = world.add_device("mute", start=False)
            ready = str(base / "mute.ready")
            mute_proc = mute.ns.popen([sys.executable, "-c", _MUTE, mute.ip, str(mute.port), ready],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for(lambda: os.path.exists(ready), 10, what="mute device listening")
            daemon = Daemon(
                lab.server_ns,
                base / "daemon",
                lab.server.mgmt_socket,
                USERS,
                devices={"phone": phone.url, "phone2": phone2.url, "mute": mute.url},
               
                proxy={
                    "listen": PROXY_PORT,
                    "bind": ["0.0.0.0"],
                    "sniff_budget": SNIFF_BUDGET,
                    "connect_timeout": HANDSHAKE_TIMEOUT,
                    "handshake_timeout": HANDSHAKE_TIMEOUT,
                    "idle_timeout": IDLE_TIMEOUT,
                },
                admin={"socket": admin_path, "mode": "0600"},
            ).start()
            daemon.wait_log(r"transparent proxy listening on 0\.0\.0\.0:%d" % PROXY_PORT, timeout=30)
            daemon.wait_log(r"admin socket listening on", timeout=30)
            daemon.wait_log(r"reconciled with OpenVPN", timeout=30)
            clients = {n: lab.add_client(n, username=n, password=s["password"]) for n, s in USERS.items()}
            ips = {n: c.wait_connected(timeout=30) for n, c in clients.items()}
            for name in USERS:
                daemon.wait_log(r"admitted user %s " % name, timeout=20)
            try:
                yield Env(lab, world, daemon, clients, ips, admin_path, str(base))
            finally:
                if mute_proc is not None:
                    mute.ns.stop(mute_proc, timeout=5)
                daemon.stop()
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


@pytest.fixture
def healthy(env):
    if env.daemon.proc.poll() is not None:
        pytest.fail("pocketproxy exited (%s):\n%s" % (env.daemon.proc.returncode, env.daemon.tail()))
    yield env


# --- slowloris on the proxy port ------------------------------------------------------------------


def test_slow_clients_are_cut_by_their_timeouts_and_others_are_unaffected(healthy):
    """alice opens a silent connection to :443 and a one-byte-per-second request to :80 while bob works.

    - silent :443: the sniff budget ends the peek (0.5 s), the relay then sees no traffic and
      the idle timeout (3 s, swept every 5 s) cuts it: closed within ~8.5 s, logged;
    - trickling :80: the head never completes inside the budget, so CONNECT goes out by IP
      within the budget (the proxy does not wait for the full head); while bytes keep coming
      the connection is not idle and stays up;
    - meanwhile bob's requests are answered at normal speed.
    """
    env = healthy
    alice = env.clients["alice"].ns
    phone = env.world.devices["phone"]
    mark, phone_mark = env.daemon.log_mark(), phone.log_mark()
    started = time.monotonic()
    silent = slow_client(alice, ORIGIN_IP, 443, "silent", 20)
    trickle = slow_client(alice, ORIGIN_IP, 80, "trickle", 7, "GET /whoami HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    try:
        phone.wait_log(r"CONNECT %s:80 HTTP/1\.1" % re.escape(ORIGIN_IP), timeout=SNIFF_BUDGET + 3, since=phone_mark)
        connect_seen = time.monotonic() - started
        for _ in range(3):
            t = time.monotonic()
            result = whoami(env, "bob")
            assert result.get("status") == 200, "%s\n%s" % (result, env.logs())
            assert time.monotonic() - t < 5, "bob slowed down by alice's slow connections"
        quiet = finish(silent, timeout=30)
        slow = finish(trickle, timeout=30)
    finally:
        for proc in (silent, trickle):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert connect_seen < SNIFF_BUDGET + 3, connect_seen
    assert quiet["outcome"] in ("eof", "reset"), "%s\n%s" % (quiet, env.logs())
    assert IDLE_TIMEOUT - 0.5 <= quiet["seconds"] <= SNIFF_BUDGET + IDLE_TIMEOUT + SWEEP_INTERVAL + 2.5, quiet
    env.daemon.wait_log(r"closed \d+ proxied connections on timeout", since=mark, timeout=5)
    assert slow["outcome"] == "open" and slow["sent"] >= 5, slow


def test_mute_device_is_cut_by_the_handshake_timeout(healthy):
    """dave's device accepts TCP and never answers CONNECT: dave gets an RST after ~2 s, logged; alice is fine."""
    env = healthy
    mark = env.daemon.log_mark()
    result = probe(env.clients["dave"].ns, ORIGIN_IP, 80, "GET /whoami HTTP/1.0\r\nHost: origin.test\r\n\r\n", timeout=15)
    assert result["outcome"] == "reset", "%s\n%s" % (result, env.logs())
    assert HANDSHAKE_TIMEOUT - 0.5 <= result["seconds"] <= HANDSHAKE_TIMEOUT + 2.5, result
    env.daemon.wait_log(r"upstream failed for %s .*: timeout" % re.escape(env.ips["dave"]), since=mark, timeout=5)
    assert whoami(env, "alice").get("status") == 200


# --- slowloris on the admin socket ----------------------------------------------------------------


_PENDING = {}


def _admin_line(sock):
    """One CRLF line from an admin socket (bytes after it are kept for the next call)."""
    buf = _PENDING.pop(sock.fileno(), b"")
    while b"\r\n" not in buf:
        data = sock.recv(4096)
        if not data:
            raise EOFError(buf)
        buf += data
    line, rest = buf.split(b"\r\n", 1)
    _PENDING[sock.fileno()] = rest
    return line


def test_admin_slowloris_does_not_block_other_operators(healthy):
    """Admin clients that send nothing, or a partial line byte by byte, do not delay another
    operator's commands; a line past the 1000-byte limit is refused and closed."""
    env = healthy
    idle = socket.socket(socket.AF_UNIX)
    partial = socket.socket(socket.AF_UNIX)
    long_line = socket.socket(socket.AF_UNIX)
    operator = socket.socket(socket.AF_UNIX)
    try:
        for s in (idle, partial, long_line, operator):
            s.settimeout(10)
            s.connect(env.admin_path)
            assert _admin_line(s).startswith(b">INFO:pocketproxy admin interface")
        for byte in b"pp sta":
            partial.send(bytes([byte]))
            t = time.monotonic()
            operator.sendall(b"pp stats\n")
            lines = []
            while not lines or lines[-1] != b"END":
                lines.append(_admin_line(operator))
            assert time.monotonic() - t < 2, "operator delayed by a slow admin client"
        long_line.sendall(b"x" * 1200)
        assert _admin_line(long_line) == b"ERROR: line too long (limit 1000 bytes)"
        assert long_line.recv(100) == b""
    finally:
        for s in (idle, partial, long_line, operator):
            _PENDING.pop(s.fileno(), None)
            s.close()


# --- isolation ----------------------------------------------------------------------------------------


def test_proxy_port_straight_from_a_client_is_reset_by_the_input_policy(healthy):
    """alice connecting to the proxy port on the server's tunnel or device-side address: an RST from
    filter INPUT (only REDIRECTed connections may reach the port), so the proxy never sees it. Its
    loop guard stays the second line of defence (tests/integration/test_proxy_kernel.py)."""
    env = healthy
    alice = env.clients["alice"].ns
    phone = env.world.devices["phone"]
    # The device-side address is not pushed to clients: route it into the tunnel by hand.
    route = ["%s/32" % phone.server_ip, "dev", env.clients["alice"].dev]
    alice.run("ip", "route", "replace", *route)
    try:
        before = proxy_stats(env)
        for address in (env.lab.server.vpn_ip, phone.server_ip):
            result = probe(alice, address, PROXY_PORT, "GET / HTTP/1.0\r\n\r\n")
            # The RST can beat connect()'s return (then Python reports it as a failed connect).
            assert result["outcome"] == "reset" or (
                result["outcome"] == "connect-failed" and re.search(r"Connection(Refused|Reset)", result["error"])
            ), "%s: %s\n%s" % (address, result, env.logs())
            assert result["seconds"] < 1.0, result
        after = proxy_stats(env)
        assert after["accepted"] == before["accepted"] and after["refused"] == before["refused"], (before, after)
    finally:
        alice.run("ip", "route", "del", *route, check=False)


def proxy_stats(env):
    """The proxy counters from ``pp stats --json`` on the admin socket."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    try:
        s.connect(env.admin_path)
        _admin_line(s)
        s.sendall(b"pp stats --json\n")
        return json.loads(_admin_line(s))["proxy"]
    finally:
        _PENDING.pop(s.fileno(), None)
        s.close()


def test_another_clients_vpn_address_is_unreachable(healthy):
    """bob listens on his VPN address; alice's connection to it is reset and bob never sees it."""
    env = healthy
    bob = env.clients["bob"]
    listener = Listener(bob.ns, env.ips["bob"], 7000, env.tmp)
    try:
        # bob's listener works for bob himself (so "not seen" below means something).
        assert probe(bob.ns, env.ips["bob"], 7000)["outcome"] in ("eof", "reset")
        seen = len(listener.accepted())
        assert seen == 1
        result = probe(env.clients["alice"].ns, env.ips["bob"], 7000, "hello")
        assert result["outcome"] in ("reset", "connect-failed"), "%s\n%s" % (result, env.logs())
        assert len(listener.before_sentinel()) == seen, listener.accepted()
    finally:
        listener.stop()


def test_names_cannot_steer_the_device_to_server_local_services(healthy):
    """Host/SNI naming localhost or 127.0.0.1 never reaches a listener on the server's 127.0.0.1:
    an IP literal is not a name, so the device is asked for the original IP; ``localhost`` is a
    name no public host has, so the connection is reset before the device is asked
    (tests/integration/test_destinations.py has the other loopback names). The server-local
    listener sees nothing."""
    env = healthy
    phone = env.world.devices["phone"]
    listener = Listener(env.lab.server_ns, "127.0.0.1", 7002, env.tmp)
    try:
        for host in ("127.0.0.1:7002", "[::1]:7002", "0x7f.1:7002"):
            mark = phone.log_mark()
            probe(env.clients["alice"].ns, ORIGIN_IP, 80, "GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host)
            phone.wait_log(r"CONNECT %s:80 HTTP/1\.1" % re.escape(ORIGIN_IP), since=mark, timeout=5)
            assert "CONNECT %s" % host.split(":")[0] not in phone.log_text()[mark:]
        mark = phone.log_mark()
        result = probe(env.clients["alice"].ns, ORIGIN_IP, 80, "GET / HTTP/1.1\r\nHost: localhost:7002\r\n\r\n")
        assert result["outcome"] == "reset", result
        assert not re.search(r"Request .*: CONNECT ", phone.log_text()[mark:])
        assert listener.accepted() == []
    finally:
        listener.stop()


def test_only_the_proxy_and_dns_listen_beyond_loopback(healthy):
    """The management and admin sockets are unix sockets and metrics binds 127.0.0.1: the daemon's
    only listeners a VPN client can address are the proxy port (reachable only through the
    REDIRECT) and the DNS service on the tunnel address, port 53."""
    env = healthy
    vpn_ip = env.lab.server.vpn_ip
    out = env.lab.server_ns.run("ss", "-Hlntup").stdout
    ours = [line.split() for line in out.splitlines() if "pid=%d," % env.daemon.proc.pid in line]
    assert any(f[4].endswith(":%d" % PROXY_PORT) for f in ours), out
    assert sorted(f[0] for f in ours if f[4] == "%s:53" % vpn_ip) == ["tcp", "udp"], out
    for f in ours:
        address, _, port = f[4].rpartition(":")
        assert address in ("127.0.0.1", "[::1]") or port == str(PROXY_PORT) or f[4] == "%s:53" % vpn_ip, f
    for path in (env.admin_path, env.lab.server.mgmt_socket):
        assert os.path.exists(path) and not os.path.isfile(path)


def test_server_service_on_the_tunnel_address_is_unreachable(healthy):
    """A TCP listener on the server's tunnel address never sees a VPN client's connection: filter
    INPUT resets it at once (nat POCKETPROXY leaves local destinations alone, so without that
    policy any service on the tunnel address or 0.0.0.0 would be open to customers)."""
    env = healthy
    listener = Listener(env.lab.server_ns, env.lab.server.vpn_ip, 7001, env.tmp)
    try:
        assert probe(env.lab.server_ns, env.lab.server.vpn_ip, 7001)["outcome"] in ("eof", "reset")
        seen = len(listener.accepted())
        result = probe(env.clients["alice"].ns, env.lab.server.vpn_ip, 7001, "hello")
        assert result["outcome"] in ("reset", "connect-failed") and result["seconds"] < 1.0, result
        assert len(listener.before_sentinel()) == seen, (result, listener.accepted())
    finally:
        listener.stop()
