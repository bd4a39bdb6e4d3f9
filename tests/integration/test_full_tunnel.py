"""Issue 13: deployed as shipped, every byte a customer sends leaves through their phone, or not at all.

What runs is what we ship: OpenVPN 2.6 with ``conf/openvpn/server.conf`` (only the lab's paths
swapped in, and without ``management-client-user/-group``: the daemon runs as root from the
checkout here; ``tests/package/smoke.py`` runs the installed one with the peer check), pocketproxy
with the product's defaults (the lab gives only paths, users and the phone; its internet has the
default resolver 1.1.1.1, so DNS and device health run as shipped), and customers running nothing but profiles printed by
``pocketproxyctl client-config``.

The world is not kind: each customer has her own ISP (IPv4 and IPv6 default routes to the
origin's network), and the server has an uplink and forwards (:mod:`tests.lab.internet`). The ISP
router runs a resolver too (100.64.0.1: where a Linux ``resolv.conf`` points at home, since plain
``openvpn`` applies no pushed DNS), and so does a "public resolver" (198.51.100.53). So anything
that did not go through the phone shows, as a customer's 100.64.0.x / 2001:db8:64::x or the
server's 192.168.77.1 in the origin's or a resolver's log, and in the internet's counters. The
last test proves those checks can fail: a split-tunnel user's traffic is seen leaving.
"""

import errno
import json
import os
import re
import shutil
import signal
import sys
from dataclasses import dataclass

import pytest

from tests.lab.daemon import Daemon
from tests.lab.dns_origin import bench_address
from tests.lab.dnsclient import A, NOERROR, dig
from tests.lab.internet import ISP_GATEWAY, customer_address
from tests.lab.netns import NETNS_ETC, require_root, require_tools
from tests.lab.openvpn import OPENVPN, SERVER_UNDERLAY_IP, Lab
from tests.lab.world import HERE, ORIGIN_IP, ORIGIN_IP6, ORIGIN_NAME, RESOLVER_IP, TINYPROXY, World, resolver_at
from tests.package.shipped import PEER_CHECK, SOURCE_SERVER_CONF, add_profile_client, install_shipped_server
from tests.package.shipped import profiles as shipped_profiles

NETCLIENT = os.path.join(HERE, "netclient.py")
DNS_IP = "10.9.0.1"  # the pushed resolver (pocketproxy's DNS service)


@dataclass
class Env:
    lab: Lab
    world: World
    daemon: Daemon
    phone: object
    dns: object
    router_dns: object  # the ISP router's logging resolver (tests.lab.world.resolver_at)
    alice: object
    alice_isp: tuple  # (IPv4, IPv6) of her own internet connection
    profiles: dict
    tmp: object

    def origin_sources(self):
        """Everything the origin's services and DNS server, and the ISP router's resolver, ever saw."""
        return self.world.origin_sources() | self.router_dns.query_sources()


def netclient(ns, *args, timeout=15):
    out = ns.run(sys.executable, NETCLIENT, "--timeout", str(timeout), *args, check=False, timeout=timeout + 30)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise AssertionError("netclient %s: %r %r" % (args, out.stdout, out.stderr))


# One connect() from a namespace; prints {"errno": n or null, "seconds": s}.
_CONNECT = r"""
import json, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.settimeout(10)
started = time.monotonic()
try:
    s.connect((host, port))
    out = {"errno": None}
except socket.timeout:
    out = {"errno": "timeout"}
except OSError as e:
    out = {"errno": e.errno}
out["seconds"] = time.monotonic() - started
print(json.dumps(out))
"""


def connect(ns, host, port):
    out = ns.run(sys.executable, "-c", _CONNECT, host, str(port), check=False, timeout=40)
    return json.loads(out.stdout.strip().splitlines()[-1])


def home_resolv_conf(ns, nameserver):
    """What a Linux customer's resolv.conf holds at home: the ISP router (``ip netns exec`` mounts
    /etc/netns/NAME/resolv.conf); plain ``openvpn`` does not change it. Removed with the lab."""
    directory = os.path.join(NETNS_ETC, ns.name)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "resolv.conf"), "w") as f:
        f.write("nameserver %s\noptions timeout:2 attempts:2\n" % nameserver)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    require_root()
    require_tools(OPENVPN, TINYPROXY, "openssl")
    base = tmp_path_factory.mktemp("fulltunnel")
    with Lab(base / "lab", start_server=False) as lab, World(lab.server_ns, base / "world", lab.internet) as world:
        server = install_shipped_server(lab, SOURCE_SERVER_CONF, lab.server.mgmt_socket, drop=PEER_CHECK)
        phone = world.add_device("phone", username="dev", password="devpw")
        dns = world.start_dns()
        router_dns = resolver_at(lab.internet.ns, base / "router", ISP_GATEWAY)
        users = {"alice": {"password": "alice-pw"}, "carol": {"password": "carol-pw"}}
        daemon = Daemon(
            lab.server_ns, base / "daemon", server.mgmt_socket, users, devices={"phone": phone.url},
        )
        daemon.start()
        try:
            daemon.wait_log(r"reconciled with OpenVPN", timeout=30)
            profiles = shipped_profiles(daemon.config_path, ("alice", "carol"), lab.pki)
            alice = add_profile_client(lab, "alice", profiles["alice"], "alice", "alice-pw")
            home_resolv_conf(alice.ns, ISP_GATEWAY)
            alice.wait_connected(timeout=40)
            yield Env(lab, world, daemon, phone, dns, router_dns, alice, customer_address(0), profiles, base)
        except BaseException:
            print("==== pocketproxy ====\n%s" % daemon.tail(80))
            print(world.logs())
            raise
        finally:
            daemon.stop()
            for client in lab.clients:
                shutil.rmtree(os.path.join(NETNS_ETC, client.ns.name), ignore_errors=True)


def assert_nothing_left_but_the_phone(env, also=()):
    """No customer ISP address or server address in any origin log; the internet counted nothing
    but tunnel packets; everything the origin saw came from the phone."""
    sources = env.origin_sources()
    forbidden = set(env.alice_isp) | {SERVER_UNDERLAY_IP, "2001:db8:77::1"} | set(also)
    assert not sources & forbidden, "leaked to the origin: %s" % sorted(sources & forbidden)
    assert sources <= env.world.phone_addresses(), sorted(sources)
    assert env.router_dns.query_sources() == set(), "the ISP router's resolver was asked: %s" % env.router_dns.query_sources()
    assert env.lab.internet.leaked() == {"customer": 0, "server": 0}, env.lab.internet.counters()
    assert env.lab.internet.counters()["tunnel"] > 0, "the internet's counters saw no tunnel packet at all"


def test_customer_got_the_full_tunnel(env):
    """The PUSH_REPLY carries the full tunnel; the customer's routes send IPv4 and IPv6 into the
    tunnel (more specific than her own default routes, which stay), keep the VPN server reachable
    through her ISP, and route her ISP router into the tunnel too. Linux gets no block-outside-dns."""
    alice = env.alice
    reply = [line for line in alice.log_text().splitlines() if "PUSH_REPLY" in line][-1]
    for option in ("redirect-gateway def1 ipv6", "block-ipv6", "route net_gateway 255.255.255.255 vpn_gateway",
                   "dhcp-option DNS %s" % DNS_IP):
        assert option in reply, (option, reply)
    assert "block-outside-dns" not in reply and "Options error" not in alice.log_text()
    routes = alice.ns.run("ip", "route").stdout
    routes6 = alice.ns.run("ip", "-6", "route").stdout
    print("\nalice's routes:\n%s\n%s" % (routes, routes6))
    dev = alice.dev
    for line in ("0.0.0.0/1 via 10.9.0.1 dev %s" % dev, "128.0.0.0/1 via 10.9.0.1 dev %s" % dev,
                 "%s via %s dev" % (SERVER_UNDERLAY_IP, ISP_GATEWAY), "%s via 10.9.0.1 dev %s" % (ISP_GATEWAY, dev),
                 "default via %s" % ISP_GATEWAY):
        assert line in routes, (line, routes)
    for line in ("2000::/4 dev %s" % dev, "3000::/4 dev %s" % dev, "default via 2001:db8:64::1"):
        assert line in routes6, (line, routes6)
    assert alice.ns.run("ip", "route", "get", ORIGIN_IP).stdout.split()[1:4] == ["via", "10.9.0.1", "dev"]


def test_the_phone_is_observed_as_shipped(env):
    """Device health runs at the shipped defaults: its probe goes through the phone to the
    default target (api.ipify.org, which the lab's internet stands in for) and the daemon logs
    the phone up with its exit address, the phone's own address at the origin."""
    line = env.daemon.wait_log(r"device phone is up \(was unknown\): probe answered in \d+ ms, exit address (\S+)",
                               timeout=45)
    assert line.group(1) == env.phone.origin_ip, line.group(0)


def test_ipv4_leaves_only_through_the_phone(env):
    """HTTP by address, HTTPS by name (SNI), and a server-first port all arrive from the phone."""
    alice = env.alice
    fetched = netclient(alice.ns, "fetch", "http://%s/whoami" % ORIGIN_IP)
    assert fetched["body"].strip() == env.phone.origin_ip, fetched
    tls = netclient(alice.ns, "tls", ORIGIN_IP, "443", ORIGIN_NAME, "--cafile", env.world.origin.ca_cert)
    assert "sni=%s peer=%s" % (ORIGIN_NAME, env.phone.origin_ip) in json.dumps(tls), tls
    banner = netclient(alice.ns, "banner", ORIGIN_IP, "22")
    assert banner.get("banner", "").startswith("SSH-2.0-origin"), banner
    assert_nothing_left_but_the_phone(env)


def test_ipv6_fails_at_once_and_never_leaves(env):
    """IPv6 to the origin fails with ENETUNREACH (the client's own OpenVPN answers it; no wait for a
    timeout), and a dual-stack name (origin.test has AAAA and A), resolved through the home
    resolv.conf, is fetched over IPv4 through the phone."""
    alice = env.alice
    for host, port in ((ORIGIN_IP6, 80), (ORIGIN_IP6, 443), ("2001:db8:77::1", 53)):  # origin; a resolver on the internet
        result = connect(alice.ns, host, port)
        assert result["errno"] == errno.ENETUNREACH, (host, result)
    fetched = netclient(alice.ns, "fetch", "http://%s/whoami" % ORIGIN_NAME)
    assert fetched["body"].strip() == env.phone.origin_ip, fetched
    assert ORIGIN_IP6 not in json.dumps(fetched)
    assert_nothing_left_but_the_phone(env)


@pytest.mark.parametrize("resolver", [DNS_IP, RESOLVER_IP, ISP_GATEWAY, ORIGIN_IP])
@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_dns_to_any_resolver_is_answered_through_the_phone(env, resolver, proto):
    """The pushed server, a public resolver of the app's choosing, the home router, and the zone's
    own server: each query, UDP or TCP, is answered (from the address asked: the UDP stub's socket
    is connected to it) with the zone's answer, which the origin received from the phone over TCP,
    never from the customer's ISP (where three of the four would have answered her directly)."""
    name = "%s-%s.bench.test" % (proto, resolver.replace(".", "-"))
    mark = env.dns.log_mark()
    got = dig(env.alice.ns, name, proto, server=resolver, qtype=A)
    assert got.get("rcode") == NOERROR and got.get("id_ok"), got
    assert got["answers"] == [bench_address(name)], got
    query = env.dns.wait_query(name, timeout=5, since=mark)
    assert (query.source, query.proto) == (env.phone.origin_ip, "tcp"), query
    assert_nothing_left_but_the_phone(env)


def test_pocketproxy_killed_traffic_fails_fast_and_nothing_leaves(env):
    """SIGKILL: no pocketproxy, but its kernel rules stay. TCP is reset, DNS to any resolver is
    refused, IPv6 unreachable, all at once; nothing leaves through the ISP or the server's uplink.
    Then the daemon restarts and alice works again without reconnecting."""
    alice, daemon = env.alice, env.daemon
    mark = daemon.log_mark()
    daemon.kill()
    try:
        for port in (80, 443, 22):
            result = netclient(alice.ns, "probe", ORIGIN_IP, str(port), "--send", "GET / HTTP/1.0\r\n\r\n", timeout=5)
            assert result["outcome"] in ("reset", "connect-failed") and result["seconds"] < 1.0, result
        for resolver in (DNS_IP, RESOLVER_IP, ISP_GATEWAY):
            for proto in ("udp", "tcp"):
                got = dig(alice.ns, "killed.bench.test", proto, server=resolver, timeout=3)
                assert got.get("error") in ("refused", "reset") and got["seconds"] < 1.0, (resolver, proto, got)
        assert connect(alice.ns, ORIGIN_IP6, 80)["errno"] == errno.ENETUNREACH
        assert "killed.bench.test" not in env.dns.log_text()
        assert_nothing_left_but_the_phone(env)
    finally:
        daemon.start()
    daemon.wait_log(r"reconciled with OpenVPN", timeout=30, since=mark)
    daemon.wait_log(r"transparent proxy listening", timeout=30, since=mark)
    assert netclient(alice.ns, "fetch", "http://%s/whoami" % ORIGIN_NAME)["body"].strip() == env.phone.origin_ip
    assert_nothing_left_but_the_phone(env)


def test_split_tunnel_is_explicit_and_the_lab_sees_what_it_lets_out(env):
    """Honesty: a user with ``tunnel: split`` gets no redirect, and her fetch and her DNS leave
    through her own ISP: the origin and her router's resolver log her ISP address and the internet
    counts it, so the checks above can fail. The daemon said so loudly when the users file was reloaded."""
    lab, daemon = env.lab, env.daemon
    text = daemon.users_path.read_text()
    daemon.users_path.write_text(re.sub(r"(\n  carol:\n)", r"\1    tunnel: split\n", text))
    mark = daemon.log_mark()
    daemon.proc.send_signal(signal.SIGHUP)  # pp reload
    daemon.wait_log(r"SPLIT TUNNEL for 1 user\(s\) \(tunnel: split in the users file\): carol;", timeout=10, since=mark)
    before = lab.internet.counters()
    carol = add_profile_client(lab, "carol", env.profiles["carol"], "carol", "carol-pw")
    carol.wait_connected(timeout=40)
    reply = [line for line in carol.log_text().splitlines() if "PUSH_REPLY" in line][-1]
    assert "redirect-gateway" not in reply and "block-ipv6" not in reply, reply
    carol_isp = customer_address(1)
    fetched = netclient(carol.ns, "fetch", "http://%s/whoami" % ORIGIN_IP)
    assert fetched["body"].strip() == carol_isp[0], "split tunnel: the origin sees carol's own ISP address"
    assert connect(carol.ns, ORIGIN_IP6, 80)["errno"] is None, "and her IPv6 reaches the origin directly"
    assert carol_isp[0] in env.world.origin_sources()
    assert lab.internet.counters()["customer"] > before["customer"]
    # and her home router's resolver, asked directly, logs her: that check can fail too
    got = dig(carol.ns, "split.bench.test", "udp", server=ISP_GATEWAY)
    assert got["answers"] == [bench_address("split.bench.test")], got
    assert env.router_dns.query_sources() == {carol_isp[0]}
    with pytest.raises(AssertionError, match="leaked"):
        assert_nothing_left_but_the_phone(env, also=carol_isp)
