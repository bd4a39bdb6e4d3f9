# -*- test-case-name: tests.unit.test_reload -*-
"""What operators may see and do: the one surface the admin socket, metrics, the periodic
firewall verifier and the reload-on-signal hook use.

Reads (client list, counts, per-client bytes, the users in force) and actions (reload,
kick, drain, rules check and repair, management passthrough) live here, so nothing
outside the controller's modules reaches into its sessions, ledger or mapping table.
"""

from twisted.internet import defer
from twisted.logger import Logger

from ovpnmgr.config import ConfigError
from ovpnmgr.directory import Directory
from ovpnmgr.protocol import ManagementDisconnected
from ovpnmgr.session import State


class Operations:
    """The operators' view of one :class:`~ovpnmgr.controller.Controller`."""

    _log = Logger()

    def __init__(self, controller):
        self.c = controller
        self.ledger = controller.ledger
        self.directory_listeners = []  # f(directory) after a reload put a new users file in force
        self.health = None  # the proxy.health.HealthMonitor when device health is on
        #: the directory's live reader when it is in PostgreSQL (ovpnmgr.pgdirectory.PostgresDirectory):
        #: reload_file() then re-reads the database instead of a file
        self.directory_reader = None
        self.rotator = None  # the ovpnmgr.rotation.Rotator when device health is on

    def device_health(self, name):
        """A device's health snapshot (:meth:`proxy.health.DeviceHealth.snapshot`), or None when
        health is off or the device is not watched (it has no users)."""
        health = self.health.get(name) if self.health is not None else None
        if health is None:
            return None
        snapshot = health.snapshot()
        if self.rotator is not None:
            snapshot["rotation"] = self.rotator.state(name)
        return snapshot

    def rotate(self, name):
        """Rotate device ``name``'s exit address (:meth:`ovpnmgr.rotation.Rotator.rotate`).

        :raises ~ovpnmgr.rotation.RotationRefused: not started, with the operator's reason.
        """
        from ovpnmgr.rotation import RotationRefused

        if self.rotator is None:
            raise RotationRefused("device health is off (health.enabled in the config): rotation needs its probes")
        return self.rotator.rotate(name)

    # --- reads ---

    @property
    def directory(self):
        """The :class:`~ovpnmgr.directory.Directory` in force."""
        return self.c.directory

    @property
    def draining(self):
        return self.c.draining

    @property
    def management_ready(self):
        """True while a logged-in management connection is attached."""
        return self.c.management_ready

    @property
    def reconciled(self):
        """True once sessions were rebuilt from a ``status 3`` (kernel checks wait for it)."""
        return self.c.reconciled

    @property
    def last_drift(self):
        """The latest firewall :class:`~ovpnmgr.firewall.Drift` (None before the first check)."""
        return self.ledger.last_drift

    @property
    def recent_admissions(self):
        """The latest answered CONNECTs (a bounded deque of dicts, oldest first)."""
        return self.c.recent_admissions

    @property
    def admissions(self):
        """Answered CONNECTs by result (a Counter)."""
        return self.c.admissions

    @property
    def admission_latency(self):
        """CONNECT to client-auth latency (a Histogram)."""
        return self.c.admission_latency

    @property
    def management_reconnects(self):
        """Management connections after the first."""
        return self.c.management_reconnects

    def tunnel_mode(self, user):
        """``full`` or ``split``: what ``user``'s clients are pushed."""
        return self.c.tunnel_mode(user)

    def client_list(self):
        """The current sessions (every state), ordered by CID."""
        return sorted(self.c.sessions.values(), key=lambda s: s.cid)

    def sessions_of(self, name):
        """The current sessions of user ``name`` (by directory name, else by the username sent)."""
        return [s for s in self.client_list() if s.name == name]

    def holder(self, ip):
        """The session holding VPN address ``ip``, or None."""
        return self.ledger.holder(ip)

    def client_traffic(self, ip):
        """``(up, down, live connections)`` the proxy has relayed for ``ip``'s current session."""
        mappings = self.ledger.mappings
        up, down = mappings.client_bytes(ip)
        return up, down, mappings.live_count(ip)

    def counts(self):
        """Counters of the admission side, JSON-friendly."""
        sessions = list(self.c.sessions.values())
        established = sum(1 for s in sessions if s.state is State.ESTABLISHED)
        return {
            "clients": len(sessions),
            "established": established,
            "pending": len(sessions) - established,
            "addresses_in_use": len(self.ledger.expected_members()),
            "mappings": len(self.ledger.mappings),
            "draining": self.c.draining,
            "management_connected": self.c.management_ready,
            "epoch": self.c.epoch,
        }

    # --- actions ---

    def set_draining(self, draining):
        """Pause (True) or resume (False) new admissions; paused CONNECTs get a TEMP deny."""
        draining = bool(draining)
        if draining != self.c.draining:
            self._log.info(
                "draining {state}: new admissions {what}",
                state="on" if draining else "off",
                what="are denied temporarily" if draining else "resume",
                event="drain",
            )
        self.c.draining = draining

    def kick(self, name):
        """``client-kill`` every current session of user ``name``.

        :returns: a Deferred firing with ``(killed, errors)``: the number of
            sessions OpenVPN confirmed killed and the error texts of the others.
        :raises ManagementError: when no management connection is attached.
        """
        if not self.c.management_ready:
            raise ManagementDisconnected("OpenVPN management not connected")
        sessions = self.sessions_of(name)
        self._log.info("kicking user {user}: {n} session(s)", user=name, n=len(sessions), event="kick")
        d = defer.DeferredList([self.c.protocol.client_kill(s.cid) for s in sessions], consumeErrors=True)

        def summarize(results):
            errors = [r.getErrorMessage() for ok, r in results if not ok]
            return len(results) - len(errors), errors

        return d.addCallback(summarize)

    def check_rules(self):
        """Compare the kernel (chains, ipset members) with what the ledger holds.

        :returns: a Deferred firing with the :class:`~ovpnmgr.firewall.Drift` (also :attr:`last_drift`).
        """
        return self.ledger.check()

    def repair_rules(self, drift):
        """Fix ``drift`` (see :meth:`~ovpnmgr.ledger.Ledger.repair`)."""
        return self.ledger.repair(drift)

    def management_command(self, line, shape):
        """Send one operator command over the management connection.

        :returns: the Deferred of :meth:`~ovpnmgr.protocol.ManagementProtocol.command`.
        :raises ManagementError: when no management connection is attached.
        :raises InvalidArgument: for a line the protocol refuses to send.
        """
        if not self.c.management_ready:
            raise ManagementDisconnected("OpenVPN management not connected")
        return self.c.protocol.command(line, shape)

    # --- reload ---

    def reload_file(self, path=None):
        """Re-read the users file (default: the one in force) and :meth:`reload` it.

        :raises ~ovpnmgr.config.ConfigError: the new file is invalid (``file: key:
            problem``); nothing changed and the previous directory stays in force.
        """
        if self.directory_reader is not None and path is None:
            return self.directory_reader.read_now()  # a Deferred: the database is read in a thread
        config = self.c.config
        path = self.c.directory.path if path is None else path
        try:
            directory = Directory.load(path, config.subnet, config.server_address)
        except ConfigError as e:
            self._log.error("reload refused: {error}; previous users stay in force", error=str(e), event="reload-refused")
            raise
        return self.reload(directory)

    def reload(self, directory):
        """Put a new :class:`~ovpnmgr.directory.Directory` in force, live.

        * a removed user's sessions are torn down (mapping removed, which aborts
          their proxied connections; ipset member and address released) and
          ``client-kill``-ed;
        * a user whose static address changed (added, removed or moved) is
          kicked the same way, so it reconnects with the new address; a session
          of another user that holds a newly reserved static address is kicked
          too, so the owner can have it;
        * a user whose device (or its upstream URL) changed keeps its session
          and address; its mapping is transferred to the new upstream, which
          aborts its live proxied connections;
        * other changes (password, common name, destination policy) only update the
          session's user and route: the next re-authentication and the next proxied
          connection follow the new file;
        * sessions still authenticating against the old file for a user that
          changed or disappeared get a TEMP deny, so they retry at once against
          the new one;
        * unchanged users are not touched: their live connections keep flowing.

        :returns: ``{"users", "added", "removed", "changed", "kicked", "remapped", "path"}``.
        :raises ~ovpnmgr.config.ConfigError: a static address the pool refuses
            (then nothing changed).
        """
        c = self.c
        old = c.directory
        statics = directory.static_addresses()
        try:
            self.ledger.pool.set_static(statics)  # validates all before replacing: nothing changed on error
        except ValueError as e:
            raise ConfigError(directory.path, "users", str(e))
        added = sorted(set(directory.users) - set(old.users))
        removed = sorted(set(old.users) - set(directory.users))
        changed = sorted(n for n in set(old.users) & set(directory.users) if old.users[n] != directory.users[n])
        kicked = remapped = 0
        for session in list(c.sessions.values()):
            if session.user is None:
                if old.find(session.username, session.common_name) != directory.find(session.username, session.common_name):
                    c.admission.deny(session, "users file reloaded during authentication", temporary=True)
                continue
            new = directory.users.get(session.user.name)
            why = self._kick_reason(session, new, statics)
            if why is None:
                if new != session.user and self.ledger.update(session, new):
                    remapped += 1
                    self._log.info(
                        "remapped user {user} cid {cid} vpn_ip {vpn_ip} to device {device}",
                        user=new.name,
                        cid=session.cid,
                        vpn_ip=str(session.address),
                        device=new.device.name,
                        event="remapped",
                    )
                continue
            self._log.info(
                "reload: kicking user {user} cid {cid} vpn_ip {vpn_ip}: {reason}",
                user=session.user.name,
                cid=session.cid,
                vpn_ip=str(session.address),
                reason=why,
                event="reload-kick",
            )
            c.end(session)
            c.kill(session.cid, why)
            kicked += 1
        c.directory = directory
        for listener in self.directory_listeners:
            listener(directory)
        c.warn_split_tunnels()
        summary = {
            "path": directory.path,
            "users": len(directory.users),
            "added": len(added),
            "removed": len(removed),
            "changed": len(changed),
            "kicked": kicked,
            "remapped": remapped,
        }
        self._log.info(
            "reloaded users file {path}: {users} users (added {added}, removed {removed}, changed {changed}, "
            "kicked {kicked}, remapped {remapped})",
            event="reloaded",
            **summary,
        )
        return summary

    def _kick_reason(self, session, new, statics):
        """Why a reload must drop ``session`` (its user's entry is now ``new``), or None."""
        if new is None:
            return "user removed"
        if new.address != session.user.address:
            return "static address changed"
        if self.c.tunnel_mode(new) != self.c.tunnel_mode(session.user):
            return "tunnel changed to %s" % self.c.tunnel_mode(new)  # pushed options apply only at connect
        if session.address is not None and session.address in statics and session.address != new.address:
            return "address %s now reserved for another user" % session.address
        return None
