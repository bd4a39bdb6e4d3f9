"""The whole data path: VPN client → OpenVPN → REDIRECT → pocketproxy → device proxy → origin.

One lab per module (built once, torn down at the end, also on failure)::

    client alice ─┐                               ┌─ device "phone"     tinyproxy, BasicAuth ─┐
    client bob   ─┼─ OpenVPN ── server ns ────────┼─ device "phone2"    tinyproxy, no auth   ─┼─ origin 203.0.113.10
    client carol ─┘  10.9.0.0/24  pocketproxy     └─ device "sockphone" dante SOCKS5          ─┘  (devices only)
                     push route 203.0.113.0/24    :12345

alice → phone (192.168.255.2, origin side 203.0.113.2), bob → phone2 (192.168.254.2,
203.0.113.3), carol → sockphone (192.168.253.2, 203.0.113.4). The server namespace has no
route to the origin, so whatever reaches it went through a device; the origin reports the
peer it saw. Every test is independent in outcome: a per-test fixture restarts any device a
test stopped and fails early if the daemon died.
"""

import json
import os
import re
import sys
from dataclasses import dataclass

import pytest

from tests.lab.daemon import Daemon
from tests.lab.netns import require_root, require_tools
from tests.lab.openvpn import OPENVPN, Lab
from tests.lab.origin_server import BANNER, blob_sha256
from tests.lab.world import DANTED, ORIGIN_IP, ORIGIN_NAME, TINYPROXY, World

NETCLIENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lab", "netclient.py")
PROXY_PORT = 12345
SNIFF_BUDGET = 2.0
BLOB = 200 * 1024 * 1024
USERS = {
    "alice": {"password": "alice-pw", "device": "phone"},
    "bob": {"password": "bob-pw", "device": "phone2"},
    "carol": {"password": "carol-pw", "device": "sockphone"},
}


@dataclass
class Env:
    lab: Lab
    world: World
    daemon: Daemon
    clients: dict  # name -> OpenVPNClient
    ips: dict  # name -> VPN address

    def device(self, name):
        return self.world.devices[name]

    def logs(self):
        return "%s\n%s\n==== pocketproxy ====\n%s" % (self.lab.logs(20), self.world.logs(20), self.daemon.tail(60))


def netclient(ns, *args, timeout=30):
    """Run tests/lab/netclient.py in ``ns``; the parsed JSON result (bounded by ``timeout``)."""
    out = ns.run(sys.executable, NETCLIENT, "--timeout", str(timeout), *args, check=False, timeout=timeout + 30)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise AssertionError("netclient %s failed (%s): %s %s" % (args, out.returncode, out.stdout, out.stderr))


def whoami(env, client, timeout=15):
    result = netclient(env.clients[client].ns, "fetch", "http://%s/whoami" % ORIGIN_IP, timeout=timeout)
    assert result.get("status") == 200, "%s: %s\n%s" % (client, result, env.logs())
    return result["body"].strip()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The lab, three devices, the origin, pocketproxy under twistd and three connected clients."""
    require_root()
    require_tools(OPENVPN, "ipset", "iptables", "ss", "openssl", TINYPROXY, DANTED)
    base = tmp_path_factory.mktemp("proxy-path")
    with Lab(base / "lab") as lab, World(lab.server_ns, base / "world", lab.internet) as world:
        phone = world.add_device("phone", username="dev", password="devpw")
        phone2 = world.add_device("phone2")
        sockphone = world.add_device("sockphone", kind="socks5")
        daemon = Daemon(
            lab.server_ns,
            base / "daemon",
            lab.server.mgmt_socket,
            USERS,
            devices={"phone": phone.url, "phone2": phone2.url, "sockphone": sockphone.url},
           
            proxy={"listen": PROXY_PORT, "bind": ["0.0.0.0"], "sniff_budget": SNIFF_BUDGET},
        ).start()
        daemon.wait_log(r"transparent proxy listening on 0\.0\.0\.0:%d" % PROXY_PORT, timeout=30)
        daemon.wait_log(r"reconciled with OpenVPN", timeout=30)
        clients = {name: lab.add_client(name, username=name, password=spec["password"]) for name, spec in USERS.items()}
        ips = {name: client.wait_connected(timeout=30) for name, client in clients.items()}
        for name, client in clients.items():
            route = client.ns.run("ip", "route", "get", ORIGIN_IP).stdout
            assert "dev %s" % client.dev in route, "pushed route missing for %s: %s" % (name, route)
        for name in USERS:
            daemon.wait_log(r"admitted user %s " % name, timeout=20)
        yield Env(lab, world, daemon, clients, ips)


@pytest.fixture
def healthy(env):
    """Each test starts with the daemon alive and every device proxy running."""
    if env.daemon.proc.poll() is not None:
        pytest.fail("pocketproxy exited (%s):\n%s" % (env.daemon.proc.returncode, env.daemon.tail()))
    for device in env.world.devices.values():
        if not device.running:
            device.start()
    yield env


@pytest.mark.parametrize("client,device", [("alice", "phone"), ("carol", "sockphone")], ids=["tinyproxy", "dante"])
def test_200mib_download_arrives_intact(healthy, client, device):
    """200 MiB from the origin through VPN, pocketproxy and the device hash to the origin's sha256."""
    env = healthy
    result = netclient(env.clients[client].ns, "fetch", "http://%s/blob/%d" % (ORIGIN_IP, BLOB), timeout=180)
    assert result.get("status") == 200, "%s\n%s" % (result, env.logs())
    assert result["length"] == BLOB
    assert result["sha256"] == blob_sha256(BLOB)
    print(
        "\n200 MiB via %s (%s): %.1f MB/s, %.2f s, first byte %.1f ms"
        % (device, env.device(device).kind, result["mb_per_s"], result["seconds"], result["first_byte_seconds"] * 1000)
    )


def test_tls_sni_name_reaches_device_and_origin(healthy):
    """TLS to 203.0.113.10:443 with SNI origin.test: the device gets CONNECT origin.test:443, the origin the SNI."""
    env = healthy
    phone = env.device("phone")
    mark = phone.log_mark()
    result = netclient(
        env.clients["alice"].ns, "tls", ORIGIN_IP, "443", ORIGIN_NAME, "--cafile", env.world.origin.ca_cert
    )
    assert result.get("reply") == "sni=%s peer=%s" % (ORIGIN_NAME, phone.origin_ip), "%s\n%s" % (result, env.logs())
    assert result["verified"] is True
    phone.wait_log(r"Request \(file descriptor \d+\): CONNECT origin\.test:443 HTTP/1\.1", since=mark)
    assert "CONNECT %s:443" % ORIGIN_IP not in phone.log_text()[mark:]


def test_server_first_banner_is_not_delayed_by_sniffing(healthy):
    """Port 22 is not sniffed: the origin's banner arrives far inside the 2 s sniff budget, and echo works."""
    env = healthy
    phone = env.device("phone")
    mark = phone.log_mark()
    result = netclient(env.clients["alice"].ns, "banner", ORIGIN_IP, "22", timeout=10)
    assert result.get("banner") == BANNER.decode(), "%s\n%s" % (result, env.logs())
    assert result["banner_seconds"] < SNIFF_BUDGET / 2, result
    assert result["echo"] == "echo-me\n"
    phone.wait_log(r"CONNECT %s:22 HTTP/1\.1" % re.escape(ORIGIN_IP), since=mark)
    print("\nbanner after %.1f ms (sniff budget %.1f s)" % (result["banner_seconds"] * 1000, SNIFF_BUDGET))


def test_unmapped_source_is_refused(healthy):
    """A host that is not an admitted client gets an RST from the proxy port, redirected or direct, and it is logged."""
    env = healthy
    lab, daemon = env.lab, env.daemon
    customer = lab.customer_ns
    origin_mark = len(env.world.origin.log_text())
    # Simulate a firewall mistake that sends a non-client to the proxy: the proxy's own guard must refuse it.
    rule = ["-s", "192.168.77.2", "-d", "203.0.113.0/24", "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(PROXY_PORT)]
    customer.run("ip", "route", "add", "203.0.113.0/24", "via", "192.168.77.1")
    lab.server_ns.run("iptables", "-t", "nat", "-A", "PREROUTING", *rule)
    try:
        mark = daemon.log_mark()
        result = netclient(customer, "probe", ORIGIN_IP, "80", "--send", "GET /whoami HTTP/1.0\r\n\r\n", timeout=10)
        assert result["outcome"] == "reset", "%s\n%s" % (result, daemon.tail())
        assert result["seconds"] < 1.0, result
        daemon.wait_log(
            r"refused connection from 192\.168\.77\.2 to 203\.0\.113\.10:80: source has no device mapping", since=mark
        )
    finally:
        lab.server_ns.run("iptables", "-t", "nat", "-D", "PREROUTING", *rule, check=False)
        customer.run("ip", "route", "del", "203.0.113.0/24", check=False)
    # Straight at the proxy port (no REDIRECT): refused as well.
    mark = daemon.log_mark()
    request = "GET / HTTP/1.0\r\n\r\n"
    result = netclient(customer, "probe", "192.168.77.1", str(PROXY_PORT), "--send", request, timeout=10)
    assert result["outcome"] == "reset", "%s\n%s" % (result, daemon.tail())
    daemon.wait_log(r"refused connection from 192\.168\.77\.2 to 192\.168\.77\.1:%d: " % PROXY_PORT, since=mark)
    assert "GET /whoami" not in env.world.origin.log_text()[origin_mark:]


def test_two_clients_exit_through_their_own_devices(healthy):
    """alice and bob are mapped to different phones: the origin sees two different device addresses."""
    env = healthy
    seen = {client: whoami(env, client) for client in ("alice", "bob")}
    assert seen == {"alice": env.device("phone").origin_ip, "bob": env.device("phone2").origin_ip}
    assert seen["alice"] != seen["bob"]


def test_device_proxy_down_fails_fast_and_others_unaffected(healthy):
    """bob's phone proxy is stopped: bob gets an RST within a second on ports 80 and 22; alice still works."""
    env = healthy
    phone2 = env.device("phone2")
    bob = env.clients["bob"]
    phone2.stop()
    try:
        mark = env.daemon.log_mark()
        http = netclient(bob.ns, "probe", ORIGIN_IP, "80", "--send", "GET /whoami HTTP/1.0\r\n\r\n", timeout=10)
        banner = netclient(bob.ns, "probe", ORIGIN_IP, "22", timeout=10)
        for result in (http, banner):
            assert result["outcome"] == "reset", "%s\n%s" % (result, env.daemon.tail())
            assert result["seconds"] < 1.0, result
        env.daemon.wait_log(
            r"upstream failed for %s via http://%s:8080 to %s:80: unreachable"
            % (re.escape(env.ips["bob"]), re.escape(phone2.ip), re.escape(ORIGIN_IP)),
            since=mark,
        )
        assert whoami(env, "alice") == env.device("phone").origin_ip
    finally:
        phone2.start()
    assert whoami(env, "bob") == phone2.origin_ip


def test_origin_sees_only_the_device_although_others_could_reach_it(healthy):
    """The server has an uplink and alice her own ISP (default routes, as in the world), yet her
    fetch arrives from the phone, and nothing but phones ever reached the origin."""
    env = healthy
    assert env.world.server_reaches_origin(), env.lab.server_ns.run("ip", "route").stdout
    alice = env.clients["alice"].ns
    assert "default via 100.64.0.1" in alice.run("ip", "route").stdout
    assert "default via 2001:db8:64::1" in alice.run("ip", "-6", "route").stdout
    for device in env.world.devices.values():
        assert device.ns.run("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"
    phone = env.device("phone")
    mark, origin_mark = phone.log_mark(), len(env.world.origin.log_text())
    assert whoami(env, "alice") == phone.origin_ip
    phone.wait_log(r"Connect \(file descriptor \d+\): %s" % re.escape(phone.server_ip), since=mark)
    phone.wait_log(r"CONNECT %s:80 HTTP/1\.1" % re.escape(ORIGIN_IP), since=mark)
    assert env.world.origin_sources() <= env.world.phone_addresses(), env.world.origin.log_text()
    assert env.lab.internet.leaked() == {"customer": 0, "server": 0}
    assert 'http %s "GET /whoami' % phone.origin_ip in env.world.origin.log_text()[origin_mark:]


def test_socks5_device_end_to_end(healthy):
    """carol's device is a dante SOCKS5 proxy (no auth): the origin sees that device's address."""
    env = healthy
    sockphone = env.device("sockphone")
    mark = sockphone.log_mark()
    assert whoami(env, "carol") == sockphone.origin_ip
    sockphone.wait_log(
        r"tcp/connect \[: %s\.\d+ %s\.1080 -> %s\.\d+ %s\.80"
        % tuple(re.escape(a) for a in (sockphone.server_ip, sockphone.ip, sockphone.origin_ip, ORIGIN_IP)),
        since=mark,
    )


def test_half_close_keeps_the_reply_through_a_socks5_device(healthy):
    """carol sends 4 MiB to the echo service and half-closes: all 4 MiB come back, then a clean EOF.

    Through dante: tinyproxy 1.11 itself drops the rest of a tunnel when its client half-closes
    (measured without pocketproxy: 0 of 10 and ~2 of 3 MB echoed), so it cannot carry this check.
    """
    env = healthy
    result = netclient(env.clients["carol"].ns, "halfclose", ORIGIN_IP, "22", str(4 * 1024 * 1024), timeout=30)
    assert result.get("banner") == BANNER.decode(), "%s\n%s" % (result, env.logs())
    assert (result["echoed"], result["intact"], result["end"]) == (4 * 1024 * 1024, True, "eof"), result


def test_closed_origin_port_resets_the_client_fast(healthy):
    """The device cannot reach the origin port (tinyproxy answers 500): the client gets an RST at once, logged."""
    env = healthy
    mark = env.daemon.log_mark()
    result = netclient(env.clients["alice"].ns, "probe", ORIGIN_IP, "81", "--send", "GET / HTTP/1.0\r\n\r\n")
    assert result["outcome"] == "reset", "%s\n%s" % (result, env.daemon.tail())
    assert result["seconds"] < 1.0, result
    env.daemon.wait_log(
        r"upstream failed for %s via http://dev:\*\*\*@%s:8080 to %s:81: unreachable: .*answered 500"
        % (re.escape(env.ips["alice"]), re.escape(env.device("phone").ip), re.escape(ORIGIN_IP)),
        since=mark,
    )
    assert "devpw" not in env.daemon.log_text()
