"""What a client is pushed (ovpnmgr.tunnel): the full tunnel by default, per platform and version."""

import pytest

from ovpnmgr.directory import User
from ovpnmgr.tunnel import (
    BLOCK_OUTSIDE_DNS,
    FULL,
    ROUTER_INTO_TUNNEL,
    SPLIT,
    Peer,
    client_auth_lines,
    effective_mode,
    pushed_options,
    split_tunnel_warnings,
)

LINUX_26 = Peer("2.6.14", "linux")
DNS = ("dhcp-option DNS 10.9.0.1",)


def test_full_tunnel_carries_every_route_and_blocks_ipv6():
    """IPv4 and IPv6 default routes into the tunnel, IPv6 answered unreachable by the client, the
    home router routed in too; the operator's extras after them."""
    options = pushed_options(FULL, DNS + ("route 192.0.2.0 255.255.255.0",), LINUX_26)
    assert options == [
        "redirect-gateway def1 ipv6",
        "block-ipv6",
        "route net_gateway 255.255.255.255 vpn_gateway",
        "dhcp-option DNS 10.9.0.1",
        "route 192.0.2.0 255.255.255.0",
    ]


@pytest.mark.parametrize(
    "peer,router,block_dns",
    [
        (Peer("2.6.14", "win"), True, True),
        (Peer("2.5.9", "mac"), True, False),
        (Peer("3.10.1", "win"), False, True),  # OpenVPN Connect: no OpenVPN 2 route syntax
        (Peer("3.9", "android"), False, False),
        (Peer("", ""), True, True),  # a client that says nothing gets everything that protects it
    ],
)
def test_platform_and_version_options(peer, router, block_dns):
    options = pushed_options(FULL, DNS, peer)
    assert (ROUTER_INTO_TUNNEL in options) is router
    assert (BLOCK_OUTSIDE_DNS in options) is block_dns
    assert options[:2] == ["redirect-gateway def1 ipv6", "block-ipv6"]


def test_block_outside_dns_only_with_a_pushed_dns_server():
    """Blocking every other adapter's DNS without giving one would leave Windows with none."""
    assert BLOCK_OUTSIDE_DNS not in pushed_options(FULL, (), Peer("2.6.14", "win"))


def test_split_tunnel_pushes_only_the_operators_options():
    assert pushed_options(SPLIT, DNS, Peer("2.6.14", "win")) == ["dhcp-option DNS 10.9.0.1"]
    assert pushed_options(SPLIT, (), LINUX_26) == []
    with pytest.raises(ValueError):
        pushed_options("half", (), LINUX_26)


def test_user_choice_wins_over_the_default():
    assert effective_mode(FULL, None) == FULL and effective_mode(SPLIT, None) == SPLIT
    assert effective_mode(FULL, SPLIT) == SPLIT and effective_mode(SPLIT, FULL) == FULL


def test_client_auth_lines_quote_each_option():
    assert client_auth_lines("10.9.0.2", "255.255.255.0", ["block-ipv6", "route 192.0.2.0 255.255.255.0"]) == [
        "ifconfig-push 10.9.0.2 255.255.255.0",
        'push "block-ipv6"',
        'push "route 192.0.2.0 255.255.255.0"',
    ]


def test_peer_from_env():
    assert Peer.from_env({"IV_VER": "2.6.14", "IV_PLAT": "linux"}) == LINUX_26
    assert Peer.from_env({}) == Peer("", "")


def test_split_tunnel_warnings_name_who_and_why():
    users = [User("alice", None, tunnel=SPLIT), User("bob", None), User("carol", None, tunnel=FULL)]
    assert split_tunnel_warnings(FULL, [User("bob", None)]) == []
    (line,) = split_tunnel_warnings(FULL, users)
    assert line.startswith("SPLIT TUNNEL for 1 user(s) (tunnel: split in the users file): alice;")
    (line,) = split_tunnel_warnings(SPLIT, users)
    assert line.startswith("SPLIT TUNNEL for every customer (openvpn.tunnel: split)")
    assert line.endswith("(full tunnel only for: carol)")
