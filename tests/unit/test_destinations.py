"""DestinationPolicy: which addresses and names a customer's connection may go to."""

import ipaddress

import pytest

from proxy.destinations import ClientPolicy, DestinationPolicy

ip = ipaddress.ip_address


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "127.1.2.3", "0.0.0.0", "0.1.2.3", "169.254.169.254", "224.0.0.251", "239.255.255.250",
        "255.255.255.255", "240.0.0.1", "192.0.0.170", "::1", "::", "fe80::1", "ff02::1",
        "::ffff:127.0.0.1", "64:ff9b::7f00:1", "64:ff9b:1::1",
    ],
)
def test_special_addresses_are_always_refused(address):
    policy = DestinationPolicy(deny_private=False)
    assert policy.address_refusal(ip(address), ClientPolicy(allow_private=True)) is not None


@pytest.mark.parametrize(
    "address", ["10.1.2.3", "172.16.0.1", "172.31.255.254", "192.168.1.1", "100.64.0.1", "198.18.0.1", "fd00::1",
                "::ffff:192.168.0.1", "64:ff9b::a00:1"]
)
def test_private_ranges_refused_by_default_and_allowed_per_client(address):
    policy = DestinationPolicy()
    assert "private" in policy.address_refusal(ip(address))
    assert policy.address_refusal(ip(address), ClientPolicy(allow_private=True)) is None
    assert DestinationPolicy(deny_private=False).address_refusal(ip(address)) is None


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "8.8.8.8", "203.0.113.10", "198.51.100.53", "172.32.0.1", "100.128.0.1",
                "2001:db8::1", "2606:4700::1111", "::ffff:8.8.8.8"]
)
def test_public_addresses_pass(address):
    assert DestinationPolicy().address_refusal(ip(address)) is None


def test_wired_networks_refused_even_for_clients_allowed_private():
    """The VPN subnet, devices and operator ranges are refused whatever the client's policy."""
    policy = DestinationPolicy()
    policy.set_networks(fixed=["10.9.0.0/24", "203.0.113.128/25"], devices=["192.168.255.0/24", "198.51.100.7"])
    allowed = ClientPolicy(allow_private=True)
    assert "device" in policy.address_refusal(ip("192.168.255.2"), allowed)
    assert "device" in policy.address_refusal(ip("198.51.100.7"), allowed)
    assert "denied" in policy.address_refusal(ip("10.9.0.6"), allowed)
    assert "denied" in policy.address_refusal(ip("203.0.113.200"), allowed)
    assert policy.address_refusal(ip("10.10.0.1"), allowed) is None
    assert policy.address_refusal(ip("198.51.100.8")) is None
    policy.set_networks(fixed=["10.9.0.0/24"], devices=[])  # a reload removed the devices
    assert policy.address_refusal(ip("198.51.100.7")) is None


@pytest.mark.parametrize(
    "name",
    [
        "localhost", "ip6-localhost", "ip6-loopback", "router", "localhost.localdomain", "db.localhost",
        "printer.local", "x.invalid", "1.0.0.127.in-addr.arpa", "nas.home.arpa", "abc.onion", "svc.internal",
        "gw.lan", "fileserver.corp", "box.home", "wiki.intranet", "a.private", "x.alt",
    ],
)
def test_special_use_names_are_refused(name):
    assert DestinationPolicy().name_refusal(name) is not None


@pytest.mark.parametrize("name", ["example.com", "origin.test", "www.example", "localhost.example.com", "a.b.c.io"])
def test_public_names_pass(name):
    assert DestinationPolicy().name_refusal(name) is None


def test_operator_denied_domains_include_subdomains():
    policy = DestinationPolicy(deny_names=["Corp.Example.com."])
    assert "denied" in policy.name_refusal("corp.example.com")
    assert "denied" in policy.name_refusal("git.corp.example.com")
    assert policy.name_refusal("example.com") is None
    assert policy.name_refusal("xcorp.example.com") is None


def test_daemon_wiring_refuses_devices_their_networks_and_the_vpn_subnet_and_follows_reloads(tmp_path):
    """ovpnmgr.tap: devices named by address (and the server's on-link network around them),
    the VPN subnet and operator ranges are refused; a reload re-reads the devices."""
    from ovpnmgr.config import parse_config
    from ovpnmgr.directory import Directory
    from ovpnmgr.tap import destination_policy

    users = tmp_path / "users.yaml"
    users.write_text("devices:\n  p: {upstream: 'http://203.0.113.2:8080'}\n  n: {upstream: 'http://phone.example:8080'}\n")
    config = parse_config(
        "openvpn: {management: 'unix:/run/m.sock', subnet: 10.9.0.0/24, server_address: 10.9.0.1}\n"
        "directory: {file: users.yaml}\nproxy: {deny_networks: ['198.51.100.0/24']}\n",
        tmp_path / "pocketproxy.yaml",
    )
    connected = lambda: {ipaddress.ip_network("203.0.113.0/28"), ipaddress.ip_network("192.0.2.0/24")}  # noqa: E731
    policy, rewire = destination_policy(config, Directory.load(users), connected)
    allowed = ClientPolicy(allow_private=True)
    for refused in ("203.0.113.2", "203.0.113.9", "10.9.0.5", "198.51.100.1"):
        assert policy.address_refusal(ip(refused), allowed) is not None, refused
    for fine in ("203.0.113.20", "192.0.2.1"):
        assert policy.address_refusal(ip(fine), allowed) is None, fine
    users.write_text("devices:\n  p: {upstream: 'http://192.0.2.7:8080'}\n")
    rewire(Directory.load(users))
    assert policy.address_refusal(ip("203.0.113.2"), allowed) is None
    assert policy.address_refusal(ip("192.0.2.1"), allowed) is not None


def test_a_session_gives_the_proxy_its_users_policy():
    """A session's Route carries its user's destination policy and its phone's capacity."""
    from ovpnmgr.directory import Directory
    from ovpnmgr.session import Session

    d = Directory.parse(
        "devices:\n  p: {upstream: 'http://203.0.113.2:8080', max_clients: 50}\n"
        "users:\n  a: {common_name: a, device: p, private_networks: allow}\n  b: {common_name: b, device: p}\n"
    )
    s = Session(0, 1, 1, {}, 0.0)
    s.user = d.users["a"]
    assert s.route().policy == ClientPolicy(allow_private=True, device_limit=50)
    assert (s.route().device, s.route().upstream) == ("p", d.devices["p"].upstream)
    s.user = d.users["b"]
    assert s.route().policy == ClientPolicy(allow_private=False, device_limit=50)
