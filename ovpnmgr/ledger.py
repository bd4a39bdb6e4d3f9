# -*- test-case-name: tests.unit.test_ledger -*-
"""Who holds which VPN address: the address, the kernel set member and the proxy mapping, as one.

A client may only be answered ``client-auth`` once all three are in place, and
nothing of a client that left may outlive it. Before this module the four records
(the session's address, the pool, the mapping owner and the kernel set) were kept in
step by hand in several places; now only the ledger changes them, each change is a
transaction (all or nothing), and :meth:`Ledger.problems` states the invariant that
the fault-cycle suite checks after every step.

The ledger knows nothing of OpenVPN: callers pass sessions (anything with ``address``,
``user``, ``took_from``, ``ended``, ``route()`` and ``log_fields``) and learn which
ones it could not restore, and decide themselves what to tell OpenVPN.
"""

from dataclasses import replace

from twisted.internet import defer
from twisted.logger import Logger

from ovpnmgr.firewall import FirewallError
from ovpnmgr.ipset import IPSetError
from ovpnmgr.pool import AddressInUse
from ovpnmgr.session import TemporaryFailure


class Ledger:
    """The one owner of the pool, the set members and the mappings of admitted sessions.

    :ivar last_drift: the :class:`~ovpnmgr.firewall.Drift` of the latest :meth:`check` or
        :meth:`repair` (None before the first), for metrics and ``pp rules check``.
    """

    _log = Logger()

    def __init__(self, pool, firewall, mappings):
        """
        :param pool: the :class:`~ovpnmgr.pool.AddressPool` (keyed by session).
        :param firewall: the :class:`~ovpnmgr.firewall.Firewall` (kernel set membership).
        :param mappings: the proxy's :class:`~proxy.mappings.MappingTable`.
        """
        self.pool = pool
        self.firewall = firewall
        self.mappings = mappings
        self.last_drift = None

    # --- transactions -------------------------------------------------------------------------

    def admit(self, session):
        """Give ``session`` (its ``user`` set) an address, its set member and its mapping, or
        nothing: on any failure everything done is undone and the error is raised.

        A static address held by a live session of the *same* user (a duplicate CN
        reconnecting) moves to the new session now; OpenVPN drops the old instance itself,
        and a failed admission gives the address back (:meth:`release`).
        """
        try:
            self._take_address(session)
            self.firewall.add_member(session.address)
            self._log.info(
                "ipset member added {vpn_ip} for cid {cid} user {user}",
                vpn_ip=str(session.address),
                cid=session.cid,
                user=session.user.name,
                event="ipset-add",
            )
            self.mappings.transfer(session.address, session.route(), session)
        except Exception:
            self.release(session)
            raise
        return session.address

    def _take_address(self, session):
        user = session.user
        try:
            session.address = self.pool.allocate(session, static=user.address)
        except AddressInUse as e:
            holder = e.owner
            if getattr(holder, "user", None) is None or holder.user.name != user.name:
                raise TemporaryFailure("static address %s is held by %r" % (user.address, holder))
            self.pool.transfer(user.address, session)
            holder.address = None
            session.took_from = holder
            session.address = user.address

    def adopt(self, session, address):
        """Record that ``session`` already holds ``address`` (rebuilding from OpenVPN's
        ``status 3``); its member and mapping follow at the next :meth:`sync`.
        Raises :class:`~ovpnmgr.pool.AddressInUse` or ValueError."""
        session.address = self.pool.claim(session, address)
        return session.address

    def release(self, session):
        """Let go of what ``session`` holds (idempotent). A session that took a static address
        from a still-live session of the same user gives it back, member and mapping kept."""
        ip = session.address
        if ip is None:
            return
        session.address = None
        if self.pool.owner(ip) is not session:
            return
        holder, session.took_from = session.took_from, None
        if holder is not None and not holder.ended and holder.address is None:
            self.pool.transfer(ip, holder)
            holder.address = ip
            self.mappings.transfer(ip, holder.route(), holder)
            self._log.info(
                "address {vpn_ip} returned to cid {cid} after a failed second admission", vpn_ip=str(ip), cid=holder.cid
            )
            return
        self.mappings.remove(ip, owner=session)
        try:
            self.firewall.remove_member(ip)
        except FirewallError as e:
            self._log.error("could not remove ipset member {vpn_ip}: {error}", vpn_ip=str(ip), error=e)
        self.pool.release(session)

    def update(self, session, user):
        """Put a reloaded ``user`` on a session that keeps its address: its route (device,
        upstream, DNS and destination policy) is rebuilt; a changed upstream closes the
        session's live connections. Returns True when its mapping moved to another device."""
        moved = user.device != session.user.device
        session.user = user
        if session.address is None or self.mappings.owner(session.address) is not session:
            return False
        self.mappings.transfer(session.address, session.route(), session)
        return moved

    # --- reconciliation -----------------------------------------------------------------------

    def sync(self, sessions):
        """Make the pool, the mappings and the kernel set hold exactly what ``sessions`` (every
        live session) hold: mappings restored, missing members added, stale ones removed,
        addresses and mappings of nobody released.

        :returns: the sessions whose rules could not be restored; they have been released and
            the caller must end them and have OpenVPN drop them.
        """
        sessions = [s for s in sessions if s.address is not None]
        failed = []
        for session in sessions:
            try:
                self.mappings.transfer(session.address, session.route(), session)
            except Exception as e:
                self._log.error("cid {cid}: could not restore its mapping: {error}", cid=session.cid, error=e)
                failed.append(session)
        report = self.firewall.sync_members({s.address for s in sessions if s not in failed})
        self._log_sync(report, "reconcile")
        broken = {ip for ip, _ in report.failed}
        failed += [s for s in sessions if s.address in broken and s not in failed]
        for session in failed:
            self.release(session)
        owned = {s.address for s in sessions if s.address is not None}
        for ip, holder in list(self.pool.in_use().items()):
            if ip not in owned:
                self.pool.release(holder)
        for ip in self.mappings.addresses() - owned:
            self.mappings.remove(ip)
        return failed

    def _log_sync(self, report, why):
        if report.unreadable is not None:
            self._log.error("could not list ipset members ({why}): {error}", why=why, error=report.unreadable)
            return
        for ip in report.added:
            self._log.info("re-added missing ipset member {vpn_ip}", vpn_ip=str(ip), event="drift")
        for ip in report.removed:
            self._log.info("removing stale ipset member {vpn_ip}", vpn_ip=str(ip), event="stale-member")
        for ip, error in report.failed:
            self._log.error("could not fix ipset member {vpn_ip}: {error}", vpn_ip=str(ip), error=error)

    # --- the kernel, checked and repaired -----------------------------------------------------

    def expected_members(self):
        """The addresses that must be in the kernel set: every address the ledger gave out."""
        return set(self.pool.in_use())

    def holder(self, ip):
        """The session holding ``ip``, or None."""
        return self.pool.owner(ip)

    def check(self):
        """Compare the kernel with what the ledger holds; fires the Drift (kept as :attr:`last_drift`).
        Members are compared at one instant, after the asynchronous rule listings."""

        def remember(drift):
            self.last_drift = drift
            return drift

        return self.firewall.check(self.expected_members).addCallback(remember)

    @defer.inlineCallbacks
    def repair(self, drift):
        """Fix ``drift``, fail-closed: chains and set re-installed if any of them was wrong, then the
        members made what the ledger holds now. Fires ``(reinstalled, MemberSync)`` and updates
        :attr:`last_drift`; fails with FirewallError if the re-install failed."""
        reinstalled = drift.missing_chain_rules or drift.set_missing
        if reinstalled:
            yield self.firewall.install()
        report = self.firewall.sync_members(self.expected_members())
        fixed = replace(drift, missing_chain_rules=False, rule_problems=(), set_missing=False)
        self.last_drift = self._fresh(fixed)
        return reinstalled, report

    def _fresh(self, drift):
        try:
            missing, extra = self.firewall.member_diff(self.expected_members())
        except IPSetError:
            return drift
        return replace(drift, missing_members=missing, extra_members=extra)

    # --- the invariant ------------------------------------------------------------------------

    def problems(self, sessions, kernel=True):
        """Everything that breaks the invariant for the live ``sessions``: each address held by
        exactly one live session, which the pool, the mapping owner and (with ``kernel``) the set
        all agree on, and nothing held for anyone else. An empty list when all is well."""
        found = []
        holders = {s.address: s for s in sessions if s.address is not None}
        if len(holders) != sum(1 for s in sessions if s.address is not None):
            found.append("two live sessions claim one address")
        pool = self.pool.in_use()
        if set(pool) != set(holders):
            found.append("pool %s != sessions %s" % (sorted(map(str, pool)), sorted(map(str, holders))))
        for ip, session in holders.items():
            if session.ended:
                found.append("%s: held by an ended session %r" % (ip, session))
            if pool.get(ip) is not session:
                found.append("%s: pool holder %r is not %r" % (ip, pool.get(ip), session))
            if self.mappings.owner(ip) is not session:
                found.append("%s: mapping owner %r is not %r" % (ip, self.mappings.owner(ip), session))
            elif self.mappings.lookup(ip) != session.user.device.upstream:
                found.append("%s: mapped to %s, device is %s" % (ip, self.mappings.lookup(ip), session.user.device.upstream))
        stray = self.mappings.addresses() - set(holders)
        if stray:
            found.append("mappings of nobody: %s" % sorted(map(str, stray)))
        if kernel:
            members = set(self.firewall.members())
            if members != set(holders):
                found.append("kernel set %s != sessions %s" % (sorted(map(str, members)), sorted(map(str, holders))))
        return found
