# -*- test-case-name: tests.unit.test_firewall -*-
"""pocketproxy's kernel state: its own chains, one ipset, nothing else.

Shape (names from :class:`~ovpnmgr.config.FirewallConfig`; defaults shown)::

    *filter
    :POCKETPROXY - [0:0]                      # fail closed: VPN traffic that was
    :POCKETPROXY-IN - [0:0]                   # not redirected dies fast
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
    -I FORWARD 1 -i tun+ -j POCKETPROXY
    -I INPUT 1 -i tun+ -j POCKETPROXY-IN
    COMMIT
    *nat
    :POCKETPROXY - [0:0]
    -A POCKETPROXY -p udp -m set --match-set pocketproxy-clients src -m udp --dport 53 -j DNAT --to-destination 10.9.0.1:53
    -A POCKETPROXY -p tcp -m set --match-set pocketproxy-clients src -m tcp --dport 53 -j DNAT --to-destination 10.9.0.1:53
    -A POCKETPROXY -m addrtype --dst-type LOCAL -j RETURN
    -A POCKETPROXY -p tcp -m set --match-set pocketproxy-clients src -j REDIRECT --to-ports 12345
    -I PREROUTING 1 -i tun+ -j POCKETPROXY
    COMMIT

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
  its built-in chain is ``-D``-eleted before the jump is inserted at position 1,
  so re-installing never duplicates it. No other rule is touched.
- Each ``COMMIT`` is its own kernel transaction (observed with iptables-nft
  1.8.9: a failing ``*filter`` section after a committed ``*nat`` leaves the
  nat part applied). ``*filter`` therefore comes first: if the nat section
  fails, VPN traffic is rejected rather than forwarded.
- Membership (:meth:`~Firewall.add_member`, :meth:`~Firewall.remove_member`)
  is synchronous netlink through the ipset adapter: no fork, microseconds.
- :meth:`~Firewall.check` and :meth:`~Firewall.repair` compare the kernel with
  what should be there and return a :class:`Drift`.
"""

import errno
import ipaddress
import shlex
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger

from ovpnmgr.ipset import IPSetError
from ovpnmgr.process import CommandError

# (table, built-in chain) pairs our chains hang off. filter first: see module docstring.
TABLES = (("filter", "FORWARD"), ("filter", "INPUT"), ("nat", "PREROUTING"))
# TPROXY mode intercepts TCP in mangle PREROUTING instead (plus policy routing); the DNS
# interception stays a nat DNAT in both modes.
TPROXY_TABLES = (("filter", "FORWARD"), ("filter", "INPUT"), ("mangle", "PREROUTING"))
TPROXY_DNS_TABLES = TPROXY_TABLES + (("nat", "PREROUTING"),)


def _pairs(mode, dns):
    if mode != "tproxy":
        return TABLES
    return TPROXY_TABLES if dns is None else TPROXY_DNS_TABLES


def hooks(config, mode, dns=None):
    """``(table, built-in chain, our chain)`` for every jump pocketproxy owns, in install order."""
    return tuple(
        (table, builtin, input_chain(config) if builtin == "INPUT" else config.chain)
        for table, builtin in _pairs(mode, dns)
    )


def tables(mode, dns=None):
    """The tables pocketproxy owns chains in, for ``mode``, in install order."""
    seen = []
    for table, _ in _pairs(mode, dns):
        if table not in seen:
            seen.append(table)
    return tuple(seen)


def input_chain(config):
    """The filter INPUT chain's name: the configured chain plus ``-IN``."""
    return config.chain + "-IN"


class FirewallError(Exception):
    """A firewall operation failed; ``str()`` names the operation, the
    address (if any) and the kernel's or command's reason.

    :ivar operation: ``"install"``, ``"add"``, ``"remove"``, ``"members"``,
        ``"check"`` or ``"repair"``.
    :ivar ip: the IPv4Address involved, or ``None``.
    :ivar drift: for ``"repair"``: the :class:`Drift` that was being fixed.
    """

    def __init__(self, message, operation=None, ip=None, drift=None):
        super().__init__(message)
        self.message = message
        self.operation = operation
        self.ip = ip
        self.drift = drift

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


# --- the rules as text (pure functions; unit-tested byte for byte) ---


def _reject(chain):
    return [
        "-A %s -p tcp -j REJECT --reject-with tcp-reset" % chain,
        "-A %s -p udp -j REJECT --reject-with icmp-port-unreachable" % chain,
        "-A %s -j REJECT --reject-with icmp-admin-prohibited" % chain,
    ]


def _input_rules(config, proxy_port, mode, dns):
    chain = input_chain(config)
    lines = ["-A %s -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT" % chain]
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
    lines.append("-A %s -p icmp -m icmp --icmp-type 8 -j ACCEPT" % chain)
    return lines + _reject(chain)


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


def chain_rules(config, proxy_port, mode="redirect", dns=None):
    """``{(table, chain): [rule lines of our chain]}`` in ``iptables -S`` form.

    :param dns: ``(IPv4 address, port)`` of the DNS service VPN clients may reach, or None;
        with it, every member's DNS (port 53) is intercepted to it (:func:`_dns_interception`).
    """
    chain = config.chain
    rules = {
        ("filter", chain): _reject(chain),
        ("filter", input_chain(config)): _input_rules(config, proxy_port, mode, dns),
    }
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


def jump_spec(config, chain=None):
    """A jump's rule spec without the ``-A BUILTIN`` part."""
    return "-i %s -j %s" % (config.interface, chain or config.chain)


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


def restore_input(config, proxy_port, listings, mode="redirect", dns=None):
    """The ``iptables-restore --noflush`` input.

    :param listings: ``{table: [lines of iptables -t table -S]}``; every
        existing jump to one of our chains found there is deleted before the
        jump is inserted at position 1.
    """
    rules = chain_rules(config, proxy_port, mode, dns)
    out = []
    for table in tables(mode, dns):
        ours = [(builtin, chain) for t, builtin, chain in hooks(config, mode, dns) if t == table]
        out.append("*%s" % table)
        out.extend(":%s - [0:0]" % chain for _, chain in ours)
        for _, chain in ours:
            out.extend(rules[table, chain])
        for builtin, chain in ours:
            for line in jumps_to(listings.get(table, ()), builtin, chain):
                out.append("-D" + line[2:])
            out.append("-I %s 1 %s" % (builtin, jump_spec(config, chain)))
        out.append("COMMIT")
    return ("\n".join(out) + "\n").encode("utf-8", "surrogateescape")


def rule_problems(config, proxy_port, listings, mode="redirect", dns=None):
    """What is wrong with our chains/jumps in ``listings`` (empty if nothing)."""
    rules = chain_rules(config, proxy_port, mode, dns)
    problems = []
    for table, builtin, chain in hooks(config, mode, dns):
        lines = listings.get(table, [])
        expected_jump = "-A %s %s" % (builtin, jump_spec(config, chain))
        jumps = jumps_to(lines, builtin, chain)
        first = rules_of(lines, builtin)[:1]
        if not jumps:
            problems.append("%s %s: jump to %s missing" % (table, builtin, chain))
        elif first != [expected_jump]:
            problems.append("%s %s: jump to %s is not at position 1" % (table, builtin, chain))
        if len(jumps) > 1:
            problems.append("%s %s: %d jumps to %s" % (table, builtin, len(jumps), chain))
        if "-N %s" % chain not in lines:
            problems.append("%s %s: chain missing" % (table, chain))
        elif rules_of(lines, chain) != rules[table, chain]:
            problems.append("%s %s: rules differ" % (table, chain))
    return problems


class Firewall:
    """Installs, verifies and repairs pocketproxy's chains; manages membership.

    :param config: a :class:`~ovpnmgr.config.FirewallConfig`.
    :param proxy_port: the REDIRECT target port (``ProxyConfig.listen``).
    :param subnet: the VPN subnet; only its addresses may become members.
    :param ipset: the set adapter (:class:`~ovpnmgr.ipset.NetlinkIPSet` or
        :class:`~ovpnmgr.ipset.FakeIPSet`), already bound to ``config.ipset``.
    :param runner: runs commands: ``run(argv, stdin=b"") -> Deferred[(code, out, err)]``
        (:class:`~ovpnmgr.process.ProcessRunner` or ``FakeRunner``).
    :param dns: ``(IPv4 address, port)`` of the DNS service VPN clients may reach, or None.
    """

    _log = Logger()

    def __init__(self, config, proxy_port, subnet, ipset, runner, mode="redirect", dns=None):
        self.config = config
        self.mode = mode
        self.dns = None if dns is None else (str(ipaddress.IPv4Address(dns[0])), int(dns[1]))
        self.proxy_port = int(proxy_port)
        self.subnet = ipaddress.IPv4Network(subnet)
        self._ipset = ipset
        self._runner = runner
        # install/check/repair read-then-write iptables; never interleave them.
        self._lock = defer.DeferredLock()

    # -- commands ---------------------------------------------------------

    def _listing_argv(self, table):
        return [self.config.iptables, "-w", "-t", table, "-S"]

    def _restore_argv(self):
        return [self.config.iptables_restore, "-w", "--noflush"]

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
    def _listings(self, operation):
        listings = {}
        for table in tables(self.mode, self.dns):
            out = yield self._command(operation, self._listing_argv(table))
            listings[table] = out.decode("utf-8", "surrogateescape").splitlines()
        return listings

    # -- install ----------------------------------------------------------

    def install(self):
        """Ensure the ipset, then install both chains and jumps atomically per table.

        Idempotent. Fires ``None``; fails with :class:`FirewallError`.
        """
        return self._lock.run(self._install)

    @defer.inlineCallbacks
    def _install(self):
        try:
            self._ipset.ensure()
        except IPSetError as e:
            raise FirewallError("cannot install firewall: %s" % e, operation="install")
        listings = yield self._listings("install firewall")
        text = restore_input(self.config, self.proxy_port, listings, self.mode, self.dns)
        yield self._command("install firewall", self._restore_argv(), text)
        if self.mode == "tproxy":
            yield self._install_policy_routing()
        self._log.info(
            "firewall installed: chain {chain} ({table} PREROUTING, filter FORWARD, -i {iface}), {input_chain}"
            " (filter INPUT: proxy{dns} only), ipset {ipset} -> {target} :{port}{intercept}",
            intercept="" if self.dns is None else ", every member's port 53 -> DNS %s:%d" % self.dns,
            input_chain=input_chain(self.config),
            dns="" if self.dns is None else ", DNS %s:%d" % self.dns,
            table="mangle" if self.mode == "tproxy" else "nat",
            target="TPROXY" if self.mode == "tproxy" else "REDIRECT",
            chain=self.config.chain,
            iface=self.config.interface,
            ipset=self.config.ipset,
            port=self.proxy_port,
        )

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

    # -- verify / repair --------------------------------------------------

    def check(self, expected):
        """Compare the kernel with the wanted rules and ``expected`` members.

        Fires a :class:`Drift`; fails with :class:`FirewallError` only if the
        state cannot be read.
        """
        return self._lock.run(self._check, expected)

    @defer.inlineCallbacks
    def _check(self, expected):
        expected = frozenset(ipaddress.IPv4Address(ip) for ip in expected)
        listings = yield self._listings("check firewall")
        problems = rule_problems(self.config, self.proxy_port, listings, self.mode, self.dns)
        if self.mode == "tproxy":
            problems += yield self._policy_routing_problems()
        set_missing = False
        try:
            actual = frozenset(self._ipset.members())
        except IPSetError as e:
            if e.errno != errno.ENOENT:
                raise FirewallError(
                    "cannot check firewall: cannot list ipset %r: %s (error %s)"
                    % (self.config.ipset, e.message, e.errno),
                    operation="check",
                )
            set_missing = True
            actual = frozenset()
        return Drift(
            missing_chain_rules=bool(problems),
            rule_problems=tuple(problems),
            set_missing=set_missing,
            missing_members=expected - actual,
            extra_members=actual - expected,
        )

    def repair(self, expected):
        """Fix what :meth:`check` finds: re-install the chains if anything
        about them is wrong, add missing members, remove extra ones.

        Fires the :class:`Drift` that was found (and fixed); fails with
        :class:`FirewallError` (its ``drift`` attribute set) if a fix failed.
        """
        return self._lock.run(self._repair, expected)

    @defer.inlineCallbacks
    def _repair(self, expected):
        drift = yield self._check(expected)
        if drift.ok:
            return drift
        self._log.warn("firewall drift, repairing: {drift}", drift=drift.describe())
        if drift.missing_chain_rules or drift.set_missing:
            try:
                yield self._install()
            except FirewallError as e:
                raise FirewallError("cannot repair firewall: %s" % e, operation="repair", drift=drift)
        failures = []
        for ip in sorted(drift.missing_members):
            try:
                self.add_member(ip)
            except FirewallError as e:
                failures.append(str(e))
        for ip in sorted(drift.extra_members):
            try:
                self.remove_member(ip)
            except FirewallError as e:
                failures.append(str(e))
        if failures:
            raise FirewallError("cannot repair firewall: %s" % "; ".join(failures), operation="repair", drift=drift)
        return drift
