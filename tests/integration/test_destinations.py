"""Issue 14, the proxy's side: a customer reaches only the internet, through her own phone,
and cannot starve a co-tenant. Real OpenVPN, real tinyproxy phones, the daemon's defaults.

One lab for the module (torn down at the end, also on failure)::

    alice ─┐                               ┌─ phone   tinyproxy MaxClients 50 (users.yaml max_clients: 50);
    bob   ─┤                               │          its /etc/hosts: server-side.test → the server's
    carol ─┼─ OpenVPN ── server ns ────────┤          side of its link, ip6-localhost... → 127.0.0.1
    dave  ─┘  pocketproxy (defaults)       ├─ phone2  tinyproxy (carol: private_networks: allow)
                                           └─ dead    address up, no proxy (connections refused)

alice and bob share ``phone``. Each attack is one test, and each watches a listener where a
bypass would land (the server, the phone's own loopback and link address, another phone, a
private address on the internet) so a bypass is seen, not inferred from an error.
"""

import json
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

from tests.lab.daemon import Daemon
from tests.lab.internet import ISP_GATEWAY
from tests.lab.netns import require_root, require_tools, wait_for
from tests.lab.openvpn import OPENVPN, Lab
from tests.lab.probes import NETCLIENT, Listener, probe, run_json
from tests.lab.world import ORIGIN_IP, ORIGIN_NAME, TINYPROXY, World

PHONE_LIMIT = 50
LOOPBACK_NAMES = ("localhost", "ip6-localhost", "ip6-loopback", "localhost.localdomain")
USERS = {
    "alice": {"password": "alice-pw", "device": "phone"},
    "bob": {"password": "bob-pw", "device": "phone"},
    "carol": {"password": "carol-pw", "device": "phone2", "private_networks": "allow"},
    "dave": {"password": "dave-pw", "device": "dead"},
}

# Opens ``count`` connections to host:port (``parallel`` at a time) and reports how each ended:
# "banner" (the server-first greeting arrived: a live tunnel), "reset", "eof" or "timeout".
# With ``hold`` the live ones are kept open that many seconds before the report.
_MANY = r"""
import errno, json, selectors, socket, sys, time
host, port, count, parallel, hold, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
sel = selectors.DefaultSelector()
out = {"banner": 0, "reset": 0, "eof": 0, "timeout": 0, "error": 0}
started = time.monotonic()
opened = 0
live = []
def start():
    global opened
    s = socket.socket(); s.setblocking(False)
    try:
        s.connect((host, port))
    except BlockingIOError:
        pass
    sel.register(s, selectors.EVENT_READ, time.monotonic())
    opened += 1
while (opened < count or sel.get_map()) and time.monotonic() - started < limit:
    while opened < count and len(sel.get_map()) < parallel:
        start()
    for key, _ in sel.select(0.05):
        s = key.fileobj
        try:
            data = s.recv(4096)
            kind = "banner" if data else "eof"
        except ConnectionResetError:
            kind = "reset"
        except OSError as e:
            kind = "reset" if e.errno in (errno.ECONNREFUSED, errno.ECONNRESET) else "error"
        out[kind] += 1
        sel.unregister(s)
        if kind == "banner" and hold:
            live.append(s)
        else:
            s.close()
    for key in list(sel.get_map().values()):
        if time.monotonic() - key.data > 10:
            out["timeout"] += 1
            sel.unregister(key.fileobj); key.fileobj.close()
out["opened"] = opened
out["seconds"] = time.monotonic() - started
print(json.dumps(out)); sys.stdout.flush()
time.sleep(hold)
"""


@dataclass
class Env:
    lab: Lab
    world: World
    daemon: Daemon
    clients: dict
    tmp: str

    def logs(self):
        return "%s\n%s\n==== pocketproxy ====\n%s" % (self.lab.logs(20), self.world.logs(20), self.daemon.tail(60))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    require_root()
    require_tools(OPENVPN, "ipset", "iptables", "ss", "openssl", TINYPROXY)
    base = tmp_path_factory.mktemp("destinations")
    with Lab(base / "lab") as lab, World(lab.server_ns, base / "world", lab.internet) as world:
        hosts = {"server-side.test": "192.168.255.1"}  # the server's side of the phone's own link
        hosts.update({name: "127.0.0.1" for name in LOOPBACK_NAMES if name != "localhost"})
        phone = world.add_device("phone", max_clients=PHONE_LIMIT, hosts=hosts)
        phone2 = world.add_device("phone2")
        dead = world.add_device("dead", start=False)
        daemon = Daemon(
            lab.server_ns,
            base / "daemon",
            lab.server.mgmt_socket,
            USERS,
            devices={"phone": {"upstream": phone.url, "max_clients": PHONE_LIMIT}, "phone2": phone2.url, "dead": dead.url},
        ).start()
        try:
            daemon.wait_log(r"reconciled with OpenVPN", timeout=30)
            clients = {n: lab.add_client(n, username=n, password=s["password"]) for n, s in USERS.items()}
            for name, client in clients.items():
                client.wait_connected(timeout=30)
                daemon.wait_log(r"admitted user %s " % name, timeout=20)
            yield Env(lab, world, daemon, clients, str(base))
        finally:
            daemon.stop()


@pytest.fixture
def healthy(env):
    if env.daemon.proc.poll() is not None:
        pytest.fail("pocketproxy exited (%s):\n%s" % (env.daemon.proc.returncode, env.daemon.tail()))
    yield env


def many(env, client, host, port, count, parallel=32, hold=0.0, limit=60.0):
    """Run :data:`_MANY` in a client's namespace; returns (Popen, read_report)."""
    proc = env.clients[client].ns.popen(
        [sys.executable, "-c", _MANY, host, str(port), str(count), str(parallel), str(hold), str(limit)],
        stdout=subprocess.PIPE,
        text=True,
    )

    def report():
        line = proc.stdout.readline()
        assert line, "connection script printed nothing (exit %s)" % proc.poll()
        return json.loads(line)

    return proc, report


def netclient(env, client, *args, timeout=10):
    """One run of tests/lab/netclient.py in a client's namespace, its JSON report."""
    return run_json(env.clients[client].ns, sys.executable, NETCLIENT, "--timeout", str(timeout), *args, timeout=timeout)


def test_a_name_the_phone_resolves_to_the_server_finds_nothing(healthy):
    """Host: server-side.test on a sniff port: pocketproxy cannot judge the name (the phone resolves
    it), so the phone is asked for it and connects to the server's side of its link, where the
    firewall's device guard rejects it: the server's listeners on 80 and 8443 see nothing."""
    env = healthy
    phone = env.world.devices["phone"]
    listeners = [Listener(env.lab.server_ns, phone.server_ip, port, env.tmp) for port in (80, 8443)]
    try:
        for port in (80, 8443):
            mark = phone.log_mark()
            result = probe(env.clients["alice"].ns, ORIGIN_IP, port,
                           "GET / HTTP/1.1\r\nHost: server-side.test\r\n\r\n")
            phone.wait_log(r"CONNECT server-side\.test:%d" % port, since=mark, timeout=5)  # really tried
            assert result["outcome"] in ("reset", "eof", "data"), result
            if result["outcome"] == "data":
                assert " 200 " not in result.get("data", ""), result
        assert [listener.before_sentinel() for listener in listeners] == [[], []], env.logs()
    finally:
        for listener in listeners:
            listener.stop()


def test_loopback_names_are_refused_before_the_phone_is_asked(healthy):
    """Host: ip6-localhost (and the other loopback names, which the phone resolves to 127.0.0.1):
    reset at once, no CONNECT for the name, the listener on the phone's loopback sees nothing."""
    env = healthy
    phone = env.world.devices["phone"]
    listener = Listener(phone.ns, "127.0.0.1", 80, env.tmp)
    try:
        mark = phone.log_mark()
        for name in LOOPBACK_NAMES:
            result = probe(env.clients["alice"].ns, ORIGIN_IP, 80, "GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % name)
            assert result["outcome"] == "reset" and result["seconds"] < 1.0, (name, result)
        assert listener.before_sentinel() == []
        # The phone was dialled in parallel with the sniff (and hung up on); it was never asked.
        assert not re.search(r"Request .*: CONNECT ", phone.log_text()[mark:]), phone.log_text()[mark:]
        env.daemon.wait_log(r"refused connection from .* 'localhost' is a single-label name", timeout=5)
    finally:
        listener.stop()


def test_phones_and_their_links_are_refused_by_address(healthy):
    """alice dials her phone's link address, another customer's phone and the server's side of
    the link directly: reset within a second each, and nothing listening there sees her."""
    env = healthy
    phone, phone2 = env.world.devices["phone"], env.world.devices["phone2"]
    listeners = [Listener(phone.ns, phone.ip, 2222, env.tmp), Listener(phone2.ns, phone2.ip, 2222, env.tmp),
                 Listener(env.lab.server_ns, phone.server_ip, 2222, env.tmp)]
    try:
        for target in (phone.ip, phone2.ip, phone.server_ip):
            result = probe(env.clients["alice"].ns, target, 2222, "hello")
            assert result["outcome"] in ("reset", "connect-failed") and result["seconds"] < 1.0, (target, result)
        assert [listener.before_sentinel() for listener in listeners] == [[], [], []], env.logs()
    finally:
        for listener in listeners:
            listener.stop()


def test_private_networks_only_for_the_user_allowed_them_and_never_a_phone(healthy):
    """A listener on a private (CGNAT) address on the internet: alice (the default) is reset,
    carol (private_networks: allow) reaches it through her phone; carol still cannot reach a phone."""
    env = healthy
    phone, phone2 = env.world.devices["phone"], env.world.devices["phone2"]
    listener = Listener(env.lab.internet.ns, ISP_GATEWAY, 8081, env.tmp)
    device_listener = Listener(phone.ns, phone.ip, 2223, env.tmp)
    try:
        result = probe(env.clients["alice"].ns, ISP_GATEWAY, 8081, "hello")
        assert result["outcome"] == "reset" and result["seconds"] < 1.0, result
        assert listener.before_sentinel() == []
        seen = len(listener.accepted())  # the sentinel
        result = probe(env.clients["carol"].ns, ISP_GATEWAY, 8081, "hello")
        assert result["outcome"] in ("eof", "reset"), result
        wait_for(lambda: len(listener.accepted()) > seen, 5, what="carol's connection at the private listener")
        assert [peer.split(":")[0] for peer in listener.accepted()[seen:]] == [phone2.origin_ip]
        result = probe(env.clients["carol"].ns, phone.ip, 2223, "hello")
        assert result["outcome"] == "reset", result
        assert device_listener.before_sentinel() == []
    finally:
        listener.stop()
        device_listener.stop()


def test_a_co_tenant_keeps_her_share_of_a_full_phone(healthy):
    """The phone's proxy takes 50 clients. alice opens 500 connections and holds them; bob, on
    the same phone, fetches 10 times: every fetch succeeds, alice gets her 25 and the rest are
    reset at once (not left to time out in the phone's backlog)."""
    env = healthy
    proc, report = many(env, "alice", ORIGIN_IP, 22, 500, parallel=100, hold=30, limit=60)
    try:
        alice = report()
        assert alice["banner"] == PHONE_LIMIT // 2 and alice["reset"] == 500 - PHONE_LIMIT // 2, alice
        fetched = [netclient(env, "bob", "fetch", "http://%s/whoami" % ORIGIN_IP, timeout=10) for _ in range(10)]
        assert [f.get("status") for f in fetched] == [200] * 10, fetched
        assert {f["body"].strip() for f in fetched} == {env.world.devices["phone"].origin_ip}
    finally:
        env.clients["alice"].ns.stop(proc, timeout=5)


def test_one_customers_silence_does_not_change_how_anothers_tls_is_named(healthy):
    """alice stays silent on :443 six times, so pocketproxy stops sniffing *her* connections there;
    bob's TLS to the same destination still reaches the phone by name."""
    env = healthy
    phone = env.world.devices["phone"]
    for _ in range(6):
        probe(env.clients["alice"].ns, ORIGIN_IP, 443, "", timeout=1)
    mark = phone.log_mark()
    result = netclient(env, "alice", "tls", ORIGIN_IP, "443", ORIGIN_NAME)
    phone.wait_log(r"CONNECT %s:443" % re.escape(ORIGIN_IP), since=mark, timeout=5)  # learned: by IP
    assert "CONNECT %s:443" % ORIGIN_NAME not in phone.log_text()[mark:], result
    mark = phone.log_mark()
    result = netclient(env, "bob", "tls", ORIGIN_IP, "443", ORIGIN_NAME)
    phone.wait_log(r"CONNECT %s:443" % re.escape(ORIGIN_NAME), since=mark, timeout=5)


def test_failing_connections_cannot_flood_the_log(healthy):
    """dave's phone is dead: 5,000 connections, each reset after a failed dial, write a bounded
    log (one line per 10 s per failure kind and client, carrying the count held back)."""
    env = healthy
    before = len(env.daemon.log_text().encode())
    proc, report = many(env, "dave", ORIGIN_IP, 22, 5000, parallel=64, limit=60)
    try:
        dave = report()
    finally:
        env.clients["dave"].ns.stop(proc, timeout=5)
    assert dave["reset"] == 5000 and dave["opened"] == 5000, dave
    grown = env.daemon.log_text().encode()[before:]
    lines = [line for line in grown.decode().splitlines() if "upstream failed for" in line]
    assert 1 <= len(lines) <= 1 + int(dave["seconds"] / 10) + 1, grown[-2000:]
    assert len(grown) < 8192, (len(grown), grown[-2000:])
    print("5000 failing connections in %.1f s: %d log bytes" % (dave["seconds"], len(grown)))
