# -*- test-case-name: tests.unit.test_firewall -*-
"""Applying pocketproxy's kernel rules (:mod:`ovpnmgr.rules`) and its ipset members.

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
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger

from ovpnmgr.ipset import IPSetError
from ovpnmgr.process import CommandError
from ovpnmgr.rules import FAMILIES, IP4, IP6, Devices, input_chain, restore_input, rule_problems, tables, underlay_chain


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
