# -*- test-case-name: tests.unit.test_protocol -*-
"""The OpenVPN management-interface client protocol (management version 5, OpenVPN 2.6).

:class:`ManagementProtocol` is a thin, line-oriented Twisted protocol:

* **Login pre-phase.** Until the banner ``>INFO:OpenVPN Management Interface Version N``
  arrives, the raw buffer is checked for the unterminated ``ENTER PASSWORD:`` prompt at
  the start of every line, even when the prompt is split across reads or shares a read
  with other data. The configured password is sent once; a second prompt (OpenVPN
  suppresses ``ERROR: bad password``) or a prompt without a configured password fails
  :meth:`~ManagementProtocol.when_ready` with :class:`BadPassword`. A banner with a
  management version below 5 fails it with :class:`ProtocolViolation`. If no banner
  arrives within ``login_timeout`` seconds it fails with :class:`CommandTimeout` (a
  second management client gets no bytes at all while another one is attached).
* **Notifications.** Every line starting with ``>`` is a notification and never
  completes a command. ``>CLIENT:`` lines go through :class:`~ovpnmgr.events.ClientBlockAssembler`;
  the others through :func:`~ovpnmgr.events.parse_notification`. Complete events are
  handed to the ``notify`` attribute; an exception raised by it is logged and swallowed.
* **Commands.** One FIFO of ``(Deferred, bytes, reply shape)``; exactly one command is on
  the wire at a time, so replies are correlated strictly in order. Commands issued
  before login completes are held (they would otherwise be read as the password) and
  sent once the banner was seen.
* **Timeouts.** Each command on the wire has ``command_timeout`` seconds (via the
  injected clock). On expiry the command fails with :class:`CommandTimeout` **and the
  connection is dropped**: OpenVPN replies without ids, so a late reply would be taken
  as the answer to the next command and every later correlation would be wrong. The
  same happens when a single-line command gets a reply that is neither ``SUCCESS:`` nor
  ``ERROR:`` (:class:`ProtocolViolation`).
* **Disconnects.** Once the connection is lost or being dropped, every queued and
  in-flight command fails with :class:`ManagementDisconnected`, later commands fail at
  once, and no timer is left behind.
* **Oversized input.** A received line longer than :attr:`~ManagementProtocol.MAX_LENGTH`
  is logged (its length only) and skipped up to its newline; the connection stays up.
  This cannot desynchronise replies: a skipped notification is just lost, a skipped row
  of a multi-line reply is missing from it (``END`` still closes it), and a skipped
  single-line reply leaves its command to time out, which drops the connection.
* **Outgoing lines** are validated before anything is queued: no control characters,
  at most :data:`MAX_OUTGOING_LINE` bytes (OpenVPN's input buffer is 1024 bytes and
  silently wraps), decimal non-negative CID/KID. Violations raise :class:`InvalidArgument`
  synchronously.
* **ClientService.** ``prepareConnection``/``whenConnected`` hand out a proxy object, on
  which ``proxy.notify = f`` only sets an attribute of the proxy: call
  ``proxy.set_notify(f)`` instead (or set ``notify`` where the factory builds the protocol).
"""

import enum
import re
import unicodedata
from collections import deque

from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from ovpnmgr.events import ClientBlockAssembler, Info, parse_notification, parse_status3, quote, scrub_line

__all__ = [
    "ManagementError",
    "CommandFailed",
    "CommandTimeout",
    "ManagementDisconnected",
    "BadPassword",
    "ProtocolViolation",
    "InvalidArgument",
    "ReplyShape",
    "SINGLE",
    "MULTI",
    "NONE",
    "MAX_OUTGOING_LINE",
    "MAX_ARGUMENT_BYTES",
    "MIN_MANAGEMENT_VERSION",
    "PASSWORD_PROMPT",
    "ManagementProtocol",
]


class ManagementError(Exception):
    """Base class of every failure reported by :class:`ManagementProtocol`."""


class CommandFailed(ManagementError):
    """OpenVPN answered ``ERROR: …``; :attr:`text` is what follows ``ERROR:``."""

    def __init__(self, text):
        super().__init__(text)
        self.text = text


class CommandTimeout(ManagementError):
    """No (complete) reply within the timeout; the connection was dropped."""


class ManagementDisconnected(ManagementError):
    """The management connection is gone (or being dropped); the command was not answered."""


class BadPassword(ManagementError):
    """The management password was refused, or one was asked for and none is configured."""


class ProtocolViolation(ManagementError):
    """The server said something that makes further correlation impossible."""


class InvalidArgument(ValueError):
    """A command argument was refused before anything was sent (raised synchronously)."""


class ReplyShape(enum.Enum):
    """What a command's reply looks like."""

    #: one ``SUCCESS: …`` or ``ERROR: …`` line
    SINGLE = "single"
    #: lines up to one that is exactly ``END``, or a single ``ERROR: …`` line
    MULTI = "multi"
    #: no reply at all
    NONE = "none"


SINGLE = ReplyShape.SINGLE
MULTI = ReplyShape.MULTI
NONE = ReplyShape.NONE

#: Longest line (in bytes, without the ``\n``) ever written to OpenVPN.
MAX_OUTGOING_LINE = 1000

#: OpenVPN's lexer refuses a single parameter longer than this (``OPTION_PARM_SIZE``).
MAX_ARGUMENT_BYTES = 256

#: Management interface version of OpenVPN 2.6 (``--management-client-auth`` semantics).
MIN_MANAGEMENT_VERSION = 5

#: The unterminated login prompt.
PASSWORD_PROMPT = b"ENTER PASSWORD:"

_BANNER = re.compile(r"OpenVPN Management Interface Version (\d+)")
_PID = re.compile(r"pid=([0-9]+)\Z")

#: Verbs that switch OpenVPN into multi-line input; only dedicated methods may send them.
_MULTILINE_INPUT_VERBS = frozenset({"client-auth", "client-pf", "rsa-sig", "pk-sig", "certificate"})

_MAX_CID = 2**64 - 1
_MAX_KID = 2**32 - 1


def _ignore_event(event):
    """Default ``notify``: drop the event."""


def _after(text, prefix):
    return text[len(prefix) :].lstrip(" ")


def _truncate_utf8(text, limit):
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", "ignore")


def _check_id(name, value, limit):
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument("%s must be an int, not %r" % (name, type(value).__name__))
    if not 0 <= value <= limit:
        raise InvalidArgument("%s out of range: %d" % (name, value))
    return value


def _encode_line(line, what="command"):
    """
    Validate and encode one outgoing line (without terminator).

    :raises InvalidArgument: not a str, a control character, or longer than
        :data:`MAX_OUTGOING_LINE` bytes once encoded.
    """
    if not isinstance(line, str):
        raise InvalidArgument("%s must be str, not %s" % (what, type(line).__name__))
    if len(line) > MAX_OUTGOING_LINE:  # cheap early exit: never fewer bytes than characters
        raise InvalidArgument("%s is longer than %d bytes" % (what, MAX_OUTGOING_LINE))
    for ch in line:
        if unicodedata.category(ch) in ("Cc", "Cs"):
            raise InvalidArgument("%s contains control character %r" % (what, ch))
    data = line.encode("utf-8")
    if len(data) > MAX_OUTGOING_LINE:
        raise InvalidArgument("%s is %d bytes long; the limit is %d" % (what, len(data), MAX_OUTGOING_LINE))
    return data


def _first_word(line):
    """The command verb roughly as OpenVPN's lexer sees it (quotes and backslashes dropped)."""
    words = line.split(None, 1)
    if not words:
        return ""
    return re.sub(r"[\"'\\]", "", words[0])


class _Command:
    """One queued command: its Deferred, the bytes to write, the reply shape, collected lines."""

    __slots__ = ("deferred", "data", "shape", "label", "lines")

    def __init__(self, data, shape, label):
        self.data = data
        self.shape = shape
        self.label = label
        self.lines = []
        self.deferred = None


class ManagementProtocol(LineOnlyReceiver):
    """
    Client side of one OpenVPN management connection.

    Set :attr:`notify` (a callable taking one event from :mod:`ovpnmgr.events`) to
    receive notifications; set it before the connection is made to see every event,
    including those that precede the banner.

    :ivar notify: notification hook; the default drops events.
    :ivar ready: ``True`` between the banner and the start of the disconnect.
    :ivar management_version: ``N`` from the banner, or ``None`` before it.
    :ivar clock: the ``IReactorTime`` used for timeouts.
    :ivar command_timeout: seconds each command on the wire may take (``None``/0: no limit).
    :ivar login_timeout: seconds from connect to banner (``None``/0: no limit).
    """

    delimiter = b"\n"
    #: Longest accepted incoming line (``status 3`` rows and ENV values are well below).
    MAX_LENGTH = 64 * 1024

    _log = Logger()

    def __init__(self, clock, password=None, command_timeout=5.0, *, login_timeout=None):
        """
        :param clock: an ``IReactorTime`` (``task.Clock`` in tests).
        :param password: the management password as bytes (``str`` is UTF-8 encoded), or
            ``None`` when the socket has no password.
        :param command_timeout: seconds allowed for each command's reply.
        :param login_timeout: seconds allowed from connect to banner; defaults to
            ``command_timeout``.
        :raises ValueError: if the password contains CR or LF.
        """
        if isinstance(password, str):
            password = password.encode("utf-8")
        if password is not None and (b"\n" in password or b"\r" in password):
            raise ValueError("the management password must not contain CR or LF")
        self.clock = clock
        self._password = password
        self.command_timeout = command_timeout
        self.login_timeout = command_timeout if login_timeout is None else login_timeout
        self.notify = _ignore_event
        self.ready = False
        self.management_version = None
        self._buffer = b""
        self._receiving = False
        self._assembler = ClientBlockAssembler()
        self._queue = deque()
        self._inflight = None
        self._timer = None
        self._login_timer = None
        self._password_sent = False
        self._closing = False
        self._discarding = False  # inside an oversized line: skip to its newline
        self._lost = False
        self._failure = None
        self._ready_waiters = []
        self._disconnect_waiters = []
        self._disconnect_value = None

    def __repr__(self):
        if self._lost:
            state = "lost"
        elif self._closing:
            state = "closing"
        elif self.ready:
            state = "ready (management version %s)" % (self.management_version,)
        else:
            state = "logging in"
        return "<%s %s, %d queued, %s in flight>" % (
            type(self).__name__,
            state,
            len(self._queue),
            repr(self._inflight.label) if self._inflight else "nothing",
        )

    # --- lifecycle hooks ---------------------------------------------------------------------

    def set_notify(self, callback):
        """
        Set :attr:`notify`.

        Use this instead of assigning the attribute when you hold the protocol through
        ``ClientService`` (``prepareConnection``/``whenConnected`` hand out a
        ``_ReconnectingProtocolProxy``): ``proxy.notify = f`` would only set an attribute
        on the proxy, whereas ``proxy.set_notify(f)`` reaches this protocol.

        :param callback: a callable taking one event, or ``None`` to drop events.
        """
        self.notify = callback if callback is not None else _ignore_event

    def when_ready(self):
        """
        :returns: a new Deferred firing with this protocol once the banner was seen (at
            once if it already was), or failing with :class:`BadPassword`,
            :class:`ProtocolViolation`, :class:`CommandTimeout` or
            :class:`ManagementDisconnected`.
        """
        if self.ready:
            return defer.succeed(self)
        if self._closing:
            return defer.fail(self._failure or ManagementDisconnected("management connection lost"))
        d = defer.Deferred()
        self._ready_waiters.append(d)
        return d

    def when_disconnected(self):
        """
        :returns: a new Deferred firing when the connection is lost, with the reason
            failure's value (e.g. ``ConnectionDone``) or ``None``; it never fails.
        """
        if self._lost:
            return defer.succeed(self._disconnect_value)
        d = defer.Deferred()
        self._disconnect_waiters.append(d)
        return d

    # --- Twisted protocol --------------------------------------------------------------------

    def connectionMade(self):
        """``IProtocol.connectionMade``: start the login timer."""
        if self.login_timeout and not self._closing:
            self._login_timer = self.clock.callLater(self.login_timeout, self._login_timed_out)

    def dataReceived(self, data):
        """
        ``IProtocol.dataReceived``: split into ``\\n``-terminated lines; before the banner,
        also recognise the unterminated password prompt at the start of a line.

        Re-entrant calls (a synchronous peer answering inside ``transport.write``) only
        append to the buffer; the outer call processes the bytes in order.
        """
        if self._closing:
            return
        self._buffer += data
        if self._receiving:
            return
        self._receiving = True
        try:
            self._process_buffer()
        finally:
            self._receiving = False

    def _process_buffer(self):
        # Bytes are only ever appended to self._buffer (also re-entrantly), so ``pos``
        # stays valid while lines are handled; the consumed prefix is cut once at the end.
        pos = 0
        prompt_len = len(PASSWORD_PROMPT)
        while not self._closing:
            buf = self._buffer
            # A prompt split across reads ("ENTER PASS" + "WORD:") has no LF, so it simply
            # stays buffered until it is complete and matches here.
            if not self.ready and buf.startswith(PASSWORD_PROMPT, pos):
                pos += prompt_len
                self._password_prompt()
                continue
            end = buf.find(b"\n", pos)
            if end < 0:
                break
            line = buf[pos:end]
            pos = end + 1
            if self._discarding:
                self._discarding = False
                continue
            if len(line) > self.MAX_LENGTH:
                self.lineLengthExceeded(line)
                continue
            self.lineReceived(line)
        if self._closing:
            self._buffer = b""
            return
        self._buffer = self._buffer[pos:]
        if len(self._buffer) > self.MAX_LENGTH:
            if not self._discarding:
                self.lineLengthExceeded(self._buffer)
            self._discarding = True
            self._buffer = b""

    def lineReceived(self, line):
        """``LineOnlyReceiver.lineReceived``: route one line (bytes, ``\\r`` still attached)."""
        if line.endswith(b"\r"):
            line = line[:-1]
        text = line.decode("utf-8", "replace")
        if text.startswith(">"):
            self._notification(text)
        elif not self.ready:
            self._login_line(text)
        else:
            self._reply_line(text)

    def lineLengthExceeded(self, line):
        """``LineOnlyReceiver.lineLengthExceeded``: log the length (never the content) and skip the line."""
        self._log.warn(
            "management line of {length}+ bytes exceeds the {limit}-byte limit; skipped",
            length=len(line),
            limit=self.MAX_LENGTH,
        )

    def connectionLost(self, reason=None):
        """``IProtocol.connectionLost``: fail everything pending, fire disconnect waiters."""
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self.ready = False
        self._cancel_timers()
        self._assembler.reset()
        self._buffer = b""
        why = reason.getErrorMessage() if reason is not None else "unknown reason"
        self._fail_pending(ManagementDisconnected("management connection lost: %s" % why))
        if self._failure is None:
            self._failure = ManagementDisconnected("management connection lost: %s" % why)
        self._fail_ready_waiters(self._failure)
        self._disconnect_value = reason.value if reason is not None else None
        waiters, self._disconnect_waiters = self._disconnect_waiters, []
        for d in waiters:
            d.callback(self._disconnect_value)

    # --- login ---------------------------------------------------------------------------------

    def _password_prompt(self):
        if self._password is None:
            self._log.error("the management interface asks for a password but none is configured")
            self._abort(BadPassword("the server asks for a management password but none is configured"))
        elif self._password_sent:
            self._log.error("the management password was refused")
            self._abort(BadPassword("the management password was refused"))
        else:
            self._password_sent = True
            self._log.debug("sending the management password")
            self.transport.write(self._password + b"\n")

    def _login_line(self, text):
        if text.startswith("SUCCESS:") and "password" in text:
            self._log.debug("management password accepted")
        elif text.startswith("ERROR:") and "password" in text:
            self._log.error("the management password was refused")
            self._abort(BadPassword(_after(text, "ERROR:")))
        else:
            self._log.warn("unexpected line before the management banner: {line}", line=scrub_line(text)[:200])

    def _banner(self, version):
        self.management_version = version
        if version < MIN_MANAGEMENT_VERSION:
            self._log.error(
                "management interface version {version} is too old (need {need}, OpenVPN 2.6)",
                version=version,
                need=MIN_MANAGEMENT_VERSION,
            )
            self._abort(
                ProtocolViolation(
                    "management version %d < %d (OpenVPN older than 2.6)" % (version, MIN_MANAGEMENT_VERSION)
                )
            )
            return
        self.ready = True
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None
        self._log.info("management interface ready (version {version})", version=version)
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(self)
        self._maybe_send_next()

    def _login_timed_out(self):
        self._login_timer = None
        self._log.error("no management banner within {timeout}s; dropping the connection", timeout=self.login_timeout)
        self._abort(CommandTimeout("no management banner within %ss" % (self.login_timeout,)))

    # --- notifications -------------------------------------------------------------------------

    def _notification(self, text):
        if text.startswith(">CLIENT:"):
            event = self._assembler.feed(text)
        else:
            event = parse_notification(text)
        if event is None:
            return
        version = None
        if isinstance(event, Info) and not self.ready:
            match = _BANNER.match(event.text)
            if match:
                version = int(match.group(1))
        self._deliver(event)
        if version is not None and not self.ready and not self._closing:
            self._banner(version)

    def _deliver(self, event):
        try:
            self.notify(event)
        except Exception:
            self._log.failure("the notify hook raised on {event}", event=repr(event))

    # --- replies -------------------------------------------------------------------------------

    def _reply_line(self, text):
        cmd = self._inflight
        if cmd is None:
            self._log.warn("unexpected line with no command in flight: {line}", line=scrub_line(text)[:200])
            return
        if cmd.shape is SINGLE:
            if text.startswith("SUCCESS:"):
                self._finish(cmd, result=_after(text, "SUCCESS:"))
            elif text.startswith("ERROR:"):
                self._finish(cmd, error=CommandFailed(_after(text, "ERROR:")))
            else:
                self._log.error(
                    "reply {line!r} to {command!r} is neither SUCCESS nor ERROR; dropping the connection",
                    line=text[:200],
                    command=cmd.label,
                )
                error = ProtocolViolation("unexpected reply %r to %r" % (text[:200], cmd.label))
                self._abort(error, inflight_error=error)
        elif text == "END":
            self._finish(cmd, result=cmd.lines)
        elif not cmd.lines and text.startswith("ERROR:"):
            self._finish(cmd, error=CommandFailed(_after(text, "ERROR:")))
        else:
            cmd.lines.append(text)

    def _finish(self, cmd, result=None, error=None):
        self._inflight = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not cmd.deferred.called:
            if error is None:
                cmd.deferred.callback(result)
            else:
                cmd.deferred.errback(error)
        self._maybe_send_next()

    def _timed_out(self, cmd):
        self._timer = None
        if self._inflight is not cmd:
            return
        self._log.error(
            "{command!r} got no reply within {timeout}s; dropping the management connection",
            command=cmd.label,
            timeout=self.command_timeout,
        )
        error = CommandTimeout("%r got no reply within %ss" % (cmd.label, self.command_timeout))
        self._abort(error, inflight_error=error)

    # --- queue ---------------------------------------------------------------------------------

    def _enqueue(self, data, shape, label):
        if self._closing:
            return defer.fail(self._disconnected_error())
        cmd = _Command(data, shape, label)

        def cancel(d):
            # Still queued: never send it. On the wire: its reply is read and discarded.
            try:
                self._queue.remove(cmd)
            except ValueError:
                pass

        cmd.deferred = defer.Deferred(cancel)
        self._queue.append(cmd)
        self._maybe_send_next()
        return cmd.deferred

    def _maybe_send_next(self):
        while self.ready and not self._closing and self._inflight is None and self._queue:
            cmd = self._queue.popleft()
            if cmd.shape is NONE:
                self.transport.write(cmd.data)
                if not cmd.deferred.called:
                    cmd.deferred.callback(None)
                continue
            # State first: a synchronous transport may deliver the reply inside write().
            self._inflight = cmd
            if self.command_timeout:
                self._timer = self.clock.callLater(self.command_timeout, self._timed_out, cmd)
            self.transport.write(cmd.data)

    def _disconnected_error(self):
        if self._failure is not None:
            return ManagementDisconnected("management connection unusable: %s" % (self._failure,))
        return ManagementDisconnected("management connection lost")

    def _cancel_timers(self):
        for name in ("_timer", "_login_timer"):
            timer = getattr(self, name)
            if timer is not None:
                setattr(self, name, None)
                if timer.active():
                    timer.cancel()

    def _fail_pending(self, error, inflight_error=None):
        pending = list(self._queue)
        self._queue.clear()
        if self._inflight is not None:
            pending.insert(0, self._inflight)
            self._inflight = None
        for i, cmd in enumerate(pending):
            if not cmd.deferred.called:
                cmd.deferred.errback(inflight_error if (i == 0 and inflight_error is not None) else error)

    def _fail_ready_waiters(self, error):
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.errback(error)

    def _abort(self, reason, inflight_error=None):
        """
        Stop using this connection: fail everything pending and lose the connection.

        :param reason: the :class:`ManagementError` explaining why; ``when_ready()``
            waiters fail with it.
        :param inflight_error: what the command on the wire fails with (default
            :class:`ManagementDisconnected`, like the queued ones).
        """
        if self._closing:
            return
        self._closing = True
        self.ready = False
        self._failure = reason
        self._cancel_timers()
        if self._inflight is None:
            inflight_error = None
        self._fail_pending(self._disconnected_error(), inflight_error)
        self._fail_ready_waiters(reason)
        if self.transport is not None:
            self.transport.loseConnection()

    # --- commands ------------------------------------------------------------------------------

    def command(self, line, shape):
        """
        Queue one command line.

        :param line: the command without terminator, e.g. ``"load-stats"``.
        :param shape: a :class:`ReplyShape` (:data:`SINGLE`, :data:`MULTI` or :data:`NONE`).
        :returns: a Deferred firing with the text after ``SUCCESS:`` (SINGLE), the list
            of lines before ``END`` (MULTI) or ``None`` once written (NONE); failing with
            :class:`CommandFailed`, :class:`CommandTimeout` or :class:`ManagementDisconnected`.
        :raises InvalidArgument: for control characters, an over-long, empty or
            comment-only line (OpenVPN would not answer it), ``version N`` (2.6 never
            answers it) or a verb that starts multi-line input (use :meth:`client_auth`).
        """
        if not isinstance(shape, ReplyShape):
            raise InvalidArgument("shape must be a ReplyShape, not %r" % (shape,))
        data = _encode_line(line)
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            raise InvalidArgument("empty or comment-only command: OpenVPN would not reply")
        verb = _first_word(stripped)
        if verb == "version" and len(stripped.split()) > 1:
            raise InvalidArgument("'version N' is never sent: OpenVPN 2.6 does not reply to it")
        if verb in _MULTILINE_INPUT_VERBS:
            raise InvalidArgument("%r starts multi-line input; use the dedicated method" % verb)
        label = "password [...]" if verb == "password" else line[:80]
        return self._enqueue(data + b"\n", shape, label)

    def single(self, line):
        """
        Send a command answered by one ``SUCCESS:``/``ERROR:`` line.

        :returns: Deferred firing with the text after ``SUCCESS:`` (leading blanks removed).
        """
        return self.command(line, SINGLE)

    def multi(self, line):
        """
        Send a command answered by lines up to ``END`` (or one ``ERROR:`` line).

        :returns: Deferred firing with the list of lines, ``END`` excluded.
        """
        return self.command(line, MULTI)

    def client_auth(self, cid, kid, config_lines):
        """
        Approve a pending key, with client-connect config lines, as one write.

        Sends ``client-auth CID KID``, each config line and ``END``. A config line that
        is ``END`` would close the block early and turn the following lines into
        management commands, so it is refused.

        :param cid: the client id (non-negative int, not bool).
        :param kid: the key id from the same notification.
        :param config_lines: a sequence of str (e.g. ``"ifconfig-push 10.8.0.50 255.255.255.0"``).
        :returns: Deferred firing with e.g. ``"client-auth command succeeded"``.
        :raises InvalidArgument: bad CID/KID, a config line with CR/LF or another
            control character, longer than :data:`MAX_OUTGOING_LINE` bytes, or ``END``.
        """
        cid = _check_id("cid", cid, _MAX_CID)
        kid = _check_id("kid", kid, _MAX_KID)
        if isinstance(config_lines, (str, bytes)):
            raise InvalidArgument("config_lines must be a sequence of lines, not one string")
        head = "client-auth %d %d" % (cid, kid)
        parts = [_encode_line(head)]
        for line in config_lines:
            encoded = _encode_line(line, "config line")
            if line.strip() == "END":
                raise InvalidArgument("a config line must not be END")
            parts.append(encoded)
        parts.append(b"END")
        return self._enqueue(b"\n".join(parts) + b"\n", SINGLE, head)

    def client_auth_nt(self, cid, kid):
        """
        Approve a pending key without config (``client-auth-nt CID KID``).

        :returns: Deferred firing with the SUCCESS text.
        """
        cid = _check_id("cid", cid, _MAX_CID)
        kid = _check_id("kid", kid, _MAX_KID)
        return self.single("client-auth-nt %d %d" % (cid, kid))

    def client_deny(self, cid, kid, reason, client_reason=None):
        """
        Deny a pending key: ``client-deny CID KID "reason" ["client-reason"]``.

        Both texts are quoted with :func:`~ovpnmgr.events.quote` and truncated (on a
        character boundary) to :data:`MAX_ARGUMENT_BYTES` UTF-8 bytes, OpenVPN's
        per-parameter limit, rather than refused.

        :param reason: text for the server log.
        :param client_reason: text the client receives as ``AUTH_FAILED,<client_reason>``,
            e.g. ``"TEMP[backoff 30,advance no]: device offline"``.
        :returns: Deferred firing with the SUCCESS text.
        :raises InvalidArgument: bad CID/KID, control characters, or a line that would
            exceed :data:`MAX_OUTGOING_LINE` bytes.
        """
        cid = _check_id("cid", cid, _MAX_CID)
        kid = _check_id("kid", kid, _MAX_KID)
        line = "client-deny %d %d %s" % (cid, kid, self._argument(reason, "reason"))
        if client_reason is not None:
            line += " " + self._argument(client_reason, "client_reason")
        return self.single(line)

    def client_kill(self, cid, message=None):
        """
        Kill a client instance: ``client-kill CID ["message"]``.

        :param message: e.g. ``"HALT,bye"``; OpenVPN's default is ``RESTART``.
            Quoted and truncated like :meth:`client_deny`'s reasons.
        :returns: Deferred firing with the SUCCESS text.
        """
        cid = _check_id("cid", cid, _MAX_CID)
        line = "client-kill %d" % cid
        if message is not None:
            line += " " + self._argument(message, "message")
        return self.single(line)

    def status3(self):
        """
        :returns: Deferred firing with the :class:`~ovpnmgr.events.Status` of ``status 3``.
        """
        return self.multi("status 3").addCallback(parse_status3)

    def state_on(self):
        """Enable real-time ``>STATE:`` notifications (``state on``)."""
        return self.single("state on")

    def hold_release(self):
        """Release a ``--management-hold`` (``hold release``)."""
        return self.single("hold release")

    def bytecount(self, interval):
        """
        ``bytecount N``: ``>BYTECOUNT_CLI`` every ``interval`` seconds (0 turns it off).

        :raises InvalidArgument: unless ``interval`` is a non-negative int.
        """
        interval = _check_id("interval", interval, 2**31 - 1)
        return self.single("bytecount %d" % interval)

    def pid(self):
        """
        :returns: Deferred firing with OpenVPN's process id (from ``SUCCESS: pid=N``),
            or failing with :class:`ProtocolViolation` if the reply has another form.
        """

        def parse(text):
            match = _PID.match(text)
            if not match:
                raise ProtocolViolation("unexpected pid reply %r" % (text[:80],))
            return int(match.group(1))

        return self.single("pid").addCallback(parse)

    def version(self):
        """
        :returns: Deferred firing with the lines of ``version`` (never ``version N``).
        """
        return self.multi("version")

    @staticmethod
    def _argument(text, what):
        if not isinstance(text, str):
            raise InvalidArgument("%s must be str, not %s" % (what, type(text).__name__))
        try:
            return quote(_truncate_utf8(text, MAX_ARGUMENT_BYTES))
        except ValueError as e:
            raise InvalidArgument("%s: %s" % (what, e)) from None
