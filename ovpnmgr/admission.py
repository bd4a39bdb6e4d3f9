# -*- test-case-name: tests.unit.test_controller -*-
"""Answering OpenVPN about one client: CONNECT, REAUTH, ESTABLISHED, DISCONNECT.

A client is answered ``client-auth`` only after the ledger holds its address, its
kernel set member and its proxy mapping; any failure rolls back what was done and
answers ``client-deny`` (TEMP for what may pass, plain for bad credentials). This
module builds every deny reason; the ledger does every change of what a session holds.
"""

import ipaddress

from twisted.logger import Logger

from ovpnmgr import tunnel
from ovpnmgr.directory import AuthFailed
from ovpnmgr.firewall import FirewallError
from ovpnmgr.pool import PoolExhausted
from ovpnmgr.protocol import CommandFailed, ManagementError
from ovpnmgr.session import Session, State, TemporaryFailure, client_reason


def _env_int(env, key, default):
    value = env.get(key, "")
    return int(value) if value.isdigit() else default


class Admission:
    """The per-client half of the :class:`~ovpnmgr.controller.Controller` (its events and answers)."""

    _log = Logger()

    def __init__(self, controller):
        self.c = controller

    # --- CONNECT ---

    def on_connect(self, ev):
        c = self.c
        c.check_daemon(ev.env)
        old = c.session(ev.cid)
        if old is not None:
            self._log.warn("CONNECT for cid {cid} that already has a session; replacing it", cid=ev.cid)
            c.end(old)
        session = Session(c.epoch, ev.cid, ev.kid, ev.env, c.clock.seconds())
        c.sessions[session.key] = session
        if c.draining:
            self.deny(session, "draining: new admissions paused", temporary=True)
            return
        d = c.directory.authenticate(session.username, ev.env.get("password", ""), session.common_name, c.run_blocking)
        d.addCallbacks(self._admit, self._refuse, callbackArgs=(session,), errbackArgs=(session,))
        d.addErrback(c.log_unexpected, "admission", session)

    def _admit(self, user, session):
        if session.ended:
            return
        session.user = user
        if not self.c.device_alive(user.device.name):
            self.deny(session, "device %s is down" % user.device.name, temporary=True, shown="device offline")
            return
        try:
            self.c.ledger.admit(session)
        except (TemporaryFailure, PoolExhausted, FirewallError) as e:
            self.deny(session, str(e), temporary=True)
            return
        except Exception as e:
            # A bug must still leave nothing behind (the ledger undid its part) and let the client retry.
            self._log.failure("admission of cid {cid} failed unexpectedly", cid=session.cid)
            self.deny(session, "internal error: %s" % type(e).__name__, temporary=True)
            return
        self.authorize(session)

    def authorize(self, session):
        """Send ``client-auth`` for a session whose address, member and mapping are in place."""
        c = self.c
        if session.address is None:  # a caller's bug; refusing keeps it from admitting a client without a tunnel address
            raise ValueError("cid %d has no address to push" % session.cid)
        options = tunnel.pushed_options(c.tunnel_mode(session.user), c.config.push, session.peer)
        lines = tunnel.client_auth_lines(session.address, c.config.netmask, options)
        session.state = State.AUTHORIZING
        protocol = c.protocol
        if protocol is None:
            self._log.warn("cid {cid}: management connection down; approval waits for reconciliation", cid=session.cid)
            return
        self._log.info(
            "client-auth sent for cid {cid} kid {kid} user {user} vpn_ip {vpn_ip}",
            cid=session.cid,
            kid=session.kid,
            user=session.user.name,
            vpn_ip=str(session.address),
            event="client-auth",
        )
        d = protocol.client_auth(session.cid, session.kid, lines)
        latency = (c.clock.seconds() - session.started) * 1000.0
        d.addCallbacks(self._authorized, self._authorize_failed, callbackArgs=(session, latency), errbackArgs=(session,))
        d.addErrback(c.log_unexpected, "client-auth", session)

    def _authorized(self, _, session, latency):
        if session.state is State.AUTHORIZING:
            session.state = State.AUTHORIZED
        if not session.admission_counted:
            session.admission_counted = True
            self.c.admissions["admitted"] += 1
            self.c.admission_latency.observe(latency / 1000.0)
            self.c.recent_admissions.append(
                {"time": self.c.clock.seconds(), "user": session.user.name, "cid": session.cid, "result": "admitted",
                 "reason": None, "device": session.user.device.name}
            )
        self._log.info(
            "admitted user {user} cid {cid} vpn_ip {vpn_ip} device {device} in {latency_ms:.2f} ms",
            user=session.user.name,
            cid=session.cid,
            vpn_ip=str(session.address),
            device=session.user.device.name,
            latency_ms=latency,
            event="admitted",
        )

    def _authorize_failed(self, failure, session):
        if failure.check(CommandFailed):
            # No such CID/KID any more: the client left while we worked.
            self._log.info("client-auth refused for cid {cid} ({reason}); rolling back", cid=session.cid, reason=failure.value)
            self.c.end(session)
            return
        failure.trap(ManagementError)
        self._log.warn(
            "client-auth for cid {cid} unconfirmed ({reason}); reconciliation decides", cid=session.cid, reason=failure.value
        )

    def _refuse(self, failure, session):
        if session.ended:
            return
        if failure.check(AuthFailed):
            self.deny(session, str(failure.value), temporary=False)
        else:
            self._log.failure("authentication error for cid {cid}", failure, cid=session.cid)
            self.deny(session, "directory error", temporary=True)

    def deny(self, session, reason, temporary, shown=None):
        """Answer ``client-deny``, end the session (its header-only DISCONNECT follows).

        :param shown: what a TEMP-denied customer is told (:func:`~ovpnmgr.session.client_reason`).
        """
        c = self.c
        c.end(session)
        c.admissions["denied_temporary" if temporary else "denied_final"] += 1
        c.recent_admissions.append(
            {"time": c.clock.seconds(), "user": session.name, "cid": session.cid,
             "result": "denied_temporary" if temporary else "denied_final", "reason": reason,
             "device": session.user.device.name if session.user is not None else None}
        )
        self._log.info(
            "denied cid {cid} user {user}: {reason} ({kind})",
            cid=session.cid,
            user=session.name,
            vpn_ip=None,  # a denied client never keeps an address
            device=session.user.device.name if session.user is not None else None,
            reason=reason,
            kind="temporary" if temporary else "final",
            event="denied",
        )
        if c.protocol is None:
            return
        d = c.protocol.client_deny(session.cid, session.kid, reason[:200], client_reason(temporary, c.config.temp_backoff, shown))
        d.addErrback(c.log_command_error, "client-deny", session)

    # --- established clients ---

    def on_address(self, ev):
        session = self.c.session(ev.cid)
        if session is None or not ev.primary:
            return
        address = ev.address.split("/")[0]
        if ":" in address:
            # An operator's IPv6 pool makes OpenVPN report the client's IPv6 address as its
            # primary one. IPv6 is not carried (the ip6tables chains reject it), so only the
            # IPv4 address we pushed is ours to confirm; killing here would drop every client.
            return
        self._confirm(session, address)

    def on_established(self, ev):
        session = self.c.session(ev.cid)
        if session is None:
            self._log.warn("ESTABLISHED for unknown cid {cid}; killing it so it retries", cid=ev.cid)
            self.c.kill(ev.cid, "unknown session")
            return
        if session.address is not None and ev.env.get("ifconfig_pool_remote_ip"):
            if not self._confirm(session, ev.env["ifconfig_pool_remote_ip"]):
                return
        session.state = State.ESTABLISHED
        session.connected_since = self.c.clock.seconds()

    def _confirm(self, session, address):
        """Check OpenVPN gave the client the address we pushed; ``client-kill`` otherwise."""
        try:
            matches = ipaddress.IPv4Address(address) == session.address
        except ValueError:
            matches = False
        if not matches:
            self._log.error(
                "cid {cid} got address {got} but was pushed {pushed}; killing it",
                cid=session.cid,
                got=address,
                pushed=str(session.address),
            )
            self.c.kill(session.cid, "address mismatch")
        return matches

    # --- REAUTH ---

    def on_reauth(self, ev):
        c = self.c
        session = c.session(ev.cid)
        if session is None or session.user is None:
            self._reauth_deny(ev, "unknown session")
            return
        session.pending_reauth = ev
        d = c.directory.authenticate(
            ev.env.get("username", session.username),
            ev.env.get("password", ""),
            ev.env.get("common_name", session.common_name),
            c.run_blocking,
        )

        def ok(user):
            if c.protocol is None:
                return  # detached: answered when reconciliation re-runs session.pending_reauth
            if user.name != session.user.name or user.device != session.user.device:
                self._reauth_deny(ev, "user changed", session=session)
                return
            self._reauth_answer(c.protocol.client_auth_nt(ev.cid, ev.kid), "client-auth-nt", session, ev)

        def bad(failure):
            if c.protocol is None:
                return  # detached: answered when reconciliation re-runs session.pending_reauth
            if failure.check(AuthFailed):
                self._reauth_deny(ev, str(failure.value), session=session)
                return
            # The user could not be re-checked (a directory error): answer anyway, fail-closed
            # but temporary. An unanswered REAUTH would only end the same way at hand-window,
            # with nothing logged and no retry hint for the client.
            self._log.failure("re-authentication of cid {cid} failed", failure, **session.log_fields)
            reason = "temporary failure: %s" % (failure.getErrorMessage() or failure.type.__name__)
            self._reauth_deny(ev, reason, temporary=True, session=session)

        d.addCallbacks(ok, bad).addErrback(c.log_unexpected, "reauth", session)

    def _reauth_answer(self, d, what, session, ev):
        """Track the answer to a REAUTH: once OpenVPN took it (or refused it: the key is gone) it is
        done; if the management connection went first, ``pending_reauth`` stays for reconciliation."""

        def done(result):
            if session is not None and session.pending_reauth is ev:
                session.pending_reauth = None
            return result

        def failed(failure):
            if failure.check(CommandFailed):
                done(None)
            return failure

        d.addCallbacks(done, failed).addErrback(self.c.log_command_error, what, session)

    def _reauth_deny(self, ev, reason, temporary=False, session=None):
        self._log.info("re-authentication of cid {cid} refused: {reason}", cid=ev.cid, reason=reason, event="reauth-denied")
        c = self.c
        if c.protocol is not None:
            d = c.protocol.client_deny(ev.cid, ev.kid, reason[:200], client_reason(temporary, c.config.temp_backoff))
            self._reauth_answer(d, "client-deny", session, ev)

    # --- leaving ---

    def on_disconnect(self, ev):
        session = self.c.session(ev.cid)
        if session is None:
            return
        self._log.info(
            "disconnected user {user} cid {cid} vpn_ip {vpn_ip}",
            user=session.name,
            cid=session.cid,
            vpn_ip=str(session.address),
            device=session.user.device.name if session.user else None,
            reason="client disconnected",
            bytes_in=_env_int(ev.env, "bytes_received", session.bytes_in),
            bytes_out=_env_int(ev.env, "bytes_sent", session.bytes_out),
            event="disconnected",
        )
        self.c.end(session)

    def on_bytecount(self, ev):
        session = self.c.session(ev.cid)
        if session is not None:
            session.bytes_in, session.bytes_out = ev.bytes_in, ev.bytes_out
