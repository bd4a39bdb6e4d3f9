# -*- test-case-name: tests.unit.test_firewall -*-
"""pocketproxy's kernel state: its own chains, one ipset, nothing else.

Shape (names from :class:`~ovpnmgr.config.FirewallConfig`; defaults shown, with the DNS
service on 10.9.0.1:53, one device at 192.168.255.2 and ``device_allow: ["tcp/22"]``)::

    *filter
    :POCKETPROXY - [0:0]                      # fail closed: VPN traffic that was
    :POCKETPROXY-IN - [0:0]                   # not redirected dies fast
    :POCKETPROXY-UL - [0:0]                   # the underlay guard: everything not from the tunnel
    -A POCKETPROXY -p tcp -j REJECT --reject-with tcp-reset
    -A POCKETPROXY -p udp -j REJECT --reject-with icmp-port-unreachable
    -A POCKETPROXY -j REJECT --reject-with icmp-admin-prohibited
    -A POCKETPROXY-IN -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
    -A POCKETPROXY-IN -p tcp -m tcp --dport 12345 -m conntrack --ctstate DNAT -j ACCEPT
    -A POCKETPROXY-IN -d 10.9.0.1/32 -p udp -m set --match-set pocketproxy-clients src -m udp --dport 53 -j ACCEPT
    -A POCKETPROXY-IN -d 10.9.0.1/32 -p tcp -m set --match-set pocketproxy-clients src -m tcp --dport 53 -j ACCEPT
    -A POCKETPROXY-IN -p icmp -m icmp --icmp-type 8 -j ACCEPT
    -A POCKETPROXY-IN -p tcp -j REJECT --reject-with tcp-reset
    -A POCKETPROXY-IN -p udp -j REJECT --reject-with icmp-port-unreachable
    -A POCKETPROXY-IN -j REJECT --reject-with icmp-admin-prohibited
    -A POCKETPROXY-UL -i lo -j RETURN
    -A POCKETPROXY-UL -s 10.9.0.0/24 -j DROP
    -A POCKETPROXY-UL -d 10.9.0.1/32 -p udp -m udp --dport 53 -j REJECT --reject-with icmp-port-unreachable
    -A POCKETPROXY-UL -d 10.9.0.1/32 -p tcp -m tcp --dport 53 -j REJECT --reject-with tcp-reset
    -A POCKETPROXY-UL -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
    -A POCKETPROXY-UL -p tcp -m tcp --dport 22 -j RETURN
    -A POCKETPROXY-UL -s 192.168.255.2/32 -j POCKETPROXY
    -I FORWARD 1 -i tun+ -j POCKETPROXY
    -I INPUT 1 -i tun+ -j POCKETPROXY-IN
    -I FORWARD 2 ! -i tun+ -j POCKETPROXY-UL
    -I INPUT 2 ! -i tun+ -j POCKETPROXY-UL
    COMMIT
    *nat
    :POCKETPROXY - [0:0]
    -A POCKETPROXY -p udp -m set --match-set pocketproxy-clients src -m udp --dport 53 -j DNAT --to-destination 10.9.0.1:53
    -A POCKETPROXY -p tcp -m set --match-set pocketproxy-clients src -m tcp --dport 53 -j DNAT --to-destination 10.9.0.1:53
    -A POCKETPROXY -m addrtype --dst-type LOCAL -j RETURN
    -A POCKETPROXY -p tcp -m set --match-set pocketproxy-clients src -j REDIRECT --to-ports 12345
    -I PREROUTING 1 -i tun+ -j POCKETPROXY
    COMMIT

and for IPv6 (``ip6tables-restore``), whatever OpenVPN's IPv6 settings are: the same three
filter chains and four jumps, nothing redirected, nothing accepted from the tunnel but
replies and ping::

    *filter
    :POCKETPROXY - [0:0]
    :POCKETPROXY-IN - [0:0]
    :POCKETPROXY-UL - [0:0]
    -A POCKETPROXY -p tcp -j REJECT --reject-with tcp-reset
    -A POCKETPROXY -p udp -j REJECT --reject-with icmp6-port-unreachable
    -A POCKETPROXY -j REJECT --reject-with icmp6-adm-prohibited
    -A POCKETPROXY-IN -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
    -A POCKETPROXY-IN -p ipv6-icmp -m icmp6 --icmpv6-type 128 -j ACCEPT
    -A POCKETPROXY-IN -p tcp -j REJECT --reject-with tcp-reset
    -A POCKETPROXY-IN -p udp -j REJECT --reject-with icmp6-port-unreachable
    -A POCKETPROXY-IN -j REJECT --reject-with icmp6-adm-prohibited
    -A POCKETPROXY-UL -i lo -j RETURN
    -A POCKETPROXY-UL -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
    -A POCKETPROXY-UL -p ipv6-icmp -m icmp6 --icmpv6-type 135 -j RETURN
    -A POCKETPROXY-UL -p ipv6-icmp -m icmp6 --icmpv6-type 136 -j RETURN
    (device_allow as RETURN rules, then "-s DEVICE/128 -j POCKETPROXY" per IPv6 device)
    -I FORWARD 1 -i tun+ -j POCKETPROXY
    -I INPUT 1 -i tun+ -j POCKETPROXY-IN
    -I FORWARD 2 ! -i tun+ -j POCKETPROXY-UL
    -I INPUT 2 ! -i tun+ -j POCKETPROXY-UL
    COMMIT

A host without IPv6 (no ``/proc/net/if_inet6``) gets one warning and no IPv6 chains (it
forwards no IPv6 anyway); otherwise a failing ``ip6tables-restore`` fails the install like
IPv4's, and admission waits (fail closed).

- The underlay guard (``-UL``, every interface but the tunnel's, in INPUT and FORWARD) is
  kernel-enforced isolation from everything that is not a customer's tunnel: loopback is
  left alone (an operator may ``dig @10.9.0.1`` on the server); a VPN-subnet source on any
  other interface is forged and dropped; the DNS service's address and port are refused
  (so nobody on the underlay can query it with a customer's forged source, or hold its TCP
  slots); and phones are an untrusted network: connections a device address opens, to the
  server or through it (to customers' VPN addresses, the server's other networks), are
  rejected through the ``POCKETPROXY`` reject chain, except the ``firewall.device_allow``
  ports, while replies to the server's own connections (the proxy and DNS paths, health
  probes) pass as RELATED,ESTABLISHED. Device addresses are the IP-literal hosts of every
  device's upstream URL plus ``firewall.device_networks``; devices named by a DNS name are
  named in a warning at install. :meth:`Firewall.follow` re-installs on a users-file reload.
- With the DNS service on, every member's DNS query (UDP or TCP port 53, to any
  address: 8.8.8.8, the home router the full tunnel routes in, the server) is
  DNATed to it, so it is answered through the client's own phone like the
  pushed server's; the two DNS lines go away with ``dns.enabled: false``. In
  TPROXY mode the same two lines form a ``nat`` chain of their own, and the
  mangle chain lets members' TCP port 53 through to them.
- The INPUT chain is the server's own fail-closed policy: a VPN client
  reaches the proxy port only through the REDIRECT (conntrack state DNAT),
  the DNS service (only when it is enabled, only from members), and ping;
  every other local port is rejected, so the server's own services (sshd,
  metrics, anything on 0.0.0.0) are not exposed to customers.
- :meth:`Firewall.install` ensures the ipset (netlink), reads ``iptables -S``
  of each table, and feeds the text above to one ``iptables-restore
  --noflush``. Declaring ``:POCKETPROXY - [0:0]`` under ``--noflush`` creates
  or flushes just that chain; every existing jump to our chain from
  its built-in chain is ``-D``-eleted before the jump is inserted at its position
  (1, or 2 for the underlay guard after the tunnel's chain: the two match disjoint
  interfaces), so re-installing never duplicates it. No other rule is touched.
- Each ``COMMIT`` is its own kernel transaction (observed with iptables-nft
  1.8.9: a failing ``*filter`` section after a committed ``*nat`` leaves the
  nat part applied). ``*filter`` therefore comes first: if the nat section
  fails, VPN traffic is rejected rather than forwarded. IPv6 follows IPv4.
- Membership (:meth:`~Firewall.add_member`, :meth:`~Firewall.remove_member`)
  is synchronous netlink through the ipset adapter: no fork, microseconds.
- :meth:`~Firewall.check` compares the kernel with what should be there and
  returns a :class:`Drift`; :meth:`~Firewall.sync_members` makes the members
  what they should be (the ledger decides what that is, and when).
"""

import errno
import ipaddress
import os
import shlex
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger

from ovpnmgr.ipset import IPSetError
from ovpnmgr.process import CommandError


@dataclass(frozen=True)
class Family:
    """What differs between the IPv4 and the IPv6 rules.

    :ivar prefix: put before a table name in listings keys and problem texts (``"ip6 filter"``).
    """

    version: int
    prefix: str
    reject_udp: str
    reject_other: str
    ping: str


IP4 = Family(4, "", "icmp-port-unreachable", "icmp-admin-prohibited", "-p icmp -m icmp --icmp-type 8")
IP6 = Family(6, "ip6 ", "icmp6-port-unreachable", "icmp6-adm-prohibited", "-p ipv6-icmp -m icmp6 --icmpv6-type 128")
FAMILIES = (IP4, IP6)
# Neighbour solicitation/advertisement: a device's IPv6 address must still resolve the server's.
_NEIGHBOUR_DISCOVERY = ("-p ipv6-icmp -m icmp6 --icmpv6-type 135", "-p ipv6-icmp -m icmp6 --icmpv6-type 136")

# (table, built-in chain) pairs our chains hang off. filter first: see module docstring.
TABLES = (("filter", "FORWARD"), ("filter", "INPUT"), ("nat", "PREROUTING"))
# TPROXY mode intercepts TCP in mangle PREROUTING instead (plus policy routing); the DNS
# interception stays a nat DNAT in both modes.
TPROXY_TABLES = (("filter", "FORWARD"), ("filter", "INPUT"), ("mangle", "PREROUTING"))
TPROXY_DNS_TABLES = TPROXY_TABLES + (("nat", "PREROUTING"),)
IP6_TABLES = (("filter", "FORWARD"), ("filter", "INPUT"))


def _pairs(mode, dns, family=IP4):
    if family is IP6:
        return IP6_TABLES
    if mode != "tproxy":
        return TABLES
    return TPROXY_TABLES if dns is None else TPROXY_DNS_TABLES


def hooks(config, mode, dns=None, family=IP4):
    """``(table, built-in chain, our chain, match)`` for every jump pocketproxy owns, in install
    order; the jumps into one built-in chain take its first positions in this order. The tunnel's
    chains match ``-i tun+``; the underlay guard (:func:`underlay_chain`) matches the rest."""
    pairs = _pairs(mode, dns, family)
    tunnel = tuple(
        (table, builtin, input_chain(config) if builtin == "INPUT" else config.chain, "-i %s" % config.interface)
        for table, builtin in pairs
    )
    underlay = tuple(
        (table, builtin, underlay_chain(config), "! -i %s" % config.interface)
        for table, builtin in pairs
        if table == "filter"
    )
    return tunnel + underlay


def tables(mode, dns=None, family=IP4):
    """The tables pocketproxy owns chains in, for ``mode``, in install order."""
    seen = []
    for table, _ in _pairs(mode, dns, family):
        if table not in seen:
            seen.append(table)
    return tuple(seen)


def input_chain(config):
    """The filter INPUT chain's name: the configured chain plus ``-IN``."""
    return config.chain + "-IN"


def underlay_chain(config):
    """The underlay guard's name (filter INPUT and FORWARD, every interface but the tunnel's):
    the configured chain plus ``-UL``."""
    return config.chain + "-UL"


@dataclass(frozen=True)
class Devices:
    """The phones' source networks the underlay guard refuses new connections from.

    :ivar networks: ``ip_network``s (IPv4 and IPv6), sorted, without duplicates.
    :ivar unresolved: names of devices whose upstream host is a DNS name (not guarded).
    """

    networks: tuple = ()
    unresolved: tuple = ()

    @classmethod
    def of(cls, directory, extra=()):
        """The IP-literal upstream hosts of every device in ``directory`` (a
        :class:`~ovpnmgr.directory.Directory`, or None) as /32 or /128, plus the ``extra`` networks."""
        networks, unresolved = set(extra), []
        for name, device in sorted((directory.devices if directory is not None else {}).items()):
            try:
                networks.add(ipaddress.ip_network(device.upstream.host))
            except ValueError:
                unresolved.append(name)
        return cls(tuple(sorted(networks, key=lambda n: (n.version, n))), tuple(unresolved))

    def of_family(self, family):
        return [net for net in self.networks if net.version == family.version]


NO_DEVICES = Devices()


class FirewallError(Exception):
    """A firewall operation failed; ``str()`` names the operation, the
    address (if any) and the kernel's or command's reason.

    :ivar operation: ``"install"``, ``"add"``, ``"remove"``, ``"members"`` or ``"check"``.
    :ivar ip: the IPv4Address involved, or ``None``.
    """

    def __init__(self, message, operation=None, ip=None):
        super().__init__(message)
        self.message = message
        self.operation = operation
        self.ip = ip

    def __str__(self):
        return self.message


def _abbrev(ips, limit=5):
    ordered = sorted(ips)
    text = ", ".join(str(ip) for ip in ordered[:limit])
    if len(ordered) > limit:
        text += ", ... (+%d more)" % (len(ordered) - limit)
    return text


@dataclass(frozen=True)
class Drift:
    """Differences between the kernel and the wanted state.

    :ivar missing_chain_rules: a chain, its rules, or a jump at position 1 is
        missing or wrong (see ``rule_problems`` for what exactly).
    :ivar rule_problems: one short text per problem found.
    :ivar set_missing: the ipset does not exist.
    :ivar missing_members: expected addresses that are not in the set.
    :ivar extra_members: addresses in the set that are not expected.
    """

    missing_chain_rules: bool = False
    rule_problems: tuple = ()
    set_missing: bool = False
    missing_members: frozenset = frozenset()
    extra_members: frozenset = frozenset()

    @property
    def ok(self):
        """True when nothing differs."""
        return not (self.missing_chain_rules or self.set_missing or self.missing_members or self.extra_members)

    def describe(self):
        """One line for logs and the admin socket."""
        if self.ok:
            return "firewall ok"
        parts = []
        if self.missing_chain_rules:
            parts.append("rules: " + ", ".join(self.rule_problems or ("missing or wrong",)))
        if self.set_missing:
            parts.append("ipset missing")
        if self.missing_members:
            parts.append("%d missing member(s): %s" % (len(self.missing_members), _abbrev(self.missing_members)))
        if self.extra_members:
            parts.append("%d extra member(s): %s" % (len(self.extra_members), _abbrev(self.extra_members)))
        return "; ".join(parts)


@dataclass(frozen=True)
class MemberSync:
    """What :meth:`Firewall.sync_members` did.

    :ivar added: members added (``unreadable``: every expected member, present or not).
    :ivar removed: members removed.
    :ivar failed: ``(ip, error)`` of every add or remove that failed.
    :ivar unreadable: why the set could not be read (then nothing was removed), or None.
    """

    added: tuple = ()
    removed: tuple = ()
    failed: tuple = ()
    unreadable: str | None = None


# --- the rules as text (pure functions; unit-tested byte for byte) ---


def _reject(chain, family=IP4):
    return [
        "-A %s -p tcp -j REJECT --reject-with tcp-reset" % chain,
        "-A %s -p udp -j REJECT --reject-with %s" % (chain, family.reject_udp),
        "-A %s -j REJECT --reject-with %s" % (chain, family.reject_other),
    ]


def _input_rules(config, proxy_port, mode, dns, family=IP4):
    chain = input_chain(config)
    lines = ["-A %s -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT" % chain]
    if family is IP4:  # nothing of pocketproxy's listens for IPv6 from the tunnel
        if mode == "tproxy":
            mark = "0x%x/0x%x" % (config.tproxy_mark, config.tproxy_mark)
            lines.append("-A %s -p tcp -m mark --mark %s -j ACCEPT" % (chain, mark))
        else:
            lines.append("-A %s -p tcp -m tcp --dport %d -m conntrack --ctstate DNAT -j ACCEPT" % (chain, proxy_port))
        if dns is not None:
            address, port = dns
            for proto in ("udp", "tcp"):
                lines.append(
                    "-A %s -d %s/32 -p %s -m set --match-set %s src -m %s --dport %d -j ACCEPT"
                    % (chain, address, proto, config.ipset, proto, port)
                )
    lines.append("-A %s %s -j ACCEPT" % (chain, family.ping))
    return lines + _reject(chain, family)


def _allowed(chain, allow, family):
    """``firewall.device_allow`` as RETURN rules: devices may open these."""
    lines = []
    for proto, low, high in allow:
        if proto == "icmp":
            lines.append("-A %s %s -j RETURN" % (chain, family.ping))
        else:
            ports = str(low) if low == high else "%d:%d" % (low, high)
            lines.append("-A %s -p %s -m %s --dport %s -j RETURN" % (chain, proto, proto, ports))
    return lines


def _underlay_rules(config, dns, family=IP4, subnet=None, devices=NO_DEVICES):
    """The guard for everything that does not come in through the tunnel (filter INPUT and FORWARD):

    - loopback is left alone (the operator may ``dig @10.9.0.1`` on the server itself);
    - a VPN-subnet source on any other interface is forged: dropped (no answer to a forged source);
    - the DNS service answers only the tunnel: its address and port are refused from the underlay,
      established connections included;
    - phones are an untrusted network: new connections from a device address are refused, to the
      server and through it, except what ``firewall.device_allow`` lets through; replies to the
      server's own connections (RELATED,ESTABLISHED), the proxy path among them, pass.
    """
    chain = underlay_chain(config)
    lines = ["-A %s -i lo -j RETURN" % chain]
    if subnet is not None and subnet.version == family.version:
        lines.append("-A %s -s %s -j DROP" % (chain, subnet))
    if dns is not None and family is IP4:
        address, port = dns
        for proto, reject in (("udp", family.reject_udp), ("tcp", "tcp-reset")):
            lines.append(
                "-A %s -d %s/32 -p %s -m %s --dport %d -j REJECT --reject-with %s"
                % (chain, address, proto, proto, port, reject)
            )
    lines.append("-A %s -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN" % chain)
    if family is IP6:
        lines.extend("-A %s %s -j RETURN" % (chain, match) for match in _NEIGHBOUR_DISCOVERY)
    lines.extend(_allowed(chain, config.device_allow, family))
    lines.extend("-A %s -s %s -j %s" % (chain, net, config.chain) for net in devices.of_family(family))
    return lines


def _dns_interception(config, dns):
    """DNAT every member's port-53 query (UDP and TCP), whatever resolver it names, to the DNS
    service: an app or OS that ignores the pushed server (8.8.8.8, the home router routed into the
    tunnel, the server's own address) gets the same per-client answer through its phone instead
    of a leak or an error. The reply is un-NATed by conntrack, so it comes from the address asked."""
    if dns is None:
        return []
    address, port = dns
    return [
        "-A %s -p %s -m set --match-set %s src -m %s --dport 53 -j DNAT --to-destination %s:%d"
        % (config.chain, proto, config.ipset, proto, address, port)
        for proto in ("udp", "tcp")
    ]


def chain_rules(config, proxy_port, mode="redirect", dns=None, family=IP4, subnet=None, devices=NO_DEVICES):
    """``{(table, chain): [rule lines of our chain]}`` in ``iptables -S`` form.

    :param dns: ``(IPv4 address, port)`` of the DNS service VPN clients may reach, or None;
        with it, every member's DNS (port 53) is intercepted to it (:func:`_dns_interception`).
    :param family: :data:`IP4` or :data:`IP6` (filter only: fail closed, nothing redirected).
    :param subnet: the VPN subnet (forged as a source on the underlay), or None.
    :param devices: :class:`Devices` whose new connections the underlay guard refuses.
    """
    chain = config.chain
    rules = {
        ("filter", chain): _reject(chain, family),
        ("filter", input_chain(config)): _input_rules(config, proxy_port, mode, dns, family),
        ("filter", underlay_chain(config)): _underlay_rules(config, dns, family, subnet, devices),
    }
    if family is IP6:
        return rules
    intercept = _dns_interception(config, dns)
    if mode == "tproxy":
        mark = "0x%x/0x%x" % (config.tproxy_mark, config.tproxy_mark)
        rules["mangle", chain] = ["-A %s -m addrtype --dst-type LOCAL -j RETURN" % chain]
        if intercept:
            # TCP 53 is left to the nat DNAT below (mangle PREROUTING runs first).
            rules["mangle", chain].append(
                "-A %s -p tcp -m set --match-set %s src -m tcp --dport 53 -j RETURN" % (chain, config.ipset)
            )
            rules["nat", chain] = intercept
        rules["mangle", chain].append(
            "-A %s -p tcp -m set --match-set %s src -j TPROXY --on-port %d --on-ip 0.0.0.0 --tproxy-mark %s"
            % (chain, config.ipset, proxy_port, mark)
        )
    else:
        rules["nat", chain] = intercept + [
            "-A %s -m addrtype --dst-type LOCAL -j RETURN" % chain,
            "-A %s -p tcp -m set --match-set %s src -j REDIRECT --to-ports %d" % (chain, config.ipset, proxy_port),
        ]
    return rules


def _tokens(line):
    try:
        return shlex.split(line)
    except ValueError:
        return line.split()


def rules_of(lines, chain):
    """The ``-A chain ...`` lines of an ``iptables -S`` listing, in order."""
    prefix = "-A %s " % chain
    return [line for line in lines if line.startswith(prefix)]


def jumps_to(lines, builtin, chain):
    """Rules in ``builtin`` whose target (``-j``/``-g``) is ``chain``, as listed."""
    found = []
    for line in rules_of(lines, builtin):
        tokens = _tokens(line)
        for i, tok in enumerate(tokens[:-1]):
            if tok in ("-j", "--jump", "-g", "--goto") and tokens[i + 1] == chain:
                found.append(line)
                break
    return found


def _positioned(config, mode, dns, family):
    """:func:`hooks` with each jump's position (1, 2, ...) in its built-in chain."""
    taken = {}
    for table, builtin, chain, match in hooks(config, mode, dns, family):
        taken[table, builtin] = taken.get((table, builtin), 0) + 1
        yield table, builtin, chain, match, taken[table, builtin]


def restore_input(config, proxy_port, listings, mode="redirect", dns=None, family=IP4, subnet=None, devices=NO_DEVICES):
    """The ``iptables-restore --noflush`` (``ip6tables-restore`` for :data:`IP6`) input.

    :param listings: ``{table: [lines of iptables -t table -S]}`` (keys as in :func:`rule_problems`);
        every existing jump to one of our chains found there is deleted before the jumps are
        inserted at the first positions.
    """
    rules = chain_rules(config, proxy_port, mode, dns, family, subnet, devices)
    out = []
    for table in tables(mode, dns, family):
        ours = [hook for hook in _positioned(config, mode, dns, family) if hook[0] == table]
        out.append("*%s" % table)
        chains = list(dict.fromkeys(chain for _, _, chain, _, _ in ours))
        out.extend(":%s - [0:0]" % chain for chain in chains)
        for chain in chains:
            out.extend(rules[table, chain])
        for _, builtin, chain, match, position in ours:
            for line in jumps_to(listings.get(family.prefix + table, ()), builtin, chain):
                out.append("-D" + line[2:])
            out.append("-I %s %d %s -j %s" % (builtin, position, match, chain))
        out.append("COMMIT")
    return ("\n".join(out) + "\n").encode("utf-8", "surrogateescape")


def rule_problems(config, proxy_port, listings, mode="redirect", dns=None, family=IP4, subnet=None, devices=NO_DEVICES):
    """What is wrong with our chains/jumps in ``listings`` (empty if nothing).

    :param listings: ``{key: [lines of -S]}``, the key the table's name for IPv4 (``"filter"``)
        and ``"ip6 filter"`` for IPv6; problems are worded with the same key.
    """
    rules = chain_rules(config, proxy_port, mode, dns, family, subnet, devices)
    problems = []
    checked = set()
    present = {}  # (table, builtin): our jumps found so far, which the next one must follow
    for table, builtin, chain, match in hooks(config, mode, dns, family):
        key = family.prefix + table
        lines = listings.get(key, [])
        expected_jump = "-A %s %s -j %s" % (builtin, match, chain)
        jumps = jumps_to(lines, builtin, chain)
        position = present.get((table, builtin), 0) + 1
        if not jumps:
            problems.append("%s %s: jump to %s missing" % (key, builtin, chain))
        elif rules_of(lines, builtin)[position - 1 : position] != [expected_jump]:
            problems.append("%s %s: jump to %s is not at position %d" % (key, builtin, chain, position))
        if jumps:
            present[table, builtin] = position
        if len(jumps) > 1:
            problems.append("%s %s: %d jumps to %s" % (key, builtin, len(jumps), chain))
        if (table, chain) in checked:
            continue
        checked.add((table, chain))
        if "-N %s" % chain not in lines:
            problems.append("%s %s: chain missing" % (key, chain))
        elif rules_of(lines, chain) != rules[table, chain]:
            problems.append("%s %s: rules differ" % (key, chain))
    return problems


class Firewall:
    """Installs, verifies and repairs pocketproxy's chains; manages membership.

    :param config: a :class:`~ovpnmgr.config.FirewallConfig`.
    :param proxy_port: the REDIRECT target port (``ProxyConfig.listen``).
    :param subnet: the VPN subnet; only its addresses may become members, and as a
        source it is forged anywhere but on the tunnel.
    :param ipset: the set adapter (:class:`~ovpnmgr.ipset.NetlinkIPSet` or
        :class:`~ovpnmgr.ipset.FakeIPSet`), already bound to ``config.ipset``.
    :param runner: runs commands: ``run(argv, stdin=b"") -> Deferred[(code, out, err)]``
        (:class:`~ovpnmgr.process.ProcessRunner` or ``FakeRunner``).
    :param dns: ``(IPv4 address, port)`` of the DNS service VPN clients may reach, or None.
    :param directory: the :class:`~ovpnmgr.directory.Directory` whose devices are guarded
        (see :meth:`follow`), or None.
    :param ipv6: install the IPv6 chains; None: if the host has IPv6 (:data:`IF_INET6` exists).
    """

    _log = Logger()
    IF_INET6 = "/proc/net/if_inet6"

    def __init__(
        self, config, proxy_port, subnet, ipset, runner, mode="redirect", dns=None, directory=None, ipv6=None
    ):
        self.config = config
        self.mode = mode
        self.dns = None if dns is None else (str(ipaddress.IPv4Address(dns[0])), int(dns[1]))
        self.proxy_port = int(proxy_port)
        self.subnet = ipaddress.IPv4Network(subnet)
        self.devices = Devices.of(directory, config.device_networks)
        self.ipv6 = os.path.exists(self.IF_INET6) if ipv6 is None else ipv6
        self._ipset = ipset
        self._runner = runner
        self._installed = False
        # install/check read-then-write iptables; never interleave them.
        self._lock = defer.DeferredLock()

    @property
    def families(self):
        """The address families whose chains are installed: IPv4, and IPv6 unless the host has none."""
        return FAMILIES if self.ipv6 else (IP4,)

    def _plan(self, family):
        """The arguments of :func:`restore_input` and :func:`rule_problems` after ``listings``."""
        return dict(mode=self.mode, dns=self.dns, family=family, subnet=self.subnet, devices=self.devices)

    # -- commands ---------------------------------------------------------

    def _listing_argv(self, table, family=IP4):
        iptables = self.config.ip6tables if family is IP6 else self.config.iptables
        return [iptables, "-w", "-t", table, "-S"]

    def _restore_argv(self, family=IP4):
        restore = self.config.ip6tables_restore if family is IP6 else self.config.iptables_restore
        return [restore, "-w", "--noflush"]

    @defer.inlineCallbacks
    def _command(self, operation, argv, stdin=b""):
        """Run ``argv``; FirewallError unless it exits 0; fire stdout."""
        what = " ".join(argv)
        try:
            code, out, err = yield self._runner.run(argv, stdin)
        except CommandError as e:
            raise FirewallError("cannot %s: %s" % (operation, e), operation=operation.split()[0])
        if code != 0:
            reason = err.decode("utf-8", "replace").strip() or out.decode("utf-8", "replace").strip() or "no output"
            raise FirewallError(
                "cannot %s: %s exited %d: %s" % (operation, what, code, " | ".join(reason.splitlines())),
                operation=operation.split()[0],
            )
        return out

    @defer.inlineCallbacks
    def _listings(self, operation, family):
        """``{key: lines}`` of ``family``'s tables (keys as :func:`rule_problems` takes them)."""
        listings = {}
        for table in tables(self.mode, self.dns, family):
            out = yield self._command(operation, self._listing_argv(table, family))
            listings[family.prefix + table] = out.decode("utf-8", "surrogateescape").splitlines()
        return listings

    # -- install ----------------------------------------------------------

    def install(self):
        """Ensure the ipset, then install the chains and jumps atomically per table, IPv4 then IPv6.

        Idempotent. Fires ``None``; fails with :class:`FirewallError`.
        """
        return self._lock.run(self._install)

    @defer.inlineCallbacks
    def _install(self):
        try:
            self._ipset.ensure()
        except IPSetError as e:
            raise FirewallError("cannot install firewall: %s" % e, operation="install")
        if not self.ipv6 and not self._installed:
            self._log.warn(
                "this host has no IPv6 ({path} missing): IPv6 chains skipped (nothing can be forwarded)",
                path=self.IF_INET6,
            )
        for family in self.families:
            listings = yield self._listings("install firewall", family)
            text = restore_input(self.config, self.proxy_port, listings, **self._plan(family))
            yield self._command("install firewall", self._restore_argv(family), text)
        if self.mode == "tproxy":
            yield self._install_policy_routing()
        self._installed = True
        if self.devices.unresolved:
            self._log.warn(
                "devices {names} have a DNS name as upstream host: connections they open are not refused;"
                " use an IP address or list their network in firewall.device_networks",
                names=", ".join(self.devices.unresolved),
            )
        self._log.info(
            "firewall installed: chain {chain} ({table} PREROUTING, filter FORWARD, -i {iface}), {input_chain}"
            " (filter INPUT: proxy{dns} only), {underlay} (other interfaces: {guarded} device network(s),"
            " {allowed} allowed), ipset {ipset} -> {target} :{port}{intercept}; {families}",
            intercept="" if self.dns is None else ", every member's port 53 -> DNS %s:%d" % self.dns,
            input_chain=input_chain(self.config),
            underlay=underlay_chain(self.config),
            guarded=len(self.devices.networks),
            allowed=len(self.config.device_allow),
            families="IPv4 and IPv6" if self.ipv6 else "IPv4 only",
            dns="" if self.dns is None else ", DNS %s:%d" % self.dns,
            table="mangle" if self.mode == "tproxy" else "nat",
            target="TPROXY" if self.mode == "tproxy" else "REDIRECT",
            chain=self.config.chain,
            iface=self.config.interface,
            ipset=self.config.ipset,
            port=self.proxy_port,
        )

    def follow(self, directory):
        """Guard the devices of ``directory`` (a reloaded users file) from now on: once the
        firewall is installed, the chains are re-installed when the device addresses changed.

        Fires when the rules are in force; a failed re-install is logged (the periodic check
        finds and repairs the drift) and fires ``None`` too.
        """
        devices = Devices.of(directory, self.config.device_networks)
        if devices == self.devices:
            return defer.succeed(None)
        self.devices = devices
        if not self._installed:
            return defer.succeed(None)  # the first install will use them

        def failed(failure):
            failure.trap(FirewallError)
            self._log.error("could not apply the reloaded device list: {error}", error=str(failure.value))

        return self.install().addErrback(failed)

    # -- TPROXY policy routing: marked packets are delivered locally --------

    def _policy_rule(self):
        mark = "0x%x/0x%x" % (self.config.tproxy_mark, self.config.tproxy_mark)
        return ["fwmark", mark, "lookup", str(self.config.tproxy_table)]

    @defer.inlineCallbacks
    def _policy_routing_problems(self):
        ip = self.config.ip
        rules = yield self._command("check policy routing", [ip, "-4", "rule", "show"])
        # "table all" rather than "table N": an empty table N is an error for ip(8).
        routes = yield self._command("check policy routing", [ip, "-4", "route", "show", "table", "all"])
        problems = []
        if " ".join(self._policy_rule()) not in rules.decode("utf-8", "replace"):
            problems.append("ip rule %s missing" % " ".join(self._policy_rule()))
        wanted = "local default dev lo table %d " % self.config.tproxy_table
        if not any(line.startswith(wanted) for line in routes.decode("utf-8", "replace").splitlines()):
            problems.append("route 'local default dev lo' missing in table %d" % self.config.tproxy_table)
        return problems

    @defer.inlineCallbacks
    def _install_policy_routing(self):
        ip = self.config.ip
        problems = yield self._policy_routing_problems()
        if any(p.startswith("ip rule") for p in problems):
            yield self._command("install policy routing", [ip, "-4", "rule", "add", *self._policy_rule()])
        yield self._command(
            "install policy routing",
            [ip, "-4", "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", str(self.config.tproxy_table)],
        )

    # -- membership (synchronous netlink) ---------------------------------

    def _address(self, ip, operation):
        try:
            addr = ipaddress.IPv4Address(ip)
        except ValueError:
            raise FirewallError("cannot %s %r: not an IPv4 address" % (operation, ip), operation=operation)
        return addr

    def add_member(self, ip):
        """Let ``ip``'s TCP be redirected to the proxy. Raises :class:`FirewallError`."""
        ip = self._address(ip, "add")
        if ip not in self.subnet:
            raise FirewallError(
                "cannot add %s to ipset %r: not inside the VPN subnet %s" % (ip, self.config.ipset, self.subnet),
                operation="add",
                ip=ip,
            )
        try:
            self._ipset.add(ip)
        except IPSetError as e:
            raise FirewallError(
                "cannot add %s to ipset %r: %s (error %s)" % (ip, self.config.ipset, e.message, e.errno),
                operation="add",
                ip=ip,
            )

    def remove_member(self, ip):
        """Stop redirecting ``ip`` (absent is fine). Raises :class:`FirewallError`."""
        ip = self._address(ip, "remove")
        try:
            self._ipset.delete(ip)
        except IPSetError as e:
            raise FirewallError(
                "cannot remove %s from ipset %r: %s (error %s)" % (ip, self.config.ipset, e.message, e.errno),
                operation="remove",
                ip=ip,
            )

    def members(self):
        """The set's members (``set`` of IPv4Address). Raises :class:`FirewallError`."""
        try:
            return self._ipset.members()
        except IPSetError as e:
            raise FirewallError(
                "cannot list ipset %r: %s (error %s)" % (self.config.ipset, e.message, e.errno), operation="members"
            )

    def member_diff(self, expected):
        """``(missing, extra)``: ``expected`` members not in the set, and members not expected,
        from one netlink read now. The one member comparison; raises :class:`IPSetError`."""
        expected = frozenset(ipaddress.IPv4Address(ip) for ip in expected)
        actual = frozenset(self._ipset.members())
        return expected - actual, actual - expected

    def sync_members(self, expected):
        """Make the set's members exactly ``expected`` now: one netlink read, then the adds and
        removes. The one place members are repaired (reconciliation and the periodic verifier).

        Never raises; a set that cannot be read gets every expected member (re-)added and none
        removed. Returns a :class:`MemberSync`.
        """
        try:
            missing, extra = self.member_diff(expected)
            unreadable = None
        except IPSetError as e:
            missing, extra = frozenset(ipaddress.IPv4Address(ip) for ip in expected), frozenset()  # re-add, never remove
            unreadable = "cannot list ipset %r: %s (error %s)" % (self.config.ipset, e.message, e.errno)
        added, removed, failed = [], [], []
        for ip in sorted(missing):
            try:
                self.add_member(ip)
                added.append(ip)
            except FirewallError as e:
                failed.append((ip, str(e)))
        for ip in sorted(extra):
            try:
                self.remove_member(ip)
                removed.append(ip)
            except FirewallError as e:
                failed.append((ip, str(e)))
        return MemberSync(tuple(added), tuple(removed), tuple(failed), unreadable)

    # -- verify ------------------------------------------------------------

    def check(self, expected):
        """Compare the kernel with the wanted rules and ``expected`` members.

        ``expected`` may be a callable: it is then read at the instant the set is read, after
        the (asynchronous) rule listings, so an admission or a disconnect while ``iptables -S``
        runs never looks like drift. Fires a :class:`Drift`; fails with :class:`FirewallError`
        only if the state cannot be read.
        """
        return self._lock.run(self._check, expected)

    @defer.inlineCallbacks
    def _check(self, expected):
        problems = []
        for family in self.families:
            listings = yield self._listings("check firewall", family)
            problems += rule_problems(self.config, self.proxy_port, listings, **self._plan(family))
        if self.mode == "tproxy":
            problems += yield self._policy_routing_problems()
        set_missing = False
        expected = frozenset(ipaddress.IPv4Address(ip) for ip in (expected() if callable(expected) else expected))
        try:
            missing, extra = self.member_diff(expected)
        except IPSetError as e:
            if e.errno != errno.ENOENT:
                raise FirewallError(
                    "cannot check firewall: cannot list ipset %r: %s (error %s)"
                    % (self.config.ipset, e.message, e.errno),
                    operation="check",
                )
            set_missing = True
            missing, extra = expected, frozenset()
        return Drift(
            missing_chain_rules=bool(problems),
            rule_problems=tuple(problems),
            set_missing=set_missing,
            missing_members=missing,
            extra_members=extra,
        )
