# -*- test-case-name: tests.unit.test_testing -*-
"""A scripted fake OpenVPN management peer, for unit tests of code that drives
:class:`~ovpnmgr.protocol.ManagementProtocol`.

Nothing here opens a socket or touches the reactor: a real ``ManagementProtocol`` is
connected to an in-memory transport and the script plays OpenVPN's side with exact
OpenVPN 2.6.14 line formats (CRLF-terminated, ``>CLIENT:`` blocks, ``status 3``).

Typical use::

    from twisted.internet.task import Clock
    from ovpnmgr.testing import ScriptedManagement, connect_env

    clock = Clock()
    script = ScriptedManagement(clock=clock, auto_reply=True)
    controller.attach(script.protocol)         # or set script.protocol.notify yourself
    script.connect()                           # banner; the protocol is now ready
    script.notify_connect(0, 1, connect_env(username="alice", password="pw"))
    assert script.sent_commands()[-1].startswith("client-auth 0 1\\n")
    script.notify_address(0, "10.8.0.50")
    script.notify_established(0, {"common_name": "alice"})
    script.notify_disconnect(0, {"bytes_sent": "100"})
    script.disconnect()                        # connectionLost(ConnectionDone)

With ``auto_reply=True`` every command gets OpenVPN's usual success answer (see
:meth:`ScriptedManagement.set_reply` to change or withhold one, e.g. to test timeouts);
with ``auto_reply=False`` (the default) answer by hand with :meth:`~ScriptedManagement.reply`.

For ``ClientService`` tests, :class:`ScriptedEndpoint` builds the protocol through the
service's factory and attaches a new script to every connection.
"""

import time

from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from ovpnmgr.protocol import PASSWORD_PROMPT, ManagementProtocol

__all__ = [
    "DEFAULT_TITLE",
    "DEFAULT_TIME",
    "banner_line",
    "client_block_lines",
    "connect_env",
    "status3_lines",
    "ScriptedManagement",
    "ScriptedEndpoint",
]

#: ``TITLE`` of a Debian 12 OpenVPN 2.6.14 server's ``status 3``.
DEFAULT_TITLE = (
    "OpenVPN 2.6.14 x86_64-pc-linux-gnu [SSL (OpenSSL)] [LZO] [LZ4] [EPOLL] [PKCS11] [MH/PKTINFO] [AEAD] [DCO]"
)

#: Default "now" (a time_t) of the canned output.
DEFAULT_TIME = 1795375446

_CLIENT_HEADER = (
    "HEADER\tCLIENT_LIST\tCommon Name\tReal Address\tVirtual Address\tVirtual IPv6 Address\tBytes Received\t"
    "Bytes Sent\tConnected Since\tConnected Since (time_t)\tUsername\tClient ID\tPeer ID\tData Channel Cipher"
)
_ROUTING_HEADER = "HEADER\tROUTING_TABLE\tVirtual Address\tCommon Name\tReal Address\tLast Ref\tLast Ref (time_t)"


def _ascii_time(t):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def banner_line(version=5):
    """:returns: the ``>INFO:`` banner line for management ``version`` (no terminator)."""
    return ">INFO:OpenVPN Management Interface Version %d -- type 'help' for more info" % version


def client_block_lines(kind, args, env=None):
    """
    Frame one ``>CLIENT:`` notification block.

    :param kind: ``"CONNECT"``, ``"REAUTH"``, ``"ESTABLISHED"``, ``"DISCONNECT"`` or ``"CR_RESPONSE"``.
    :param args: the header fields after the kind, e.g. ``(cid, kid)``.
    :param env: a mapping of ENV values, written in its iteration order; ``None`` or
        empty gives a header-only block (header then ``>CLIENT:ENV,END``).
    :returns: the lines, without terminators.
    """
    lines = [">CLIENT:%s,%s" % (kind, ",".join(str(a) for a in args))]
    lines.extend(">CLIENT:ENV,%s=%s" % (key, value) for key, value in (env or {}).items())
    lines.append(">CLIENT:ENV,END")
    return lines


def connect_env(username="alice", password="secret", untrusted_ip="198.51.100.7", untrusted_port="50123", **extra):
    """
    A realistic CONNECT environment (``n_clients`` first, as OpenVPN sends it).

    :param extra: more or overriding keys, e.g. ``common_name="alice"``, ``IV_VER="2.6.14"``.
    :returns: a dict of str → str.
    """
    env = {
        "n_clients": "0",
        "password": password,
        "username": username,
        "untrusted_port": str(untrusted_port),
        "untrusted_ip": untrusted_ip,
        "IV_VER": "2.6.14",
        "IV_PLAT": "linux",
        "IV_PROTO": "990",
        "IV_CIPHERS": "AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305",
        "daemon_pid": "4242",
        "daemon_start_time": str(DEFAULT_TIME - 3600),
        "dev": "tun0",
    }
    env.update({key: str(value) for key, value in extra.items()})
    return env


def status3_lines(clients=(), *, title=DEFAULT_TITLE, now=DEFAULT_TIME, dco=False, include_end=False):
    """
    Build a realistic OpenVPN 2.6.14 ``status 3`` reply.

    Each client is a dict; only ``cid`` is required. Keys and defaults:
    ``common_name`` (``"client<cid>"``), ``real_address`` (``"198.51.100.<n>:<port>"``),
    ``virtual_address`` (``""``, meaning *pending*; or pass ``pending=True``),
    ``virtual_ipv6`` (``""``), ``bytes_received``/``bytes_sent`` (0),
    ``connected_since`` (``now - 60``), ``username`` (``"UNDEF"``), ``peer_id`` (the cid),
    ``cipher`` (``"AES-256-GCM"``; ``"BF-CBC"`` for pending rows, as 2.6 shows them),
    ``last_ref`` (``connected_since``). Established clients also get a ``ROUTING_TABLE`` row.

    :param clients: iterable of dicts as above.
    :param title: the ``TITLE`` text.
    :param now: the ``TIME`` time_t.
    :param dco: value of the ``dco_enabled`` global stat.
    :param include_end: append the closing ``END`` line (needed when feeding the lines
        with :meth:`ScriptedManagement.reply`; :func:`~ovpnmgr.events.parse_status3`
        takes them without).
    :returns: list of tab-separated lines without terminators.
    """
    rows = []
    routes = []
    for client in clients:
        cid = int(client["cid"])
        pending = client.get("pending", False) or not client.get("virtual_address", "")
        vaddr = "" if pending else client["virtual_address"]
        real = client.get("real_address", "198.51.100.%d:%d" % (cid % 250 + 1, 50000 + cid))
        common_name = client.get("common_name", "client%d" % cid)
        since = int(client.get("connected_since", now - 60))
        rows.append(
            "\t".join(
                [
                    "CLIENT_LIST",
                    common_name,
                    real,
                    vaddr,
                    client.get("virtual_ipv6", ""),
                    str(client.get("bytes_received", 0)),
                    str(client.get("bytes_sent", 0)),
                    _ascii_time(since),
                    str(since),
                    client.get("username", "UNDEF"),
                    str(cid),
                    str(client.get("peer_id", cid)),
                    client.get("cipher", "BF-CBC" if pending else "AES-256-GCM"),
                ]
            )
        )
        if not pending:
            last_ref = int(client.get("last_ref", since))
            routes.append("\t".join(["ROUTING_TABLE", vaddr, common_name, real, _ascii_time(last_ref), str(last_ref)]))
    lines = ["TITLE\t%s" % title, "TIME\t%s\t%d" % (_ascii_time(now), now), _CLIENT_HEADER]
    lines += rows
    lines.append(_ROUTING_HEADER)
    lines += routes
    lines.append("GLOBAL_STATS\tMax bcast/mcast queue length\t0")
    lines.append("GLOBAL_STATS\tdco_enabled\t%d" % (1 if dco else 0))
    if include_end:
        lines.append("END")
    return lines


class _ScriptTransport(StringTransport):
    """A ``StringTransport`` that tells the script about writes and delivers connectionLost."""

    def __init__(self, script):
        super().__init__()
        self._script = script

    def write(self, data):
        super().write(data)
        self._script._wrote(data)

    def writeSequence(self, data):
        self.write(b"".join(data))

    def loseConnection(self):
        super().loseConnection()
        self._script._lose(Failure(ConnectionDone("the management client closed the connection")))


class ScriptedManagement:
    """
    Plays OpenVPN's side of one management connection for a real protocol instance.

    :ivar protocol: the protocol under test (the one passed in, or a new
        :class:`~ovpnmgr.protocol.ManagementProtocol`). Possibly a ``ClientService``
        proxy; all calls go through it.
    :ivar transport: the in-memory transport; ``transport.value()`` holds the raw bytes.
    :ivar clock: the clock given to a protocol built here.
    :ivar auto_reply: answer commands automatically (see :meth:`set_reply`).
    :ivar status_clients: client dicts for the automatic ``status 3`` reply
        (format of :func:`status3_lines`); change it at will.
    :ivar server_password: the password the fake server expects after a prompt.
    :ivar connected: ``False`` once the connection was lost (either side).
    """

    def __init__(
        self,
        protocol=None,
        *,
        clock=None,
        password=None,
        server_password=None,
        command_timeout=5.0,
        auto_reply=False,
        status_clients=(),
        pid=4242,
        version=5,
    ):
        """
        :param protocol: an unconnected protocol; by default a new
            ``ManagementProtocol(clock, password, command_timeout)``.
        :param clock: the ``IReactorTime`` for a protocol built here (default: a new ``Clock``).
        :param password: the client password for a protocol built here; also the
            default ``server_password``.
        :param server_password: what the fake server accepts; defaults to ``password``.
            If either is set, :meth:`connect` starts with an ``ENTER PASSWORD:`` prompt.
        :param command_timeout: for a protocol built here.
        :param auto_reply: answer commands automatically.
        :param status_clients: rows for the automatic ``status 3`` reply.
        :param pid: what the automatic ``pid`` reply says.
        :param version: management version in the banner and the ``version`` reply.
        """
        self.clock = clock if clock is not None else Clock()
        if protocol is None:
            protocol = ManagementProtocol(self.clock, password=password, command_timeout=command_timeout)
        self.protocol = protocol
        if isinstance(server_password, str):
            server_password = server_password.encode("utf-8")
        if isinstance(password, str):
            password = password.encode("utf-8")
        self.server_password = server_password if server_password is not None else password
        self.auto_reply = auto_reply
        self.status_clients = list(status_clients)
        self.pid = pid
        self.version = version
        self.connected = False
        self.transport = _ScriptTransport(self)
        self._replies = {}
        self._written = b""
        self._lines = []
        self._commands = []
        self._block = None  # lines of a client-auth block being written
        self._block_key = None
        self._hold = False
        self._awaiting_password = False
        self._password_tries = 0

    # --- connection ----------------------------------------------------------------------------

    def connect(self, banner=True, hold=False, greet=True):
        """
        Connect the protocol to the transport and greet it (see :meth:`greet`).

        :param banner: send the banner (making the protocol ready) when no password is
            involved; ``False`` lets you script the login with :meth:`feed`/:meth:`reply`.
        :param hold: follow the banner with ``>HOLD:Waiting for hold release:0``.
        :param greet: ``False`` sends nothing at all (call :meth:`greet` later).
        """
        self.connected = True
        self.protocol.makeConnection(self.transport)
        if greet:
            self.greet(hold=hold, banner=banner)

    def greet(self, hold=False, banner=True):
        """
        What OpenVPN sends first: the ``ENTER PASSWORD:`` prompt when a server password
        is set (the banner follows a correct password), else the banner.

        :param hold: follow the banner with ``>HOLD:Waiting for hold release:0``.
        :param banner: ``False`` sends nothing when no password is involved.
        """
        self._hold = hold
        if self.server_password is not None:
            self.prompt()
        elif banner:
            self.send_banner(hold=hold)

    def prompt(self):
        """Send the unterminated ``ENTER PASSWORD:`` prompt."""
        self._awaiting_password = True
        self.feed(PASSWORD_PROMPT)

    def send_banner(self, hold=False, version=None):
        """Send the ``>INFO:`` banner, optionally followed by a ``>HOLD:`` line."""
        lines = [banner_line(self.version if version is None else version)]
        if hold:
            lines.append(">HOLD:Waiting for hold release:0")
        self.reply(*lines)

    def disconnect(self, reason=None):
        """
        Close the connection from OpenVPN's side.

        :param reason: an exception instance for ``connectionLost`` (default ``ConnectionDone``).
        """
        self.transport.disconnecting = True
        self._lose(Failure(reason if reason is not None else ConnectionDone("OpenVPN closed the connection")))

    def _lose(self, failure):
        if not self.connected:
            return
        self.connected = False
        self.transport.connected = False
        self.protocol.connectionLost(failure)

    # --- feeding -------------------------------------------------------------------------------

    def feed(self, data):
        """Deliver raw bytes (no framing added) to the protocol, if still connected."""
        if self.connected:
            self.protocol.dataReceived(data)

    def reply(self, *lines):
        """Deliver lines, each terminated with ``\\r\\n`` like OpenVPN does, in one read."""
        self.feed(b"".join(line.encode("utf-8") + b"\r\n" for line in lines))

    def notify_connect(self, cid, kid, env=None):
        """``>CLIENT:CONNECT,{cid},{kid}`` + ENV + END (see :func:`connect_env`)."""
        self.reply(*client_block_lines("CONNECT", (cid, kid), env))

    def notify_reauth(self, cid, kid, env=None):
        """``>CLIENT:REAUTH,{cid},{kid}`` + ENV + END."""
        self.reply(*client_block_lines("REAUTH", (cid, kid), env))

    def notify_established(self, cid, env=None):
        """``>CLIENT:ESTABLISHED,{cid}`` + ENV + END."""
        self.reply(*client_block_lines("ESTABLISHED", (cid,), env))

    def notify_disconnect(self, cid, env=None):
        """``>CLIENT:DISCONNECT,{cid}`` + ENV + END; no/empty env gives the header-only form."""
        self.reply(*client_block_lines("DISCONNECT", (cid,), env))

    def notify_cr_response(self, cid, kid, response, env=None):
        """``>CLIENT:CR_RESPONSE,{cid},{kid},{response}`` + ENV + END."""
        self.reply(*client_block_lines("CR_RESPONSE", (cid, kid, response), env))

    def notify_address(self, cid, ip, primary=True):
        """``>CLIENT:ADDRESS,{cid},{ip},1`` (``0`` when not primary): one line, no ENV."""
        self.reply(">CLIENT:ADDRESS,%d,%s,%d" % (cid, ip, 1 if primary else 0))

    def notify_hold(self, seconds=0):
        """``>HOLD:Waiting for hold release:{seconds}``."""
        self.reply(">HOLD:Waiting for hold release:%d" % seconds)

    def notify_state(self, name, description="", tun_ip="", remote_ip="", timestamp=DEFAULT_TIME, rest=",,,"):
        """``>STATE:{timestamp},{name},{description},{tun_ip},{remote_ip}{,rest}``."""
        self.reply(">STATE:%d,%s,%s,%s,%s,%s" % (timestamp, name, description, tun_ip, remote_ip, rest))

    def notify_bytecount(self, cid, bytes_in, bytes_out):
        """``>BYTECOUNT_CLI:{cid},{bytes_in},{bytes_out}``."""
        self.reply(">BYTECOUNT_CLI:%d,%d,%d" % (cid, bytes_in, bytes_out))

    def notify_fatal(self, text="ERROR: Linux route add command failed"):
        """``>FATAL:{text}`` (OpenVPN then resets the socket; call :meth:`disconnect`)."""
        self.reply(">FATAL:%s" % text)

    # --- what the protocol sent ----------------------------------------------------------------

    def sent_lines(self):
        """
        :returns: every complete line the protocol wrote so far (decoded, no ``\\n``),
            including the login password and each line of a ``client-auth`` block.
        """
        return list(self._lines)

    def sent_commands(self):
        """
        :returns: the commands written so far, one string each; a ``client-auth`` block
            is one string with its lines (``END`` included) joined by ``\\n``. The login
            password is not included.
        """
        return list(self._commands)

    def clear_sent(self):
        """Forget what was written so far (also clears ``transport.value()``)."""
        self._lines = []
        self._commands = []
        self.transport.clear()

    # --- automatic replies ---------------------------------------------------------------------

    def set_reply(self, key, lines):
        """
        Override the automatic reply for a command.

        :param key: a full command line (``"status 3"``, or the ``client-auth CID KID``
            header line of a block) or just its verb (``"client-deny"``); a full-line
            match wins.
        :param lines: a list of reply lines, a callable ``f(command) -> list`` (the
            command as in :meth:`sent_commands`), or ``None`` to leave the command
            unanswered (for timeout tests).
        """
        self._replies[key] = lines

    def clear_reply(self, key):
        """Restore the default automatic reply for ``key``."""
        self._replies.pop(key, None)

    def default_reply(self, command):
        """
        OpenVPN 2.6's usual answer to ``command``.

        :param command: one command as in :meth:`sent_commands`.
        :returns: the reply lines.
        """
        words = command.split("\n", 1)[0].split()
        verb = words[0] if words else ""
        arg = words[1] if len(words) > 1 else ""
        if verb in ("client-auth", "client-auth-nt"):
            return ["SUCCESS: client-auth command succeeded"]
        if verb in ("client-deny", "client-kill", "client-pending-auth"):
            return ["SUCCESS: %s command succeeded" % verb]
        if verb == "status":
            return status3_lines(self.status_clients, include_end=True)
        if verb == "state" and arg in ("on", "off"):
            return ["SUCCESS: real-time state notification set to %s" % arg.upper()]
        if verb == "log" and arg in ("on", "off"):
            return ["SUCCESS: real-time log notification set to %s" % arg.upper()]
        if verb == "hold":
            if arg == "release":
                return ["SUCCESS: hold release succeeded"]
            if arg in ("on", "off"):
                return ["SUCCESS: hold flag set to %s" % arg.upper()]
            return ["SUCCESS: hold=0"]
        if verb == "bytecount":
            return ["SUCCESS: bytecount interval changed"]
        if verb == "pid":
            return ["SUCCESS: pid=%d" % self.pid]
        if verb == "load-stats":
            return ["SUCCESS: nclients=%d,bytesin=0,bytesout=0" % len(self.status_clients)]
        if verb == "version" and not arg:
            return [
                "OpenVPN Version: " + DEFAULT_TITLE,
                "Management Version: %d" % self.version,
                "END",
            ]
        if verb == "signal" and arg:
            return ["SUCCESS: signal %s thrown" % arg]
        return ["ERROR: unknown command, enter 'help' for more options"]

    def _wrote(self, data):
        self._written += data
        *complete, self._written = self._written.split(b"\n")
        for raw in complete:
            self._line_written(raw.decode("utf-8", "replace"))

    def _line_written(self, line):
        self._lines.append(line)
        if self._awaiting_password:
            self._check_password(line)
            return
        if self._block is not None:
            self._block.append(line)
            if line == "END":
                command, self._block = "\n".join(self._block), None
                self._command_written(command, self._block_key)
            return
        words = line.split()
        if words and words[0] == "client-auth":
            self._block = [line]
            self._block_key = line
            return
        self._command_written(line, line)

    def _command_written(self, command, key):
        self._commands.append(command)
        if not self.auto_reply:
            return
        verb = key.split()[0] if key.split() else ""
        if key in self._replies:
            lines = self._replies[key]
        elif verb in self._replies:
            lines = self._replies[verb]
        else:
            lines = self.default_reply(command)
        if callable(lines):
            lines = lines(command)
        if lines:
            self.reply(*lines)

    def _check_password(self, line):
        self._awaiting_password = False
        if self.server_password is not None and line.encode("utf-8") == self.server_password:
            self.reply("SUCCESS: password is correct", banner_line(self.version))
            if self._hold:
                self.notify_hold()
            return
        self._password_tries += 1
        if self._password_tries >= 3:
            self.disconnect()
        else:
            self.prompt()


@implementer(IStreamClientEndpoint)
class ScriptedEndpoint:
    """
    An ``IStreamClientEndpoint`` for ``ClientService`` tests: every ``connect(factory)``
    builds a protocol with the (service's) factory, wraps it in a new
    :class:`ScriptedManagement` and connects it. The protocol handed to the service is
    whatever the factory built (``ClientService`` wraps it in a proxy), exactly as with
    a real endpoint.

    Like a real socket, the banner (or password prompt) is not delivered inside
    ``connect()``: it is scheduled on ``clock`` with ``callLater(0, …)``, so the service's
    ``prepareConnection`` runs first. Call ``clock.advance(0)`` to deliver it.

    :ivar scripts: one :class:`ScriptedManagement` per successful connection, in order.
    :ivar fail_next: number of upcoming ``connect`` calls to fail with ``ConnectionRefusedError``.
    """

    def __init__(self, clock, banner=True, hold=False, **script_kwargs):
        """
        :param clock: the ``IReactorTime`` (usually the service's ``Clock``).
        :param banner: greet each new connection (prompt or banner) after ``callLater(0)``.
        :param hold: follow the banner with a ``>HOLD:`` line.
        :param script_kwargs: keyword arguments for :class:`ScriptedManagement`
            (``auto_reply``, ``status_clients``, ``server_password``…).
        """
        self.clock = clock
        self.banner = banner
        self.hold = hold
        self.script_kwargs = dict(script_kwargs, clock=clock)
        self.scripts = []
        self.fail_next = 0

    def connect(self, factory):
        """``IStreamClientEndpoint.connect``."""
        if self.fail_next:
            self.fail_next -= 1
            return defer.fail(ConnectionRefusedError("scripted refusal"))
        protocol = factory.buildProtocol(None)
        script = ScriptedManagement(protocol, **self.script_kwargs)
        self.scripts.append(script)
        script.connect(banner=False, greet=False)
        if self.banner:
            self.clock.callLater(0, script.greet, hold=self.hold)
        return defer.succeed(protocol)
