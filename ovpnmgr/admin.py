# -*- test-case-name: tests.unit.test_admin -*-
"""The operators' admin socket: a unix socket speaking the OpenVPN management dialect.

OpenVPN serves one management client at a time and pocketproxy is that client,
so operators' tools (openvpn-monitor, ``socat``, scripts) talk to this socket
instead. The dialect is OpenVPN's:

* on connect, one banner line
  ``>INFO:pocketproxy admin interface version 1 -- type 'help' for more info``
  (the form of OpenVPN's ``>INFO:OpenVPN Management Interface Version 5 -- …``);
* every line sent ends in ``\\r\\n``; input lines end in ``\\n`` (a ``\\r`` before
  it is dropped) and are at most :data:`MAX_LINE` bytes: a longer line is
  answered ``ERROR: line too long`` and the connection is closed;
* single-line replies are ``SUCCESS: …`` or ``ERROR: …``; multi-line replies end
  with a line that is exactly ``END``;
* commands of one admin connection are answered strictly in order; several
  admin connections are served at once (their passthrough commands share the
  management connection's FIFO).

Commands:

* **Passthrough** (:data:`PASSTHROUGH`): ``status [n]``, ``load-stats``,
  ``version``, ``pid``, ``state [all|n]``, ``client-kill CID [msg]``,
  ``kill CN|IP:port``, ``help``: the line is sent unchanged to OpenVPN and the
  reply relayed (``SUCCESS:``/``ERROR:`` re-framed with one space after the
  colon, multi-line replies line by line up to ``END``). Without a management
  connection: ``ERROR: OpenVPN management not connected``.
* **Refused** with ``ERROR: command not allowed``: every other OpenVPN
  management verb (:data:`OPENVPN_VERBS`), notably ``client-auth``,
  ``client-auth-nt``, ``client-deny``, ``client-pending-auth`` (admission is
  pocketproxy's), ``hold``, ``signal``, ``state on|off``, ``log``, ``bytecount``
  and ``version N`` (they would change or break pocketproxy's own connection).
* ``quit`` / ``exit`` close the **admin** connection, without a reply, as
  OpenVPN does for its management clients; they are never sent to OpenVPN.
* **pocketproxy verbs**, prefixed ``pp`` so they never clash with OpenVPN's;
  each takes ``--json`` for one JSON line followed by ``END``:
  ``pp help``, ``pp clients``, ``pp devices``, ``pp kick USER``,
  ``pp drain [on|off]``, ``pp rules check``, ``pp stats``, ``pp reload``
  (re-read the users file, as SIGHUP does; a bad file is refused and the
  previous users stay in force).
* Anything else: ``ERROR: unknown command, enter 'help' for more options``.

Optional password (``admin.password_file``), as OpenVPN's ``management … pw-file``
does it (observed with OpenVPN 2.6.14):

* a new connection gets ``ENTER PASSWORD:`` with **no** line end instead of the
  banner;
* every line received before the right password is a password attempt, never a
  command (compared with :func:`hmac.compare_digest`, never logged);
* right: ``SUCCESS: password is correct`` then the banner;
* wrong: nothing but another ``ENTER PASSWORD:`` (OpenVPN's ``ERROR: bad
  password`` never reaches the client); the third wrong attempt closes the
  connection without a reply.

Not (yet) here: forwarding of real-time ``>`` notifications to admin clients.
"""

import errno
import hmac
import json
import os
import socket
import stat
from collections import deque

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from ovpnmgr import views
from ovpnmgr.adminwire import CLIENT_BYTES, PASSWORD_PROMPT, flatten
from ovpnmgr.config import ConfigError, read_secret_file
from ovpnmgr.firewall import FirewallError
from ovpnmgr.protocol import MULTI, SINGLE, CommandFailed, InvalidArgument, ManagementDisconnected, ManagementError

__all__ = ["BANNER", "PASSWORD_PROMPT", "PASSWORD_OK", "PASSWORD_TRIES", "MAX_LINE", "PASSTHROUGH", "OPENVPN_VERBS", "AdminProtocol", "AdminFactory", "AdminService"]

#: The first line every admin client receives.
BANNER = ">INFO:pocketproxy admin interface version 1 -- type 'help' for more info"

#: Sent instead of the banner when a password is configured: no CR/LF, as OpenVPN.

#: The reply to the right password; the banner follows.
PASSWORD_OK = "SUCCESS: password is correct"

#: Wrong attempts after which the connection is closed (OpenVPN's MANAGEMENT_N_PASSWORD_RETRIES).
PASSWORD_TRIES = 3

#: Longest accepted input line in bytes (without the ``\\n``); OpenVPN's own buffer is 1024.
MAX_LINE = 1000

NOT_CONNECTED = "ERROR: OpenVPN management not connected"
NOT_ALLOWED = "ERROR: command not allowed"
UNKNOWN = "ERROR: unknown command, enter 'help' for more options"

#: OpenVPN management verbs known to OpenVPN 2.6/2.7 (to tell "not allowed" from "unknown").
OPENVPN_VERBS = frozenset(
    """auth-retry bytecount certificate client-auth client-auth-nt client-deny client-kill
    client-pending-auth client-pf cr-response echo env-filter exit forget-passwords help hold kill
    load-stats log mute needok needstr net password pid pk-sig pkcs11-id-count pkcs11-id-get proxy
    quit remote remote-entry-count remote-entry-get rsa-sig signal state status test username verb
    version push-update-broad push-update-cid""".split()
)

_SESSION_END = frozenset({"quit", "exit"})


def _status_shape(args):
    if len(args) <= 1 and all(a.isdigit() for a in args):
        return MULTI
    return None


def _state_shape(args):
    if not args or (len(args) == 1 and (args[0] == "all" or args[0].isdigit())):
        return MULTI
    return None  # "state on|off" would change pocketproxy's own notifications


def _bare(shape):
    return lambda args: shape if not args else None


def _with_args(shape):
    return lambda args: shape if args else None


#: verb → f(args) → reply shape, or None when this use of the verb is refused.
PASSTHROUGH = {
    "status": _status_shape,
    "state": _state_shape,
    "load-stats": _bare(SINGLE),
    "version": _bare(MULTI),  # "version N" gets no reply from 2.6 and is never sent
    "pid": _bare(SINGLE),
    "client-kill": _with_args(SINGLE),
    "kill": _with_args(SINGLE),
}

PP_HELP = [
    "pocketproxy admin verbs (add --json for one JSON line before END):",
    "pp clients            : sessions: user, cid, VPN address, device, since, live connections, state, bytes",
    "pp devices            : devices, their users, connected addresses and health (state, RTT, exit address)",
    "pp kick USER          : client-kill every session of USER",
    "pp drain [on|off]     : show, pause or resume new admissions (paused: TEMP deny)",
    "pp rules check        : compare kernel chain and ipset members with admitted clients",
    "pp stats              : admission and proxy counters",
    "pp reload             : re-read the users file (removed users kicked, changed devices remapped)",
    "pp rotate DEVICE      : run the device's rotation action, wait for a new exit address (health on)",
    "quit | exit           : close this admin session",
    "OpenVPN passthrough   : status [n], load-stats, version, pid, state [all|n], client-kill CID [msg], kill",
    "help                  : every command this socket accepts, in OpenVPN's format",
]


#: ``help``: what this socket accepts, in OpenVPN's own format (OpenVPN's list would advertise
#: commands pocketproxy refuses and not mention the ``pp`` verbs).
HELP = [
    "Management Interface for pocketproxy (OpenVPN management dialect; OpenVPN verbs relayed as noted)",
    "Commands:",
    "client-kill cid [msg]  : Kill the client instance with this CID (relayed to OpenVPN).",
    "exit|quit              : Close this admin session.",
    "help                   : Print this message.",
    "kill cn                : Kill the client instance(s) having common name cn (relayed to OpenVPN).",
    "kill IP:port           : Kill the client instance connecting from IP:port (relayed to OpenVPN).",
    "load-stats             : Show global server load stats (relayed to OpenVPN).",
    "pid                    : Show OpenVPN's process ID (relayed).",
    "state [all|n]          : Show the current or the last n OpenVPN states (relayed; 'on' is refused).",
    "status [n]             : Show current daemon status info using format #n (relayed to OpenVPN).",
    "version                : Show OpenVPN's and the management interface's version (relayed).",
] + ["%-22s : %s" % tuple(part.strip() for part in line.split(":", 1)) for line in PP_HELP if line.startswith("pp ")] + ["END"]

#: Health columns of ``pp devices`` (after the original four; only while device health is on).
HEALTH_COLUMNS = ("state", "since", "rtt_ms", "success_ratio", "exit_address", "exit_changed", "last_error", "rotation")


def _json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _key_values(snapshot):
    """``pp stats`` lines: dotted ``key=value``, booleans as 0/1."""
    return ["%s=%s" % (key, int(value) if isinstance(value, bool) else value) for key, value in flatten(snapshot)]


@implementer(IHalfCloseableProtocol)
class AdminProtocol(LineOnlyReceiver, TimeoutMixin):
    """One admin client. Lines are queued and answered one at a time, in order.

    Two timeouts keep a stuck or hostile client from holding a connection for
    ever: ``login_timeout`` while the password is pending, then ``idle_timeout``
    between complete lines (a partial line trickled byte by byte does not count
    as activity). ``callLater`` (``TimeoutMixin``'s clock hook) is set by the factory.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE
    dns_stats = None  # the DNS service's :class:`~proxy.dnsserver.DNSStats`, when it runs

    _log = Logger()

    def __init__(self, operations, proxy_stats=None, password=None, login_timeout=30.0, idle_timeout=900.0):
        """
        :param operations: the :class:`~ovpnmgr.operations.Operations` of the controller.
        :param proxy_stats: the proxy's :class:`~proxy.stats.ProxyStats`, or None.
        :param password: bytes every connection must send first, or None (no prompt).
        :param login_timeout: seconds to give the right password (with ``password``).
        :param idle_timeout: seconds without a complete line before the connection is closed; 0 = never.
        """
        self.operations = operations
        self.proxy_stats = proxy_stats
        self._login_timeout = login_timeout
        self._idle_timeout = idle_timeout or None
        self._password = password
        self._authenticated = password is None
        self._failures = 0
        self._queue = deque()
        self._busy = False
        self._looping = False
        self._closed = False
        self._eof = False  # the client half-closed: answer what it sent, then close

    # --- Twisted protocol ---

    def connectionMade(self):
        """``IProtocol.connectionMade``: send the banner, or the password prompt."""
        if self._authenticated:
            self.setTimeout(self._idle_timeout)
            self._write([BANNER])
        else:
            self.setTimeout(self._login_timeout)
            self.transport.write(PASSWORD_PROMPT)

    def connectionLost(self, reason=None):
        """``IProtocol.connectionLost``: drop queued lines (a reply in progress is discarded)."""
        self.setTimeout(None)
        self._closed = True
        self._queue.clear()

    def readConnectionLost(self):
        """``IHalfCloseableProtocol``: the client sent its commands and shut down its side
        (``printf 'status 3\\n' | socat - UNIX-CONNECT:...``): every reply still comes, then the
        connection closes, as OpenVPN's own management interface behaves."""
        self._eof = True
        self._finish_if_done()

    def writeConnectionLost(self):
        """``IHalfCloseableProtocol``: nobody reads our replies any more."""
        self._close()

    def _finish_if_done(self):
        if self._eof and not self._busy and not self._queue and not self._closed:
            self._close()

    def timeoutConnection(self):
        """``TimeoutMixin.timeoutConnection``: log which timeout it was and close."""
        if self._authenticated:
            self._log.info("admin connection idle for {seconds}s; closing", seconds=self._idle_timeout)
        else:
            self._log.warn("admin connection gave no password within {seconds}s; closing", seconds=self._login_timeout)
        self._close()

    def lineReceived(self, line):
        """``LineOnlyReceiver.lineReceived``: queue one command line."""
        if self._closed:
            return
        if line.endswith(b"\r"):
            line = line[:-1]
        if not self._authenticated:
            self._check_password(line)  # the login timeout keeps running across wrong attempts
            return
        self.resetTimeout()
        self._queue.append(line)
        self._next()

    def lineLengthExceeded(self, line):
        """``LineOnlyReceiver.lineLengthExceeded``: say so, log the length only, and close."""
        self._log.warn("admin line of {length}+ bytes exceeds {limit}; closing", length=len(line), limit=MAX_LINE)
        self._write(["ERROR: line too long (limit %d bytes)" % MAX_LINE])
        self._close()

    def _check_password(self, attempt):
        # The attempt itself is never logged, whatever it is (it may be a mistyped password).
        if hmac.compare_digest(attempt, self._password):
            self._authenticated = True
            self.setTimeout(self._idle_timeout)
            self._write([PASSWORD_OK, BANNER])
            return
        self._failures += 1
        if self._failures >= PASSWORD_TRIES:
            self._log.warn(
                "admin connection closed after {tries} wrong password attempts", tries=self._failures
            )
            self._close()
            return
        self._log.info(
            "wrong admin password (attempt {n} of {tries})", n=self._failures, tries=PASSWORD_TRIES
        )
        self.transport.write(PASSWORD_PROMPT)

    # --- command loop ---

    def _write(self, lines):
        if not self._closed and self.transport is not None:
            self.transport.write(b"".join(line.encode("utf-8") + b"\r\n" for line in lines))

    def _close(self):
        self.setTimeout(None)
        self._closed = True
        self._queue.clear()
        self.transport.loseConnection()

    def _next(self):
        if self._looping:
            return  # an answer that arrived synchronously; the running loop continues
        self._looping = True
        try:
            while not self._busy and self._queue and not self._closed:
                raw = self._queue.popleft()
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    self._write(["ERROR: command is not UTF-8"])
                    continue
                if not text.strip():
                    continue  # OpenVPN ignores empty lines too
                self._busy = True
                d = defer.maybeDeferred(self._dispatch, text.strip())
                d.addErrback(self._internal_error, text)
                d.addCallback(self._answered)
        finally:
            self._looping = False

    def _answered(self, lines):
        self._busy = False
        if lines is None:  # quit/exit
            self._close()
            return
        self._write(lines)
        self._next()
        self._finish_if_done()

    def _internal_error(self, failure, text):
        self._log.failure("admin command {verb!r} failed", failure, verb=text.split()[0][:40])
        return ["ERROR: internal error: %s" % failure.type.__name__]

    def _dispatch(self, text):
        words = text.split()
        verb = words[0]
        if verb in _SESSION_END:
            return None
        if verb == "pp":
            return self._pp(words[1:])
        if verb == "help":
            return list(HELP) if len(words) == 1 else [NOT_ALLOWED]
        shape_of = PASSTHROUGH.get(verb)
        if shape_of is not None:
            shape = shape_of(words[1:])
            if shape is not None:
                return self._passthrough(text, shape)
            return [NOT_ALLOWED]
        if verb in OPENVPN_VERBS:
            return [NOT_ALLOWED]
        return [UNKNOWN]

    # --- passthrough ---

    def _passthrough(self, text, shape):
        try:
            d = self.operations.management_command(text, shape)
        except ManagementDisconnected:
            return [NOT_CONNECTED]
        except InvalidArgument as e:
            return ["ERROR: %s" % e]

        def ok(result):
            if shape is SINGLE:
                return ["SUCCESS: %s" % result]
            return list(result) + ["END"]

        def failed(failure):
            if failure.check(CommandFailed):
                return ["ERROR: %s" % failure.value.text]
            if failure.check(ManagementDisconnected):
                return [NOT_CONNECTED]
            failure.trap(ManagementError)
            return ["ERROR: OpenVPN management: %s" % failure.getErrorMessage()]

        return d.addCallbacks(ok, failed)

    # --- pocketproxy verbs ---

    def _pp(self, args):
        as_json = "--json" in args
        args = [a for a in args if a != "--json"]
        if not args:
            return [UNKNOWN]
        verb, rest = args[0], args[1:]
        if verb == "help" and not rest:
            return PP_HELP + ["END"]
        if verb == "clients" and not rest:
            return self._clients(as_json)
        if verb == "devices" and not rest:
            return self._devices(as_json)
        if verb == "kick" and len(rest) == 1:
            return self._kick(rest[0], as_json)
        if verb == "drain" and len(rest) <= 1 and (not rest or rest[0] in ("on", "off")):
            return self._drain(rest[0] if rest else None, as_json)
        if verb == "rules" and rest == ["check"]:
            return self._rules_check(as_json)
        if verb == "stats" and not rest:
            return self._stats(as_json)
        if verb == "reload" and not rest:
            return self._reload(as_json)
        if verb == "rotate" and len(rest) == 1:
            return self._rotate(rest[0], as_json)
        if verb in ("help", "clients", "devices", "kick", "drain", "rules", "stats", "reload", "rotate"):
            return ["ERROR: usage: see 'pp help'"]
        return [UNKNOWN]

    def _clients(self, as_json):
        rows = views.clients(self.operations)
        if as_json:
            return [_json({"clients": rows}), "END"]
        keys = ("user", "cid", "vpn_ip", "device", "connected_since", "live_connections", "state") + CLIENT_BYTES + ("tunnel",)
        out = ["HEADER\tCLIENT\t" + "\t".join(keys)]
        for row in rows:
            out.append("CLIENT\t" + "\t".join("-" if row[k] is None else str(row[k]) for k in keys))
        return out + ["END"]

    def _devices(self, as_json):
        devices = views.devices(self.operations)
        if as_json:
            return [_json({"devices": devices}), "END"]
        columns = HEALTH_COLUMNS if self.operations.health is not None else ()
        out = ["HEADER\tDEVICE\tdevice\tupstream\tusers\tconnected" + "".join("\t" + c for c in columns)]
        for d in devices:
            users = ",".join(d["users"]) or "-"
            conn = ",".join("%s@%s" % (c["user"], c["vpn_ip"] or "-") for c in d["connected"]) or "-"
            health = d.get("health") or {}
            cells = "".join("\t" + ("-" if health.get(k) is None else str(health[k])) for k in columns)
            out.append("DEVICE\t%s\t%s\t%s\t%s%s" % (d["device"], d["upstream"], users, conn, cells))
        return out + ["END"]

    def _kick(self, name, as_json):
        if not self.operations.sessions_of(name) and name not in self.operations.directory.users:
            return ["ERROR: unknown user %s" % name]
        try:
            d = self.operations.kick(name)
        except ManagementDisconnected:
            return [NOT_CONNECTED]

        def done(result):
            killed, errors = result
            if as_json:
                return [_json({"user": name, "kicked": killed, "errors": errors}), "END"]
            if errors:
                return ["ERROR: kicked %d of %d session(s) of %s: %s" % (killed, killed + len(errors), name, errors[0])]
            return ["SUCCESS: kicked %d session(s) of %s" % (killed, name)]

        return d.addCallback(done)

    def _rotate(self, name, as_json):
        from ovpnmgr.rotation import DONE, RotationRefused

        try:
            d = self.operations.rotate(name)
        except RotationRefused as e:
            return ["ERROR: %s" % e]

        def done(result):
            if as_json:
                return [_json(result), "END"]
            if result["state"] == DONE:
                return [
                    "SUCCESS: device %s rotated: exit address %s -> %s in %.1f s"
                    % (name, result["old_address"], result["new_address"], result["seconds"])
                ]
            return ["ERROR: rotation of device %s failed: %s" % (name, result["error"])]

        return d.addCallback(done)

    def _drain(self, value, as_json):
        if value is not None:
            self.operations.set_draining(value == "on")
        state = "on" if self.operations.draining else "off"
        if as_json:
            return [_json({"draining": self.operations.draining}), "END"]
        return ["SUCCESS: drain=%s" % state]

    def _rules_check(self, as_json):
        def done(drift):
            if as_json:
                return [
                    _json(
                        {
                            "ok": drift.ok,
                            "summary": drift.describe(),
                            "missing_chain_rules": drift.missing_chain_rules,
                            "rule_problems": list(drift.rule_problems),
                            "set_missing": drift.set_missing,
                            "missing_members": sorted(str(ip) for ip in drift.missing_members),
                            "extra_members": sorted(str(ip) for ip in drift.extra_members),
                        }
                    ),
                    "END",
                ]
            if drift.ok:
                return ["SUCCESS: %s" % drift.describe()]
            return ["ERROR: drift: %s" % drift.describe()]

        def failed(failure):
            failure.trap(FirewallError)
            return ["ERROR: %s" % failure.value]

        return self.operations.check_rules().addCallbacks(done, failed)

    def _reload(self, as_json):
        def refused(failure):
            failure.trap(ConfigError)
            error = " ".join(str(failure.value).split("\n"))  # one reply line whatever the message
            if as_json:
                return [_json({"ok": False, "error": error}), "END"]
            return ["ERROR: reload refused: %s; previous users stay in force" % error]

        def done(summary):
            if as_json:
                return [_json(dict(summary, ok=True)), "END"]
            what = "users file" if self.operations.directory_reader is None else "directory (%s)" % summary["path"]
            return [
                "SUCCESS: reloaded %s: %d users (added %d, removed %d, changed %d, kicked %d)"
                % (what, summary["users"], summary["added"], summary["removed"], summary["changed"], summary["kicked"])
            ]

        return defer.maybeDeferred(self.operations.reload_file).addCallbacks(done, refused)

    def _stats(self, as_json):
        snapshot = views.stats(self.operations, self.proxy_stats, self.dns_stats)
        if as_json:
            return [_json(snapshot), "END"]
        return _key_values(snapshot) + ["END"]


class AdminFactory(Factory):
    """Builds :class:`AdminProtocol` instances and remembers the live ones."""

    def __init__(
        self,
        operations,
        proxy_stats=None,
        password=None,
        clock=None,
        login_timeout=30.0,
        idle_timeout=900.0,
        dns_stats=None,
    ):
        """:param clock: the ``IReactorTime`` behind the connections' timeouts (default: the global reactor)."""
        self.operations = operations
        self.proxy_stats = proxy_stats
        self.dns_stats = dns_stats
        self.password = password
        self.clock = clock
        self.login_timeout = login_timeout
        self.idle_timeout = idle_timeout
        self.connections = set()

    def buildProtocol(self, addr):
        """``IProtocolFactory.buildProtocol``."""
        protocol = _TrackedAdminProtocol(
            self.operations, self.proxy_stats, self.password, self.login_timeout, self.idle_timeout
        )
        if self.clock is not None:
            protocol.callLater = self.clock.callLater
        protocol.dns_stats = self.dns_stats
        protocol.factory = self
        return protocol


class _TrackedAdminProtocol(AdminProtocol):
    def connectionMade(self):
        self.factory.connections.add(self)
        super().connectionMade()

    def connectionLost(self, reason=None):
        self.factory.connections.discard(self)
        super().connectionLost(reason)


def read_password(path):
    """The admin password: the first line of ``path`` (bytes, line end removed).

    :raises ConfigError: naming ``admin.password_file`` if the file cannot be
        read or its first line is empty.
    """
    try:
        return read_secret_file(path)
    except ValueError as e:
        raise ConfigError(path, "admin.password_file", str(e))


def remove_stale_socket(path):
    """Remove a leftover socket file at ``path`` that nobody listens on.

    :raises OSError: if ``path`` exists and is not a socket, or a live process
        still accepts connections on it (``EADDRINUSE``).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, "exists and is not a socket", str(path))
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        pass  # refused: stale
    else:
        raise OSError(errno.EADDRINUSE, "another process is listening on it", str(path))
    finally:
        probe.close()
    os.unlink(path)
    return True


class AdminService(service.Service):
    """Listens on the admin unix socket; mode, group and password from :class:`~ovpnmgr.config.AdminConfig`.

    The socket is bound in ``privilegedStartService`` (a stale file is removed
    first), and removed again when the service stops.
    """

    _log = Logger()

    def __init__(self, reactor, config, operations, proxy_stats=None, dns_stats=None):
        """
        :param reactor: an ``IReactorUNIX``.
        :param config: the :class:`~ovpnmgr.config.AdminConfig` (``socket`` set).
        :param operations: the :class:`~ovpnmgr.operations.Operations` of the controller.
        :param proxy_stats: the proxy's :class:`~proxy.stats.ProxyStats`, or None.
        :param dns_stats: the DNS service's :class:`~proxy.dnsserver.DNSStats`, or None.
        """
        self.reactor = reactor
        self.config = config
        password_file = getattr(config, "password_file", None)
        # Read now (at build time, before any privilege drop), like the management password.
        password = read_password(password_file) if password_file is not None else None
        self.factory = AdminFactory(
            operations,
            proxy_stats,
            password,
            clock=reactor,
            login_timeout=getattr(config, "login_timeout", 30.0),
            idle_timeout=getattr(config, "idle_timeout", 900.0),
            dns_stats=dns_stats,
        )
        self.port = None

    def privilegedStartService(self):
        """``IService.privilegedStartService``: bind the socket."""
        super().privilegedStartService()
        self._listen()

    def startService(self):
        """``IService.startService``."""
        super().startService()
        if self.port is None:
            self._listen()

    def _listen(self):
        path = str(self.config.socket)
        try:
            removed = remove_stale_socket(path)
        except OSError as e:
            # Reported by PocketproxyService like any other port that cannot be bound.
            raise CannotListenError(None, path, e)
        if removed:
            self._log.info("removed stale admin socket {path}", path=path)
        self.port = self.reactor.listenUNIX(path, self.factory, mode=self.config.mode)
        group = getattr(self.config, "group", None)
        if group is not None:
            os.chown(path, -1, group)
        self._log.info("admin socket listening on {path} (mode {mode:04o})", path=path, mode=self.config.mode)

    def stopService(self):
        """``IService.stopService``: close admin connections, stop listening (removes the file)."""
        super().stopService()
        for protocol in list(self.factory.connections):
            protocol.transport.loseConnection()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
