# -*- test-case-name: tests.unit.test_verify -*-
"""Periodic firewall verification: find kernel drift without waiting for an operator.

Someone flushing the ipset or the chain behind pocketproxy's back must not go
unnoticed until the next ``pp rules check``: every ``firewall.verify_interval``
seconds the kernel is compared with the controller's admitted clients, the
drift gauges are updated and any drift is logged at warn level.

With ``firewall.repair`` (the default) drift is also fixed, fail-closed style:
chains or a missing set are re-installed, missing members of admitted clients
are re-added and members that belong to no client are removed. Each repair is
logged and counted (``firewall_repairs_total{action}``).

Members are compared from one synchronous netlink read against the
ledger's view at the same instant, never against a snapshot taken before
the (asynchronous) ``iptables -S`` listing: an admission or a disconnect while
the listing runs must not look like drift, let alone be "repaired". The
ledger does the check and the repair; this service only paces, logs and counts.
"""

from collections import Counter

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger

from ovpnmgr.firewall import FirewallError

REPAIR_ACTIONS = ("rules_reinstalled", "member_added", "member_removed")


class FirewallVerifier(service.Service):
    """Checks (and optionally repairs) the kernel state every ``interval`` seconds.

    :ivar repairs: a Counter of repairs done, by action (:data:`REPAIR_ACTIONS`).
    :ivar checks: how many checks have completed.
    """

    _log = Logger()

    def __init__(self, clock, operations, interval, repair=True):
        """
        :param clock: an ``IReactorTime`` driving the loop.
        :param operations: the :class:`~ovpnmgr.operations.Operations` (its
            ``check_rules()``, ``repair_rules()``, ``holder()`` and ``reconciled``).
        :param interval: seconds between checks (> 0).
        :param repair: fix drift as well as report it.
        """
        self.clock = clock
        self.operations = operations
        self.interval = interval
        self.repair = repair
        self.repairs = Counter()
        self.checks = 0
        self._loop = None

    def startService(self):
        """``IService.startService``: first check one interval from now."""
        super().startService()
        self._loop = task.LoopingCall(self.verify)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: self._log.failure("firewall verification loop stopped", f)
        )

    def stopService(self):
        """``IService.stopService``."""
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        return super().stopService()

    def verify(self):
        """One check (and repair); never fails. Skipped until the controller has reconciled once:
        before that its view is empty and every member of a surviving client would look extra.

        The LoopingCall waits for the returned Deferred, so a slow ``iptables`` never stacks checks.
        """
        if not self.operations.reconciled:
            return None
        d = self.operations.check_rules()
        d.addCallback(self._checked)
        d.addErrback(self._failed)
        return d

    def _failed(self, failure):
        if failure.check(FirewallError):
            self._log.error("periodic firewall check failed: {error}", error=str(failure.value), event="verify-failed")
        else:
            self._log.failure("periodic firewall check failed", failure, event="verify-failed")

    def _checked(self, drift):
        self.checks += 1
        if drift.ok:
            return drift
        self._log.warn(
            "firewall drift: {summary}",
            summary=drift.describe(),
            missing=sorted(str(ip) for ip in drift.missing_members),
            extra=sorted(str(ip) for ip in drift.extra_members),
            rule_problems=list(drift.rule_problems),
            set_missing=drift.set_missing,
            event="drift",
        )
        if not self.repair:
            return drift
        return self._repair(drift)

    def _repair(self, drift):
        return self.operations.repair_rules(drift).addCallback(self._report, drift)

    def _report(self, result, drift):
        reinstalled, sync = result
        if reinstalled:
            self._repaired("rules_reinstalled", "reinstalled chains and ipset: {summary}", summary=drift.describe())
        if sync.unreadable is not None:
            self._log.error("could not list ipset members to repair them: {error}", error=sync.unreadable)
        for ip in sync.added:
            fields = self._owner_fields(ip)
            self._repaired("member_added", "re-added missing ipset member {vpn_ip} of user {user}", vpn_ip=str(ip), **fields)
        for ip in sync.removed:
            self._repaired("member_removed", "removed ipset member {vpn_ip}: no admitted client has it", vpn_ip=str(ip))
        for ip, error in sync.failed:
            self._log.error("could not repair ipset member {vpn_ip}: {error}", vpn_ip=str(ip), error=error)
        return self.operations.last_drift

    def _owner_fields(self, ip):
        session = self.operations.holder(ip)
        if session is None:
            return {"user": None}
        fields = dict(session.log_fields)
        fields.pop("vpn_ip", None)
        return fields

    def _repaired(self, action, message, **fields):
        self.repairs[action] += 1
        self._log.warn(message, action=action, event="drift-repaired", **fields)
