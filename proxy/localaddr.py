# -*- test-case-name: tests.unit.test_server -*-
"""The host's own addresses, for the proxy's loop guard.

A connection whose original destination is one of our own addresses was not
redirected (somebody dialled the proxy port directly) or would loop back into
us; either way it must not be relayed. The set is read over netlink and
refreshed periodically, because tun addresses appear when OpenVPN starts.
"""

import ipaddress

from twisted.logger import Logger

ALWAYS_LOCAL = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("0.0.0.0/32"),
    ipaddress.ip_network("::1/128"),
    ipaddress.ip_network("::/128"),
)


def netlink_addresses():
    """Every address configured on an interface of this network namespace."""
    from pyroute2 import IPRoute

    out = set()
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            # On a point-to-point address IFA_ADDRESS is the *peer*; IFA_LOCAL is ours.
            value = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if value:
                out.add(ipaddress.ip_address(value.split("%", 1)[0]))
    return out


def connected_networks():
    """The networks of this namespace's interface addresses (``10.0.0.1/24`` → ``10.0.0.0/24``),
    host routes (/32, /128) left out: what the server reaches on-link."""
    from pyroute2 import IPRoute

    out = set()
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            value = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if value:
                net = ipaddress.ip_network("%s/%d" % (value.split("%", 1)[0], msg["prefixlen"]), strict=False)
                if net.prefixlen < net.max_prefixlen:
                    out.add(net)
    return out


class LocalAddresses:
    """A cached set of local addresses; ``refresh()`` re-reads it (cheap, netlink)."""

    _log = Logger()

    def __init__(self, read=netlink_addresses):
        self._read = read
        self._addresses = frozenset()
        self.refresh()

    def refresh(self):
        """Re-read the addresses; on failure keep the previous set and say so."""
        try:
            self._addresses = frozenset(self._read())
        except Exception as e:
            self._log.warn("cannot read local addresses (loop guard uses the previous set): {error}", error=e)

    def __contains__(self, ip):
        if not isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            ip = ipaddress.ip_address(ip)
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip in self._addresses:
            return True
        return any(ip.version == net.version and ip in net for net in ALWAYS_LOCAL)
