# -*- test-case-name: tests.unit.test_firewall -*-
"""pocketproxy's kernel rules as text: its own chains, one ipset, nothing else (pure functions).

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
  named in a warning at install. :meth:`ovpnmgr.firewall.Firewall.follow` re-installs on a users-file reload.
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

The functions here build the ``iptables-restore`` input from the listings of what is in the
kernel and find what differs (:func:`restore_input`, :func:`rule_problems`); applying them is
:class:`ovpnmgr.firewall.Firewall`'s job.
"""

import ipaddress
import shlex
from dataclasses import dataclass


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
