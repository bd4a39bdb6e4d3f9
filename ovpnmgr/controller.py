# -*- test-case-name: tests.unit.test_controller -*-
"""The management connection's owner: epochs, the live sessions, and who handles what.

The product's promise is kept by three collaborators this module wires together:
:mod:`ovpnmgr.admission` answers OpenVPN's questions about one client,
:mod:`ovpnmgr.reconcile` rebuilds everything from ``status 3`` after every
(re)connect of the management socket (OpenVPN is the source of truth; there is no
state file), and :mod:`ovpnmgr.ledger` is the only one that changes what a session
holds (address, kernel set member, proxy mapping). Operators reach all of it through
:class:`ovpnmgr.operations.Operations`.

Sessions are keyed by (epoch, CID) because OpenVPN restarts CIDs at 0 after a
SIGHUP/SIGUSR1 while the socket stays up, so a late DISCONNECT of an old CID can
never release what a newer session holds.
"""

from collections import Counter, deque

from twisted.logger import Logger

from ovpnmgr import events, tunnel
from ovpnmgr.admission import Admission
from ovpnmgr.ledger import Ledger
from ovpnmgr.metrics import LATENCY_BUCKETS, Histogram
from ovpnmgr.protocol import CommandFailed, ManagementError
from ovpnmgr.reconcile import Reconciler
from ovpnmgr.session import State

RECENT_ADMISSIONS = 50  # answered CONNECTs kept for the status page


class Controller:
    """Holds the live sessions of the current epoch and routes management events."""

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
        self.ledger = Ledger(pool, firewall, mappings)
        self.run_blocking = run_blocking
        self.epoch = 0
        self.sessions = {}
        self.protocol = None
        self.draining = False
        #: ``f(device name) -> bool``: False refuses new admissions for that device (TEMP,
        #: "device offline"); set by the device health wiring (:mod:`ovpnmgr.devices`).
        self.device_alive = lambda name: True
        self._daemon_start_time = None
        # Metrics (read by ovpnmgr.metrics at scrape time): answered CONNECTs by
        # result, CONNECT-to-client-auth latency, management connections after the first.
        self.admissions = Counter()
        self.recent_admissions = deque(maxlen=RECENT_ADMISSIONS)  # the latest answered CONNECTs (status page)
        self.admission_latency = Histogram(LATENCY_BUCKETS)
        self.management_reconnects = 0
        self._attaches = 0
        self.reconciled = False  # True once sessions were rebuilt from a status 3 (kernel checks wait for it)
        self.admission = Admission(self)
        self.reconciler = Reconciler(self)
        self._handlers = {
            events.ClientConnect: self.admission.on_connect,
            events.ClientReauth: self.admission.on_reauth,
            events.ClientEstablished: self.admission.on_established,
            events.ClientDisconnect: self.admission.on_disconnect,
            events.ClientAddress: self.admission.on_address,
            events.ByteCountClient: self.admission.on_bytecount,
            events.Hold: self._on_hold,
            events.State: self._on_state,
            events.Fatal: self._on_fatal,
        }

    def warn_split_tunnels(self):
        """Say loudly who does not get the full tunnel (at start and after every reload)."""
        for line in tunnel.split_tunnel_warnings(self.config.tunnel, self.directory.users.values()):
            self._log.warn("{warning}", warning=line, event="split-tunnel")

    def tunnel_mode(self, user):
        """``full`` or ``split``: what ``user``'s clients are pushed (see :mod:`ovpnmgr.tunnel`)."""
        return tunnel.effective_mode(self.config.tunnel, user.tunnel)

    @property
    def management_ready(self):
        """True while a logged-in management connection is attached."""
        protocol = self.protocol
        return protocol is not None and bool(getattr(protocol, "ready", False))

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

    def reconcile(self, status):
        """Make sessions, pool, ipset and mappings match OpenVPN's ``status 3`` (see :mod:`ovpnmgr.reconcile`)."""
        self.reconciler.reconcile(status)
        self.reconciled = True

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

    # --- server state and epochs ---

    def _on_hold(self, ev):
        if self.protocol is not None:
            self.protocol.hold_release().addErrback(self.log_command_error, "hold release", None)

    def _on_state(self, ev):
        if ev.name == "RECONNECTING":
            self._log.info("OpenVPN is restarting ({why}); new epoch, dropping all sessions", why=ev.description)
            self.new_epoch()

    def _on_fatal(self, ev):
        self._log.error("OpenVPN reported a fatal error: {text}", text=ev.text)

    def check_daemon(self, env):
        """A CONNECT's ``daemon_start_time`` differs from the last one: OpenVPN restarted unseen."""
        start = env.get("daemon_start_time")
        if start is None:
            return
        if self._daemon_start_time is not None and start != self._daemon_start_time:
            self._log.info("OpenVPN daemon_start_time changed; new epoch")
            self.new_epoch()
        self._daemon_start_time = start

    def new_epoch(self):
        """OpenVPN restarted: its CIDs start again, every session of the old epoch ends."""
        self.epoch += 1
        for session in list(self.sessions.values()):
            self.end(session)

    # --- the sessions ---

    def session(self, cid):
        """The current epoch's session for ``cid``, or None."""
        return self.sessions.get((self.epoch, cid))

    def adopt(self, session):
        """Keep ``session`` as one of the current epoch's (reconciliation)."""
        session.epoch = self.epoch
        self.sessions[session.key] = session

    def end(self, session):
        """Forget ``session`` and release what it holds (idempotent)."""
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]
        session.state = State.ENDED
        self.ledger.release(session)

    def kill(self, cid, why):
        """``client-kill`` ``cid`` (logged if OpenVPN refuses or the connection is down)."""
        if self.protocol is not None:
            self.protocol.client_kill(cid).addErrback(self.log_command_error, "client-kill (%s)" % why, None)

    def problems(self, kernel=True):
        """The ledger's invariant over the live sessions (see :meth:`~ovpnmgr.ledger.Ledger.problems`)."""
        return self.ledger.problems(list(self.sessions.values()), kernel=kernel)

    # --- helpers ---

    def log_command_error(self, failure, what, session):
        failure.trap(ManagementError)
        self._log.warn(
            "{what} failed for cid {cid}: {reason}", what=what, cid=session.cid if session else "-", reason=failure.value
        )

    def log_unexpected(self, failure, what, session):
        self._log.failure("unexpected error in {what} for {session}", failure, what=what, session=session)
