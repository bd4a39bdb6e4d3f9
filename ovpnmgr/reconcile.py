# -*- test-case-name: tests.unit.test_controller -*-
"""Rebuilding every session from OpenVPN's ``status 3`` after each (re)connect.

OpenVPN is the source of truth; there is no state file. Established rows are kept
(or rebuilt after our own restart) when the user still exists and the address is
ours to give; pending rows are re-approved if we know their KID, else killed so
the client retries at once. Then the ledger makes the pool, the mappings and the
kernel set hold exactly what the surviving sessions hold.
"""

import ipaddress

from twisted.logger import Logger

from ovpnmgr.pool import AddressInUse
from ovpnmgr.session import Session, State


class Reconciler:
    """The reconciliation half of the :class:`~ovpnmgr.controller.Controller`."""

    _log = Logger()

    def __init__(self, controller):
        self.c = controller

    def reconcile(self, status):
        """Make sessions, pool, ipset and mappings match ``status`` (a parsed ``status 3``)."""
        c = self.c
        previous = {s.cid: s for s in c.sessions.values()}
        rows = {row.cid: row for row in status.clients}
        # Vanished sessions are released first, while the instances they may give a static
        # address back to (Session.took_from) are still live.
        for cid, session in previous.items():
            row = rows.get(cid)
            if row is None or row.real_address.split(":")[-2:] != session.real_address.split(":")[-2:]:
                session.state = State.ENDED
                c.ledger.release(session)
        c.sessions = {}
        approve = set()
        for row in status.clients:
            session = previous.get(row.cid)
            if session is not None and session.ended:
                session = None
            if row.pending:
                approve.update(self._pending(row, session))
            else:
                self._established(row, session)
        for session in c.ledger.sync(list(c.sessions.values())):
            self._log.error("cid {cid}: could not restore its rules; killing it", cid=session.cid)
            c.end(session)
            c.kill(session.cid, "rules")
        for session in list(c.sessions.values()):
            if session in approve and not session.ended:
                c.admission.authorize(session)  # its rules are back in place: answer again
            elif session.pending_reauth is not None and session.state is State.ESTABLISHED:
                # Its answer never went out (or was lost with the connection): OpenVPN still
                # waits for it and would drop the client at hand-window.
                c.admission.on_reauth(session.pending_reauth)
        self._log.info(
            "reconciled with OpenVPN: {n} clients ({pending} pending), {members} ipset members",
            n=len(c.sessions),
            pending=sum(1 for s in c.sessions.values() if s.state is not State.ESTABLISHED),
            members=len(c.ledger.expected_members()),
            event="reconciled",
        )

    def _pending(self, row, session):
        """Keep a pending row's session; returns ``[session]`` when it is to be answered again."""
        c = self.c
        if session is None:
            self._log.info("pending cid {cid} has no known key id; killing it so it retries now", cid=row.cid)
            c.kill(row.cid, "unknown pending client")
            return []
        c.adopt(session)
        if session.state in (State.AUTHORIZING, State.AUTHORIZED):
            if session.address is None:
                # Its address moved to a newer instance of the user while the answer was lost.
                # Never push "ifconfig-push None": OpenVPN ignores a bad line and admits anyway.
                self._log.info("pending cid {cid} lost its address to a newer session; killing it", cid=row.cid)
                c.end(session)
                c.kill(row.cid, "address taken by a newer session")
                return []
            return [session]
        return []

    def _established(self, row, session):
        c = self.c
        try:
            address = ipaddress.IPv4Address(row.virtual_address)
        except ValueError:
            address = None
        if session is not None and session.address == address and session.user is not None:
            session.state = State.ESTABLISHED
            c.adopt(session)
            return
        if session is not None:
            session.state = State.ENDED
            c.ledger.release(session)
        user = c.directory.find(row.username, row.common_name)
        if user is None or address is None:
            self._log.warn("established cid {cid} ({who}) is not a known user; killing it", cid=row.cid, who=row.username)
            c.kill(row.cid, "unknown user")
            return
        env = {"username": row.username, "common_name": row.common_name}
        host, _, port = row.real_address.rpartition(":")
        env["untrusted_ip"], env["untrusted_port"] = host, port
        session = Session(c.epoch, row.cid, None, env, c.clock.seconds())
        session.user = user
        session.state = State.ESTABLISHED
        session.connected_since = row.connected_since
        try:
            c.ledger.adopt(session, address)
        except (AddressInUse, ValueError) as e:
            self._log.error("established cid {cid}: {error}; killing it", cid=row.cid, error=e)
            c.kill(row.cid, "address conflict")
            return
        c.sessions[session.key] = session
