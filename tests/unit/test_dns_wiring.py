"""The DNS service in the daemon: config section, device policy, routes from the mapping table,
the pushed option, the firewall's INPUT rule, metrics and ``pp stats``."""

import ipaddress

import pytest
from twisted.internet.testing import MemoryReactorClock

from ovpnmgr.config import ConfigError
from ovpnmgr.directory import Directory
from ovpnmgr.dns import route_lookup, settings_from
from ovpnmgr.ipset import FakeIPSet
from ovpnmgr.metrics import collect, render
from proxy.dnsserver import DNSService, DNSStats
from proxy.mappings import MappingTable, Route
from proxy.upstream import Upstream
from tests.unit.daemon_config import config, problem

PHONE = Upstream.parse("http://dev:pw@192.168.255.2:8080")


# --- config ---------------------------------------------------------------------------------


def test_dns_is_on_by_default_on_the_server_address(tmp_path):
    c = config(tmp_path)
    assert c.dns.enabled and c.dns.push and c.dns.policy == "via_device"
    assert c.dns_address == (ipaddress.IPv4Address("10.9.0.1"), 53)
    s = settings_from(c)
    assert (s.listen_host, s.listen_port, s.resolver, s.host_servers) == ("10.9.0.1", 53, ("1.1.1.1", 53), ())
    assert (s.query_timeout, s.connect_timeout, s.idle_timeout, s.log_names) == (5.0, 10.0, 60.0, False)


def test_dns_section_is_typed(tmp_path):
    c = config(
        tmp_path,
        "dns: {listen: 10.9.0.1, port: 5353, resolver: '9.9.9.9:5300', policy: host,"
        " host_servers: ['192.0.2.53', '[2001:db8::53]:5353'], query_timeout: 2, log_names: true}\n",
    )
    s = settings_from(c)
    assert (s.listen_port, s.resolver, s.query_timeout, s.log_names) == (5353, ("9.9.9.9", 5300), 2.0, True)
    assert s.host_servers == (("192.0.2.53", 53), ("2001:db8::53", 5353))
    assert c.dns.policy == "host"
    assert config(tmp_path, "dns: {enabled: false}\n").dns_address is None


@pytest.mark.parametrize(
    "extra, key, words",
    [
        ("dns: {resolver: 'a b'}\n", "dns.resolver", "HOST:PORT"),
        ("dns: {resolver: '1.1.1.1:0'}\n", "dns.resolver", "between 1 and 65535"),
        ("dns: {policy: proxy}\n", "dns.policy", "via_device, host"),
        ("dns: {host_servers: [dns.google]}\n", "dns.host_servers", "must be IP addresses"),
        ("dns: {listen: 'ten'}\n", "dns.listen", "not an IPv4 address"),
        ("dns: {cache: 5}\n", "dns.cache", "unknown key"),
        ("firewall: {chain: ABCDEFGHIJKLMNOPQRSTUVWXYZ}\n", "firewall.chain", "at most 25"),
        ("dns: {resolver: 'https://dns.example'}\n", "dns.resolver", "needs a path such as /dns-query"),
        ("dns: {resolver: 'https://u:pw@dns.example/q'}\n", "dns.resolver", "credentials"),
        ("dns: {resolver: 'https://dns.example/q', doh_connections: 0}\n", "dns.doh_connections", "between 1 and 64"),
        ("dns: {resolver: 'https://dns.example/q', ca_file: nothere.pem}\n", "dns.ca_file", "cannot read"),
        ("dns: {ca_file: users.yaml}\n", "dns.ca_file", "holds no PEM certificate"),
    ],
)
def test_bad_dns_settings_name_the_key(tmp_path, extra, key, words):
    text = problem(tmp_path, extra)
    assert "pocketproxy.yaml: %s: " % key in text and words in text, text


def test_doh_resolver_and_its_ca_file(tmp_path):
    from tests.unit.doh_peers import make_ca

    ca, _ = make_ca(str(tmp_path))
    c = config(tmp_path, "dns: {resolver: 'https://dns.example:8443/dns-query', ca_file: %s, doh_connections: 2}\n" % ca)
    s = settings_from(c)
    assert (s.resolver.host, s.resolver.port, str(s.resolver)) == ("dns.example", 8443, "https://dns.example:8443/dns-query")
    assert (s.ca_file, s.max_doh_connections) == (ca, 2)
    plain = settings_from(config(tmp_path, "dns: {resolver: 'https://dns.example/dns-query'}\n"))
    assert (plain.ca_file, plain.max_doh_connections) == ("", 4)  # the system's trust store
    text = problem(tmp_path, "dns: {resolver: '9.9.9.9', ca_file: %s}\n" % ca)
    assert "dns.ca_file: only used with an https:// dns.resolver" in text


def test_pushing_dns_twice_is_refused_unless_dns_push_is_off(tmp_path):
    own = ", push: ['dhcp-option DNS 192.0.2.1']"
    assert "dns.push: false" in problem(tmp_path, "", own)
    same = ", push: ['dhcp-option DNS 10.9.0.1']"  # what the service pushes anyway: pushed once
    top, controller = build(config(tmp_path, "", same))
    assert controller.config.push == ("dhcp-option DNS 10.9.0.1",)
    assert config(tmp_path, "dns: {push: false}\n", own).openvpn.push == ("dhcp-option DNS 192.0.2.1",)
    assert config(tmp_path, "dns: {enabled: false}\n", own).dns_address is None


def test_device_dns_policy_in_the_users_file():
    d = Directory.parse(
        "devices:\n  a: {upstream: 'http://192.0.2.1:8080', dns: host}\n  b: {upstream: 'http://192.0.2.2:8080'}\n"
        "users: {}\n"
    )
    assert (d.devices["a"].dns, d.devices["b"].dns) == ("host", None)
    with pytest.raises(ConfigError) as info:
        Directory.parse("devices:\n  a: {upstream: 'http://192.0.2.1:8080', dns: tcp}\nusers: {}\n", "users.yaml")
    assert "users.yaml: devices.a.dns: expected via_device or host" in str(info.value)


# --- routes ---------------------------------------------------------------------------------


def route(device_name, dns=None, upstream=PHONE):
    return Route(upstream, device=device_name, dns=dns, log_fields={"user": "alice", "device": device_name})


def test_routes_follow_the_mapping_table_and_device_policy():
    table = MappingTable()
    route_for = route_lookup(table, "via_device")
    ip = ipaddress.ip_address("10.9.0.2")
    assert route_for(ip) is None  # unmapped: REFUSED by the server
    table.add(ip, route("phone"), "s1")
    found = route_for(ip)
    assert (found.upstream, found.policy, found.key) == (PHONE, "via_device", "phone")
    assert found.log_fields == {"user": "alice", "device": "phone"}
    table.transfer(ip, route("phone", dns="host"), "s1")
    assert route_for(ip).policy == "host"
    assert route_lookup(table, "host")(ip).policy == "host"
    other = Upstream.parse("socks5://192.0.2.9:1080")
    table.transfer(ip, route("phone", upstream=other), "s1")
    assert (route_for(ip).key, route_for(ip).upstream) == ("phone", other)  # the server sees the URL change
    table.remove(ip)
    assert route_for(ip) is None


def test_a_device_nobody_maps_to_any_more_is_forgotten_by_the_dns_service(tmp_path):
    """build_dns listens to the mapping table: when the last client of a device (by name) or of an
    upstream is remapped or removed, the DNS service forgets it (its tunnels closed now, not at stop)."""
    from ovpnmgr.dns import build_dns

    table = MappingTable()
    _, server = build_dns(MemoryReactorClock(), config(tmp_path), table)
    keys, upstreams = [], []
    server.forget = keys.append
    server.forget_upstream = upstreams.append
    other = Upstream.parse("socks5://192.0.2.9:1080")
    a, b = ipaddress.ip_address("10.9.0.2"), ipaddress.ip_address("10.9.0.3")
    table.add(a, route("phone"), "sa")
    table.add(b, route("phone"), "sb")
    table.transfer(a, route("phone", upstream=other), "sa")
    assert (keys, upstreams) == ([], [])  # b still maps to phone at PHONE
    table.transfer(b, route("phone", upstream=other), "sb")
    assert (keys, upstreams) == ([], [PHONE])  # phone is still in use, at its new URL
    table.transfer(a, route("phone2", upstream=other), "sa")  # a device renamed (same URL)
    assert (keys, upstreams) == ([], [PHONE])
    table.remove(b)
    assert (keys, upstreams) == (["phone"], [PHONE])
    table.remove(a)
    assert (keys, upstreams) == (["phone", "phone2"], [PHONE, other])


# --- the daemon's wiring --------------------------------------------------------------------


def build(c, directory=None):
    from ovpnmgr.tap import build as tap_build

    directory = directory or Directory.parse("devices: {}\nusers: {}\n", "users.yaml")
    return tap_build(MemoryReactorClock(), c, directory, None, ipset=FakeIPSet())


def test_build_pushes_the_dns_option_and_opens_the_firewall_for_it(tmp_path):
    top, controller = build(config(tmp_path, "", ", push: ['route 203.0.113.0 255.255.255.0']"))
    services = [s for s in top if isinstance(s, DNSService)]
    assert len(services) == 1 and services[0].server.settings.listen_host == "10.9.0.1"
    assert controller.config.push == ("route 203.0.113.0 255.255.255.0", "dhcp-option DNS 10.9.0.1")
    assert controller.ledger.firewall.dns == ("10.9.0.1", 53)


def test_build_without_dns(tmp_path):
    top, controller = build(config(tmp_path, "dns: {enabled: false}\n"))
    assert not [s for s in top if isinstance(s, DNSService)]
    assert controller.config.push == () and controller.ledger.firewall.dns is None
    top, controller = build(config(tmp_path, "dns: {push: false, port: 5353}\n"))
    assert controller.config.push == () and controller.ledger.firewall.dns == ("10.9.0.1", 5353)


def test_metrics_render_the_dns_families():
    stats = DNSStats()
    stats.queries.update({"ok": 3, "refused": 1})
    stats.cache_hits, stats.cache_misses = 2, 2
    stats.observe(0.003)
    stats.upstream_failed["unreachable"] += 1
    stats.tcp_refused_by["per_client"] += 284
    text = render(collect(dns_stats=stats))
    for line in (
        'pocketproxy_dns_queries_total{result="ok"} 3',
        'pocketproxy_dns_queries_total{result="refused"} 1',
        'pocketproxy_dns_queries_total{result="servfail"} 0',
        "pocketproxy_dns_cache_hits_total 2",
        "pocketproxy_dns_cache_misses_total 2",
        'pocketproxy_dns_query_latency_seconds_bucket{le="0.0025"} 0',
        'pocketproxy_dns_query_latency_seconds_bucket{le="0.005"} 1',
        'pocketproxy_dns_query_latency_seconds_bucket{le="+Inf"} 1',
        "pocketproxy_dns_query_latency_seconds_count 1",
        'pocketproxy_dns_device_connection_failures_total{kind="unreachable"} 1',
        'pocketproxy_dns_tcp_refused_total{limit="per_client"} 284',
        'pocketproxy_dns_tcp_refused_total{limit="full"} 0',
        'pocketproxy_dns_queries_total{result="over_share"} 0',
    ):
        assert line in text.splitlines(), line
    assert "dns_" not in render(collect())


def test_tcp_caps_per_client_and_in_all(tmp_path):
    """dns.max_tcp_per_client (default 16) and dns.max_tcp_clients (default 4096) reach the server."""
    s = settings_from(config(tmp_path))
    assert (s.max_tcp_per_client, s.max_tcp_clients) == (16, 4096)
    s = settings_from(config(tmp_path, "dns: {max_tcp_per_client: 4, max_tcp_clients: 100}\n"))
    assert (s.max_tcp_per_client, s.max_tcp_clients) == (4, 100)
    assert "dns.max_tcp_per_client" in problem(tmp_path, "dns: {max_tcp_per_client: 0}\n")
