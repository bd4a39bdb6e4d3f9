# -*- test-case-name: tests.unit.test_destinations -*-
"""Where a customer's connection may go: the public internet, nothing else.

A customer's phone sits on a network the customer does not own: the phone's own
loopback, its link to this server, the server itself, other customers' phones and
whatever private network the phone or the server can reach. The proxy asks its
phone for whatever destination the customer names, so every destination is judged
here first, by address and, where a name was sniffed, by name:

- **always refused** (:data:`SPECIAL`): unspecified, loopback, link-local,
  multicast, reserved and broadcast addresses (IPv4-mapped and NAT64 forms
  of IPv6 are judged by the IPv4 address inside);
- **refused by the daemon's wiring** (:meth:`DestinationPolicy.set_networks`):
  the VPN subnet, every device's upstream address and the network it sits on,
  the operator's extra ``deny_networks``; the server's own addresses are caught
  by the proxy's loop guard before this;
- **private ranges** (:data:`PRIVATE`: RFC 1918, RFC 6598 shared space, IPv6
  ULA), refused unless the client's policy allows them (operators who sell
  access to a private network opt a user out);
- **names**: single-label names (no public name has one label: ``localhost``,
  ``ip6-localhost``, an intranet host), the special-use and private-use domains
  of RFC 6761/6762/7686/8375/9476 and ICANN's ``.internal``, and the operator's
  ``deny_names`` suffixes.

What cannot be judged here is a public name that the phone resolves to a private
or loopback address (``localtest.me`` → 127.0.0.1): the proxy does not resolve
names, the phone does. The firewall's device guard makes the server itself
unreachable from phones, and the README says what a phone proxy must refuse.
"""

import ipaddress
from dataclasses import dataclass

SPECIAL = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network"
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local
        "192.0.0.0/24",  # IETF protocol assignments (DS-Lite, NAT64 discovery...)
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and 255.255.255.255
        "::/128",
        "::1/128",
        "fe80::/10",  # link-local
        "ff00::/8",  # multicast
        "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215)
        "100::/64",  # discard-only (RFC 6666)
    )
)

PRIVATE = tuple(
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",  # carrier-grade NAT space: the mobile network's own side
        "198.18.0.0/15",  # benchmarking
        "fc00::/7",  # unique local
    )
)

# Top-level domains no public host lives under. ``.test`` and ``.example`` are not here:
# RFC 6761 tells applications to treat them as ordinary names.
SPECIAL_DOMAINS = frozenset(
    (
        "localhost",  # RFC 6761 §6.3
        "localdomain",  # /etc/hosts' localhost.localdomain
        "invalid",  # RFC 6761 §6.4
        "local",  # mDNS, RFC 6762
        "arpa",  # reverse zones and home.arpa (RFC 8375)
        "onion",  # RFC 7686
        "alt",  # RFC 9476
        "internal",  # ICANN's private-use TLD (2024)
        "lan",
        "home",
        "corp",
        "intranet",
        "private",  # RFC 6762 appendix G
    )
)


@dataclass(frozen=True)
class ClientPolicy:
    """What one client may reach beyond the public internet, and its device's capacity.

    :ivar allow_private: private ranges (:data:`PRIVATE`) are allowed for this client.
    :ivar device_limit: how many connections the client's phone proxy takes at once
        (its own client limit), or None when unknown; co-tenants share it fairly.
    """

    allow_private: bool = False
    device_limit: int | None = None


DEFAULT_CLIENT = ClientPolicy()


def _unmapped(ip):
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:  # the well-known NAT64 prefix embeds an IPv4 destination
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _table(label, networks):
    """``{4: [...], 6: [...]}`` of ``(network int, mask int, label, network)`` for fast matching."""
    out = {4: (), 6: ()}
    for net in networks:
        out[net.version] += ((int(net.network_address), int(net.netmask), label, net),)
    return out


_SPECIAL = _table("special", SPECIAL)


class DestinationPolicy:
    """Judges a connection's destination address and sniffed name.

    :param deny_private: refuse :data:`PRIVATE` unless a client's policy allows it.
    :param deny_names: extra domain suffixes (``corp.example.com``) to refuse.
    """

    def __init__(self, deny_private=True, deny_names=()):
        self.deny_private = deny_private
        self.deny_names = frozenset(n.lower().strip(".") for n in deny_names)
        self._private = _table("private", PRIVATE)
        self.set_networks()

    def set_networks(self, fixed=(), devices=()):
        """Replace the wired-in refusals: ``fixed`` (VPN subnet, operator ranges) and
        ``devices`` (device addresses and their networks; they change on reload)."""
        devices = _table("device", (ipaddress.ip_network(n, strict=False) for n in devices))
        fixed = _table("denied", (ipaddress.ip_network(n, strict=False) for n in fixed))
        self._always = {v: _SPECIAL[v] + devices[v] + fixed[v] for v in (4, 6)}

    def address_refusal(self, ip, client=DEFAULT_CLIENT):
        """Why ``ip`` may not be reached by ``client``, or None if it may (about a
        microsecond: one mask-and-compare per network, no ``ipaddress`` containment)."""
        ip = _unmapped(ip)
        value = int(ip)
        for network, mask, label, net in self._always[ip.version]:
            if value & mask == network:
                return "%s is a %s address (%s)" % (ip, label, net)
        if self.deny_private and not client.allow_private:
            for network, mask, label, net in self._private[ip.version]:
                if value & mask == network:
                    return "%s is a %s address (%s)" % (ip, label, net)
        return None

    def name_refusal(self, name):
        """Why the (canonical, lowercase) ``name`` may not be asked for, or None."""
        labels = name.split(".")
        if len(labels) < 2:
            return "%r is a single-label name (not a public host)" % name
        if labels[-1] in SPECIAL_DOMAINS:
            return "%r is under the special-use domain .%s" % (name, labels[-1])
        for i in range(len(labels)):
            suffix = ".".join(labels[i:])
            if suffix in self.deny_names:
                return "%r is under the denied domain %s" % (name, suffix)
        return None
