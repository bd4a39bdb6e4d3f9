# -*- test-case-name: tests.unit.test_controller -*-
"""Per-client lifecycle: the admission transaction, teardown, and reconciliation.

The product's promise lives here: a client is answered ``client-auth`` only
after its address is held, its ipset member is in the kernel and its proxy
mapping is in the table; any failure rolls back what was done and answers
``client-deny`` (TEMP for what may pass, plain for bad credentials).

Sessions are keyed by (epoch, CID) because OpenVPN restarts CIDs at 0 after a
SIGHUP/SIGUSR1 while the socket stays up. The pool, the mapping table and the
kernel set are owned by the :class:`Session` object itself, so a late
DISCONNECT of an old CID can never release what a newer session holds.

After every (re)connect of the management socket the controller reads
``status 3`` and makes its state, the kernel set and the mappings match
OpenVPN's view (OpenVPN is the source of truth; there is no state file).
"""

import ipaddress
from collections import Counter

from twisted.internet import defer
from twisted.logger import Logger

from ovpnmgr import events, tunnel
from ovpnmgr.config import ConfigError
from ovpnmgr.directory import AuthFailed
from ovpnmgr.firewall import FirewallError
from ovpnmgr.metrics import LATENCY_BUCKETS, Histogram
from ovpnmgr.pool import AddressInUse, PoolExhausted
from ovpnmgr.protocol import CommandFailed, ManagementDisconnected, ManagementError
from ovpnmgr.verify import fresh_members
from proxy.destinations import DEFAULT_CLIENT, ClientPolicy
from proxy.mappings import MappingConflict

AUTHENTICATING = "authenticating"
AUTHORIZING = "authorizing"  # client-auth sent, no reply yet
AUTHORIZED = "authorized"  # client-auth SUCCESS
ESTABLISHED = "established"


def _env_int(env, key, default):
    value = env.get(key, "")
    return int(value) if value.isdigit() else default


class TemporaryFailure(Exception):
    """An admission step failed in a way that may pass; the client is told to retry."""


class Session:
    """One OpenVPN client instance (one CID in one epoch) and what it holds."""

    def __init__(self, epoch, cid, kid, env, started):
        self.epoch = epoch
        self.cid = cid
        self.kid = kid
        self.username = env.get("username", "")
        self.common_name = env.get("common_name", "")
        self.real_address = "%s:%s" % (env.get("untrusted_ip", ""), env.get("untrusted_port", ""))
        self.peer = tunnel.Peer.from_env(env)  # what to push depends on the client's version and platform
        self.started = started
        self.state = AUTHENTICATING
        self.user = None
        self.address = None
        self.connected_since = None
        self.cancelled = False
        self.admission_counted = False  # metrics: count client-auth SUCCESS once per session
        self.took_from = None  # the live session of the same user whose static address this one took
        self.pending_reauth = None  # a REAUTH event not yet answered (re-run after a management reconnect)
        self.bytes_in = None  # tunnel bytes from the client (OpenVPN's >BYTECOUNT_CLI), None until reported
        self.bytes_out = None  # tunnel bytes to the client

    @property
    def key(self):
        return (self.epoch, self.cid)

    @property
    def name(self):
        """Who this is, the one way logs and tables name it: the users-file name once known,
        else the username sent, else the certificate CN (a certificate-only client)."""
        return self.user.name if self.user is not None else (self.username or self.common_name)

    @property
    def log_fields(self):
        """Who this is, as structured log fields (the proxy adds them to its events for this client)."""
        return {
            "user": self.name,
            "cid": self.cid,
            "vpn_ip": str(self.address) if self.address is not None else None,
            "device": self.user.device.name if self.user is not None else None,
        }

    @property
    def proxy_policy(self):
        """What the proxy lets this client reach, and its phone's capacity (read per connection,
        so a reload that changes the user or the device applies to the next connection)."""
        if self.user is None:
            return DEFAULT_CLIENT
        return ClientPolicy(
            allow_private=self.user.private_networks == "allow", device_limit=self.user.device.max_clients
        )

    def __repr__(self):
        return "<Session epoch=%d cid=%d user=%s ip=%s %s>" % (
            self.epoch,
            self.cid,
            self.name,
            self.address,
            self.state,
        )


class Controller:
    """Answers OpenVPN's admission questions and keeps kernel and proxy state in step."""

    _log = Logger()

    def __init__(self, clock, config, directory, pool, firewall, mappings, run_blocking=None):
        """
        :param clock: an ``IReactorTime``; all timing comes from it.
        :param config: the :class:`~ovpnmgr.config.OpenVPNConfig`.
        :param directory: the :class:`~ovpnmgr.directory.Directory` in force.
        :param pool: the :class:`~ovpnmgr.pool.AddressPool`.
        :param firewall: a :class:`~ovpnmgr.firewall.Firewall` (kernel set membership).
        :param mappings: the proxy's :class:`~proxy.mappings.MappingTable`.
        :param run_blocking: ``f(callable, *args) -> Deferred`` for scrypt off the reactor thread.
        """
        self.clock = clock
        self.config = config
        self.directory = directory
        self.directory_listeners = []  # f(directory) after a reload put a new users file in force
        self.pool = pool
        self.firewall = firewall
        self.mappings = mappings
        self.run_blocking = run_blocking
        self.epoch = 0
        self.sessions = {}
        self.protocol = None
        self.draining = False
        self._daemon_start_time = None
        # Metrics (read by ovpnmgr.metrics at scrape time): answered CONNECTs by
        # result, CONNECT-to-client-auth latency, management connections after the first.
        self.admissions = Counter()
        self.admission_latency = Histogram(LATENCY_BUCKETS)
        self.management_reconnects = 0
        self._attaches = 0
        self.last_drift = None
        self.reconciled = False  # True once sessions were rebuilt from a status 3 (kernel checks wait for it)
        self._handlers = {
            events.ClientConnect: self._on_connect,
            events.ClientReauth: self._on_reauth,
            events.ClientEstablished: self._on_established,
            events.ClientDisconnect: self._on_disconnect,
            events.ClientAddress: self._on_address,
            events.Hold: self._on_hold,
            events.State: self._on_state,
            events.Fatal: self._on_fatal,
            events.ByteCountClient: self._on_bytecount,
        }

    def warn_split_tunnels(self):
        """Say loudly who does not get the full tunnel (at start and after every reload)."""
        for line in tunnel.split_tunnel_warnings(self.config.tunnel, self.directory.users.values()):
            self._log.warn("{warning}", warning=line, event="split-tunnel")

    def tunnel_mode(self, user):
        """``full`` or ``split``: what ``user``'s clients are pushed (see :mod:`ovpnmgr.tunnel`)."""
        return tunnel.effective_mode(self.config.tunnel, user.tunnel)

    # --- management connection lifecycle ---

    def attach(self, protocol):
        """Take over a fresh management connection: new epoch, then reconcile with ``status 3``.

        Suitable as ``ClientService(prepareConnection=...)``: the Deferred fails
        if login or reconciliation fails, which makes the service retry.
        """
        self.epoch += 1
        if self._attaches:
            self.management_reconnects += 1
        self._attaches += 1
        self.protocol = protocol
        protocol.set_notify(self.notify)  # works through ClientService's protocol proxy too
        protocol.when_disconnected().addBoth(self._detached, protocol)
        d = protocol.when_ready()
        d.addCallback(lambda _: protocol.state_on())
        d.addCallback(lambda _: protocol.status3())
        d.addCallback(self.reconcile)
        d.addCallback(lambda _: self._enable_bytecount(protocol))
        d.addCallback(lambda _: protocol)
        d.addErrback(self._attach_failed, protocol)
        return d

    def _enable_bytecount(self, protocol):
        """Ask for per-client byte counts (``pp clients``); a refusal is logged, not fatal."""
        interval = self.config.bytecount_interval
        if not interval:
            return None

        def refused(failure):
            failure.trap(CommandFailed)
            self._log.warn("OpenVPN refused bytecount {interval}: {reason}", interval=interval, reason=failure.value)

        return protocol.bytecount(interval).addErrback(refused)

    def _attach_failed(self, failure, protocol):
        self._log.error("management handshake failed: {why}", why=failure.getErrorMessage() or failure.type.__name__)
        if protocol.transport is not None:
            protocol.transport.loseConnection()
        return failure

    def _detached(self, reason, protocol):
        if self.protocol is protocol:
            self.protocol = None
            self._log.warn("management connection lost; established clients keep their rules until reconciled")

    def notify(self, event):
        """Route one management notification (the protocol's ``notify`` hook)."""
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(event)

    # --- admission ---

    def _on_connect(self, ev):
        self._check_daemon(ev.env)
        key = (self.epoch, ev.cid)
        old = self.sessions.get(key)
        if old is not None:
            self._log.warn("CONNECT for cid {cid} that already has a session; replacing it", cid=ev.cid)
            self._end(old)
        session = Session(self.epoch, ev.cid, ev.kid, ev.env, self.clock.seconds())
        self.sessions[key] = session
        if self.draining:
            self._deny(session, "draining: new admissions paused", temporary=True)
            return
        d = self.directory.authenticate(
            session.username, ev.env.get("password", ""), session.common_name, self.run_blocking
        )
        d.addCallbacks(self._admit, self._refuse, callbackArgs=(session,), errbackArgs=(session,))
        d.addErrback(self._log_unexpected, "admission", session)

    def _admit(self, user, session):
        if session.cancelled:
            return
        session.user = user
        try:
            session.address = self._take_address(session, user)
            self.firewall.add_member(session.address)
            self._log.info(
                "ipset member added {vpn_ip} for cid {cid} user {user}",
                vpn_ip=str(session.address),
                cid=session.cid,
                user=user.name,
                event="ipset-add",
            )
            self.mappings.transfer(session.address, user.device.upstream, session)
        except (TemporaryFailure, PoolExhausted, FirewallError, MappingConflict) as e:
            self._rollback(session)
            self._deny(session, str(e), temporary=True)
            return
        except Exception as e:
            # A bug must still leave nothing behind and let the client retry.
            self._log.failure("admission of cid {cid} failed unexpectedly", cid=session.cid)
            self._rollback(session)
            self._deny(session, "internal error: %s" % type(e).__name__, temporary=True)
            return
        self._authorize(session)

    def _take_address(self, session, user):
        try:
            return self.pool.allocate(session, static=user.address)
        except AddressInUse as e:
            holder = e.owner
            if isinstance(holder, Session) and holder.user is not None and holder.user.name == user.name:
                # The same user reconnecting (duplicate CN): OpenVPN drops the old
                # instance itself; the address moves now, the old DISCONNECT comes later.
                self.pool.transfer(user.address, session)
                holder.address = None
                session.took_from = holder  # a failed admission gives it back (see _rollback)
                return user.address
            raise TemporaryFailure("static address %s is held by %r" % (user.address, holder))

    def _authorize(self, session):
        if session.address is None:  # a caller's bug; refusing keeps it from admitting a client without a tunnel address
            raise ValueError("cid %d has no address to push" % session.cid)
        options = tunnel.pushed_options(self.tunnel_mode(session.user), self.config.push, session.peer)
        lines = tunnel.client_auth_lines(session.address, self.config.netmask, options)
        session.state = AUTHORIZING
        protocol = self.protocol
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
        latency = (self.clock.seconds() - session.started) * 1000.0
        d.addCallbacks(self._authorized, self._authorize_failed, callbackArgs=(session, latency), errbackArgs=(session,))
        d.addErrback(self._log_unexpected, "client-auth", session)

    def _authorized(self, _, session, latency):
        if session.state == AUTHORIZING:
            session.state = AUTHORIZED
        if not session.admission_counted:
            session.admission_counted = True
            self.admissions["admitted"] += 1
            self.admission_latency.observe(latency / 1000.0)
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
            self._end(session)
            return
        failure.trap(ManagementError)
        self._log.warn(
            "client-auth for cid {cid} unconfirmed ({reason}); reconciliation decides", cid=session.cid, reason=failure.value
        )

    def _refuse(self, failure, session):
        if session.cancelled:
            return
        if failure.check(AuthFailed):
            self._deny(session, str(failure.value), temporary=False)
        else:
            self._log.failure("authentication error for cid {cid}", failure, cid=session.cid)
            self._deny(session, "directory error", temporary=True)

    def _deny(self, session, reason, temporary):
        """Answer ``client-deny`` and forget the session (its header-only DISCONNECT follows)."""
        self.sessions.pop(session.key, None)
        session.cancelled = True
        self.admissions["denied_temporary" if temporary else "denied_final"] += 1
        if temporary:
            client_reason = "TEMP[backoff %d,advance no]: temporary failure, retrying" % self.config.temp_backoff
        else:
            client_reason = "authentication failed"
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
        if self.protocol is None:
            return
        d = self.protocol.client_deny(session.cid, session.kid, reason[:200], client_reason)
        d.addErrback(self._log_command_error, "client-deny", session)

    # --- established clients ---

    def _on_address(self, ev):
        session = self.sessions.get((self.epoch, ev.cid))
        if session is None or not ev.primary:
            return
        address = ev.address.split("/")[0]
        if ":" in address:
            # An operator's IPv6 pool makes OpenVPN report the client's IPv6 address as its
            # primary one. IPv6 is not carried (the ip6tables chains reject it), so only the
            # IPv4 address we pushed is ours to confirm; killing here would drop every client.
            return
        self._confirm(session, address)

    def _on_established(self, ev):
        session = self.sessions.get((self.epoch, ev.cid))
        if session is None:
            self._log.warn("ESTABLISHED for unknown cid {cid}; killing it so it retries", cid=ev.cid)
            self._kill(ev.cid, "unknown session")
            return
        if session.address is not None and ev.env.get("ifconfig_pool_remote_ip"):
            if not self._confirm(session, ev.env["ifconfig_pool_remote_ip"]):
                return
        session.state = ESTABLISHED
        session.connected_since = self.clock.seconds()

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
            self._kill(session.cid, "address mismatch")
        return matches

    def _on_reauth(self, ev):
        session = self.sessions.get((self.epoch, ev.cid))
        if session is None or session.user is None:
            self._reauth_deny(ev, "unknown session")
            return
        session.pending_reauth = ev
        d = self.directory.authenticate(
            ev.env.get("username", session.username),
            ev.env.get("password", ""),
            ev.env.get("common_name", session.common_name),
            self.run_blocking,
        )

        def ok(user):
            if self.protocol is None:
                return  # detached: answered when reconciliation re-runs session.pending_reauth
            if user.name != session.user.name or user.device != session.user.device:
                self._reauth_deny(ev, "user changed", session=session)
                return
            self._reauth_answer(self.protocol.client_auth_nt(ev.cid, ev.kid), "client-auth-nt", session, ev)

        def bad(failure):
            if self.protocol is None:
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

        d.addCallbacks(ok, bad).addErrback(self._log_unexpected, "reauth", session)

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

        d.addCallbacks(done, failed).addErrback(self._log_command_error, what, session)

    def _reauth_deny(self, ev, reason, temporary=False, session=None):
        self._log.info("re-authentication of cid {cid} refused: {reason}", cid=ev.cid, reason=reason, event="reauth-denied")
        if self.protocol is not None:
            client_reason = (
                "TEMP[backoff %d,advance no]: temporary failure, retrying" % self.config.temp_backoff
                if temporary
                else "authentication failed"
            )
            d = self.protocol.client_deny(ev.cid, ev.kid, reason[:200], client_reason)
            self._reauth_answer(d, "client-deny", session, ev)

    def _on_disconnect(self, ev):
        session = self.sessions.get((self.epoch, ev.cid))
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
        self._end(session)

    def _on_bytecount(self, ev):
        session = self.sessions.get((self.epoch, ev.cid))
        if session is not None:
            session.bytes_in, session.bytes_out = ev.bytes_in, ev.bytes_out

    # --- server state and epochs ---

    def _on_hold(self, ev):
        if self.protocol is not None:
            self.protocol.hold_release().addErrback(self._log_command_error, "hold release", None)

    def _on_state(self, ev):
        if ev.name == "RECONNECTING":
            self._log.info("OpenVPN is restarting ({why}); new epoch, dropping all sessions", why=ev.description)
            self._new_epoch()

    def _on_fatal(self, ev):
        self._log.error("OpenVPN reported a fatal error: {text}", text=ev.text)

    def _check_daemon(self, env):
        start = env.get("daemon_start_time")
        if start is None:
            return
        if self._daemon_start_time is not None and start != self._daemon_start_time:
            self._log.info("OpenVPN daemon_start_time changed; new epoch")
            self._new_epoch()
        self._daemon_start_time = start

    def _new_epoch(self):
        self.epoch += 1
        for session in list(self.sessions.values()):
            self._end(session)

    # --- teardown and rollback ---

    def _end(self, session):
        """Forget ``session`` and release what it holds (idempotent)."""
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]
        session.cancelled = True
        self._rollback(session)

    def _rollback(self, session):
        ip = session.address
        if ip is None:
            return
        session.address = None
        if self.pool.owner(ip) is not session:
            return
        holder, session.took_from = session.took_from, None
        if holder is not None and self.sessions.get(holder.key) is holder and holder.address is None:
            # A second instance of a static-address user failed: the first is still connected
            # and keeps its address, ipset member and mapping, as if nothing had been taken.
            self.pool.transfer(ip, holder)
            holder.address = ip
            self.mappings.transfer(ip, holder.user.device.upstream, holder)
            self._log.info(
                "address {vpn_ip} returned to cid {cid} after a failed second admission", vpn_ip=str(ip), cid=holder.cid
            )
            return
        self.mappings.remove(ip, owner=session)
        try:
            self.firewall.remove_member(ip)
        except Exception as e:
            self._log.error("could not remove ipset member {vpn_ip}: {error}", vpn_ip=str(ip), error=e)
        self.pool.release(session)

    def _kill(self, cid, why):
        if self.protocol is not None:
            self.protocol.client_kill(cid).addErrback(self._log_command_error, "client-kill (%s)" % why, None)

    # --- reconciliation ---

    def reconcile(self, status):
        """Make sessions, pool, ipset and mappings match OpenVPN's ``status 3``.

        Established rows are kept (or rebuilt after our own restart) when the
        user still exists and the address is ours to give; pending rows are
        re-approved if we know their KID, else killed so the client retries at
        once. Everything not in ``status 3`` is released, and kernel members
        nobody owns are removed.
        """
        previous = {s.cid: s for s in self.sessions.values()}
        rows = {row.cid: row for row in status.clients}
        # Vanished sessions roll back first, while self.sessions still holds the instances they
        # may give a static address back to (Session.took_from), and before the kernel is read:
        # their member removals must be seen, or a live holder would be rebuilt without its member.
        for cid, session in previous.items():
            row = rows.get(cid)
            if row is None or row.real_address.split(":")[-2:] != session.real_address.split(":")[-2:]:
                session.cancelled = True
                self._rollback(session)
        self.sessions = {}
        present = self._kernel_members()  # one netlink dump per reconcile, not one per client
        for row in status.clients:
            session = previous.get(row.cid)
            if session is not None and session.cancelled:
                session = None
            if row.pending:
                self._reconcile_pending(row, session)
            else:
                self._reconcile_established(row, session, present)
        self._sweep(present)
        self.reconciled = True
        self._log.info(
            "reconciled with OpenVPN: {n} clients ({pending} pending), {members} ipset members",
            n=len(self.sessions),
            pending=sum(1 for s in self.sessions.values() if s.state != ESTABLISHED),
            members=len(self.pool.in_use()),
            event="reconciled",
        )

    def _adopt(self, session):
        session.epoch = self.epoch
        self.sessions[session.key] = session

    def _reconcile_pending(self, row, session):
        if session is None:
            self._log.info("pending cid {cid} has no known key id; killing it so it retries now", cid=row.cid)
            self._kill(row.cid, "unknown pending client")
            return
        self._adopt(session)
        if session.state in (AUTHORIZING, AUTHORIZED):
            if session.address is None:
                # Its address moved to a newer instance of the user while the answer was lost.
                # Never push "ifconfig-push None": OpenVPN ignores a bad line and admits anyway.
                self._log.info("pending cid {cid} lost its address to a newer session; killing it", cid=row.cid)
                self._end(session)
                self._kill(row.cid, "address taken by a newer session")
                return
            self._authorize(session)

    def _reconcile_established(self, row, session, present):
        try:
            address = ipaddress.IPv4Address(row.virtual_address)
        except ValueError:
            address = None
        if session is not None and session.address == address and session.user is not None:
            session.state = ESTABLISHED
            self._adopt(session)
            self._ensure_rules(session, present)
            if session.pending_reauth is not None:
                # Its answer never went out (or was lost with the connection): OpenVPN still
                # waits for it and would drop the client at hand-window.
                self._on_reauth(session.pending_reauth)
            return
        if session is not None:
            session.cancelled = True
            self._rollback(session)
        user = self.directory.find(row.username, row.common_name)
        if user is None or address is None:
            self._log.warn("established cid {cid} ({who}) is not a known user; killing it", cid=row.cid, who=row.username)
            self._kill(row.cid, "unknown user")
            return
        env = {"username": row.username, "common_name": row.common_name}
        host, _, port = row.real_address.rpartition(":")
        env["untrusted_ip"], env["untrusted_port"] = host, port
        session = Session(self.epoch, row.cid, None, env, self.clock.seconds())
        session.user = user
        session.state = ESTABLISHED
        session.connected_since = row.connected_since
        try:
            session.address = self.pool.claim(session, address)
        except (AddressInUse, ValueError) as e:
            self._log.error("established cid {cid}: {error}; killing it", cid=row.cid, error=e)
            self._kill(row.cid, "address conflict")
            return
        self.sessions[session.key] = session
        self._ensure_rules(session, present)

    def _kernel_members(self):
        """The kernel set's members, or None if they cannot be read (then every member is re-added)."""
        try:
            return set(self.firewall.members())
        except Exception as e:
            self._log.error("could not list ipset members: {error}", error=e)
            return None

    def _ensure_rules(self, session, present):
        try:
            self.mappings.transfer(session.address, session.user.device.upstream, session)
            if present is None or session.address not in present:
                self.firewall.add_member(session.address)
                if present is not None:
                    present.add(session.address)
                    self._log.info("re-added missing ipset member {vpn_ip}", vpn_ip=str(session.address), event="drift")
        except Exception as e:
            self._log.error("cid {cid}: could not restore rules: {error}; killing it", cid=session.cid, error=e)
            self._end(session)
            self._kill(session.cid, "rules")

    def _sweep(self, present):
        owned = {s.address for s in self.sessions.values() if s.address is not None}
        for ip, holder in list(self.pool.in_use().items()):
            if ip not in owned:
                self.pool.release(holder)
        for ip in self.mappings.addresses() - owned:
            self.mappings.remove(ip)
        if present is None:
            return
        for ip in present - owned:
            self._log.info("removing stale ipset member {vpn_ip}", vpn_ip=str(ip), event="stale-member")
            try:
                self.firewall.remove_member(ip)
            except Exception as e:
                self._log.error("could not remove stale member {vpn_ip}: {error}", vpn_ip=str(ip), error=e)

    # --- operators' view and actions (the admin socket) ---

    @property
    def management_ready(self):
        """True while a logged-in management connection is attached."""
        protocol = self.protocol
        return protocol is not None and bool(getattr(protocol, "ready", False))

    def client_list(self):
        """The current sessions (every state), ordered by CID."""
        return sorted(self.sessions.values(), key=lambda s: s.cid)

    def sessions_of(self, name):
        """The current sessions of user ``name`` (by directory name, else by the username sent)."""
        return [s for s in self.client_list() if s.name == name]

    def expected_members(self):
        """The addresses the controller believes are in the kernel set."""
        return {s.address for s in self.sessions.values() if s.address is not None}

    def counts(self):
        """Counters of the admission side, JSON-friendly."""
        sessions = list(self.sessions.values())
        return {
            "clients": len(sessions),
            "established": sum(1 for s in sessions if s.state == ESTABLISHED),
            "pending": sum(1 for s in sessions if s.state != ESTABLISHED),
            "addresses_in_use": len(self.pool.in_use()),
            "mappings": len(self.mappings),
            "draining": self.draining,
            "management_connected": self.management_ready,
            "epoch": self.epoch,
        }

    def set_draining(self, draining):
        """Pause (True) or resume (False) new admissions; paused CONNECTs get a TEMP deny."""
        draining = bool(draining)
        if draining != self.draining:
            self._log.info(
                "draining {state}: new admissions {what}",
                state="on" if draining else "off",
                what="are denied temporarily" if draining else "resume",
                event="drain",
            )
        self.draining = draining

    def kick(self, name):
        """``client-kill`` every current session of user ``name``.

        :returns: a Deferred firing with ``(killed, errors)``: the number of
            sessions OpenVPN confirmed killed and the error texts of the others.
        :raises ManagementError: when no management connection is attached.
        """
        if not self.management_ready:
            raise ManagementDisconnected("OpenVPN management not connected")
        sessions = self.sessions_of(name)
        self._log.info("kicking user {user}: {n} session(s)", user=name, n=len(sessions), event="kick")
        ds = [self.protocol.client_kill(s.cid) for s in sessions]
        d = defer.DeferredList(ds, consumeErrors=True)

        def summarize(results):
            errors = [r.getErrorMessage() for ok, r in results if not ok]
            return len(results) - len(errors), errors

        return d.addCallback(summarize)

    def reload_file(self, path=None):
        """Re-read the users file (default: the one in force) and :meth:`reload` it.

        :raises ~ovpnmgr.config.ConfigError: the new file is invalid (``file: key:
            problem``); nothing changed and the previous directory stays in force.
        """
        from ovpnmgr.directory import Directory

        path = self.directory.path if path is None else path
        try:
            directory = Directory.load(path, self.config.subnet, self.config.server_address)
        except ConfigError as e:
            self._log.error(
                "reload refused: {error}; previous users stay in force", error=str(e), event="reload-refused"
            )
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
        * other changes (password, common name) only update the session's user:
          the next re-authentication is checked against the new file;
        * sessions still authenticating against the old file for a user that
          changed or disappeared get a TEMP deny, so they retry at once against
          the new one;
        * unchanged users are not touched: their live connections keep flowing.

        :returns: ``{"users", "added", "removed", "changed", "kicked", "remapped", "path"}``.
        :raises ~ovpnmgr.config.ConfigError: a static address the pool refuses
            (then nothing changed).
        """
        old = self.directory
        statics = directory.static_addresses()
        try:
            self.pool.set_static(statics)  # validates all before replacing: nothing changed on error
        except ValueError as e:
            raise ConfigError(directory.path, "users", str(e))
        added = sorted(set(directory.users) - set(old.users))
        removed = sorted(set(old.users) - set(directory.users))
        changed = sorted(n for n in set(old.users) & set(directory.users) if old.users[n] != directory.users[n])
        kicked = remapped = 0
        for session in list(self.sessions.values()):
            if session.user is None:
                if old.find(session.username, session.common_name) != directory.find(
                    session.username, session.common_name
                ):
                    self._deny(session, "users file reloaded during authentication", temporary=True)
                continue
            new = directory.users.get(session.user.name)
            if new is None:
                why = "user removed"
            elif new.address != session.user.address:
                why = "static address changed"
            elif self.tunnel_mode(new) != self.tunnel_mode(session.user):
                why = "tunnel changed to %s" % self.tunnel_mode(new)  # pushed options apply only at connect
            elif session.address is not None and session.address in statics and session.address != new.address:
                why = "address %s now reserved for another user" % session.address
            else:
                if new.device != session.user.device and session.address is not None:
                    if self.mappings.owner(session.address) is session:
                        self.mappings.transfer(session.address, new.device.upstream, session)
                        remapped += 1
                        self._log.info(
                            "remapped user {user} cid {cid} vpn_ip {vpn_ip} to device {device}",
                            user=new.name,
                            cid=session.cid,
                            vpn_ip=str(session.address),
                            device=new.device.name,
                            event="remapped",
                        )
                session.user = new
                continue
            self._log.info(
                "reload: kicking user {user} cid {cid} vpn_ip {vpn_ip}: {reason}",
                user=session.user.name,
                cid=session.cid,
                vpn_ip=str(session.address),
                reason=why,
                event="reload-kick",
            )
            self._end(session)
            self._kill(session.cid, why)
            kicked += 1
        self.directory = directory
        for listener in self.directory_listeners:
            listener(directory)
        self.warn_split_tunnels()
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

    def check_rules(self):
        """Compare the kernel (chain, ipset members) with :meth:`expected_members`.

        :returns: the Deferred of :meth:`~ovpnmgr.firewall.Firewall.check` (a ``Drift``);
            the result is also kept as :attr:`last_drift` for metrics.
        """

        def remember(drift):
            drift = fresh_members(self, drift)  # members compared at one instant, not across the listing
            self.last_drift = drift
            return drift

        return self.firewall.check(self.expected_members()).addCallback(remember)

    def management_command(self, line, shape):
        """Send one operator command over the management connection.

        :returns: the Deferred of :meth:`~ovpnmgr.protocol.ManagementProtocol.command`.
        :raises ManagementError: when no management connection is attached.
        :raises InvalidArgument: for a line the protocol refuses to send.
        """
        if not self.management_ready:
            raise ManagementDisconnected("OpenVPN management not connected")
        return self.protocol.command(line, shape)

    # --- helpers ---

    def _log_command_error(self, failure, what, session):
        failure.trap(ManagementError)
        self._log.warn(
            "{what} failed for cid {cid}: {reason}", what=what, cid=session.cid if session else "-", reason=failure.value
        )

    def _log_unexpected(self, failure, what, session):
        self._log.failure("unexpected error in {what} for {session}", failure, what=what, session=session)
