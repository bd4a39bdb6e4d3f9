# -*- test-case-name: tests.unit.test_events -*-
"""Parsed OpenVPN management notifications, ``status 3`` output and argument quoting.

Everything here is pure (no I/O, no reactor) so it can be tested line by line:

* :func:`parse_notification` turns one single-line ``>`` notification into an event;
* :class:`ClientBlockAssembler` collects ``>CLIENT:`` header + ``>CLIENT:ENV,…`` lines
  into one event when ``>CLIENT:ENV,END`` arrives (``>CLIENT:ADDRESS`` is a single line);
* :func:`parse_status3` parses the tab-separated ``status 3`` reply by column name;
* :func:`quote` quotes one management-command argument.

Parsing never raises on bad input: a line that cannot be understood becomes an
:class:`Unrecognized` event (and is logged), so a surprising server can never take the
protocol down. The plaintext ``password`` from CONNECT/REAUTH environments is redacted
from every ``repr`` and log line produced here (see :func:`redacted` and
:func:`scrub_line`).
"""

import re
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from twisted.logger import Logger

__all__ = [
    "SENSITIVE_KEYS",
    "REDACTED",
    "Env",
    "redacted",
    "scrub_line",
    "ClientConnect",
    "ClientReauth",
    "ClientEstablished",
    "ClientDisconnect",
    "ClientCrResponse",
    "ClientAddress",
    "Hold",
    "Info",
    "Fatal",
    "Log",
    "State",
    "ByteCountClient",
    "Unrecognized",
    "parse_notification",
    "ClientBlockAssembler",
    "StatusClient",
    "StatusRoute",
    "Status",
    "parse_status3",
    "quote",
]

_log = Logger(namespace="ovpnmgr.events")

#: Environment keys whose values must never appear in a repr or a log line.
SENSITIVE_KEYS = frozenset({"password"})

#: What a sensitive value is replaced with.
REDACTED = "<redacted>"

_DECIMAL = re.compile(r"[0-9]+\Z")


def _uint(text):
    """
    Parse a non-negative ASCII decimal integer strictly.

    ``int()`` alone would also accept ``" 1"``, ``"+1"``, ``"1_0"`` and non-ASCII digits.

    :param text: the candidate string.
    :returns: the integer.
    :raises ValueError: if ``text`` is not made of ASCII digits only.
    """
    if not _DECIMAL.match(text):
        raise ValueError("not a decimal number: %r" % (text[:40],))
    return int(text)


# --- environments and redaction -------------------------------------------------------------


class Env(Mapping):
    """
    An immutable ``str → str`` mapping holding a ``>CLIENT:`` environment.

    It behaves like a read-only dict (``env["username"]``, ``env.get("common_name", "")``,
    ``dict(env)``), compares equal to a dict with the same items and is hashable. Its
    ``repr`` redacts :data:`SENSITIVE_KEYS`, so events carrying it can be logged safely.
    """

    __slots__ = ("_data",)

    def __init__(self, items=()):
        """
        :param items: a mapping or an iterable of ``(key, value)`` pairs; copied.
        """
        object.__setattr__(self, "_data", dict(items))

    def __setattr__(self, name, value):
        raise AttributeError("Env is immutable")

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self):
        return len(self._data)

    def __hash__(self):
        return hash(frozenset(self._data.items()))

    def __reduce__(self):
        return (Env, (self._data,))

    def __repr__(self):
        return "Env(%r)" % (redacted(self),)

    __str__ = __repr__


def redacted(env):
    """
    Return a plain dict copy of ``env`` with sensitive values replaced by :data:`REDACTED`.

    :param env: any ``str → str`` mapping (an :class:`Env` or a dict).
    :returns: a new dict, safe to log.
    """
    return {key: (REDACTED if key in SENSITIVE_KEYS else value) for key, value in env.items()}


_SENSITIVE_ENV_LINE = re.compile(r"(>CLIENT:ENV,(?:%s)=).*\Z" % "|".join(map(re.escape, sorted(SENSITIVE_KEYS))), re.S)


def scrub_line(line):
    """
    Return ``line`` with the value of a sensitive ``>CLIENT:ENV,key=value`` line redacted.

    Use it on every raw line before logging it.

    :param line: one decoded line, without its terminator.
    :returns: the line, or its redacted form.
    """
    return _SENSITIVE_ENV_LINE.sub(lambda m: m.group(1) + REDACTED, line)


def _env_field():
    return field(default_factory=Env)


class _FreezeEnv:
    """Mixin: make sure an event's ``env`` is an :class:`Env` (immutable, redacting repr)."""

    def __post_init__(self):
        if not isinstance(self.env, Env):
            object.__setattr__(self, "env", Env(self.env))


# --- events -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientConnect(_FreezeEnv):
    """``>CLIENT:CONNECT,{CID},{KID}`` + ENV: a new client awaits ``client-auth``/``client-deny``."""

    cid: int
    kid: int
    env: Mapping = _env_field()


@dataclass(frozen=True)
class ClientReauth(_FreezeEnv):
    """``>CLIENT:REAUTH,{CID},{KID}`` + ENV: TLS renegotiation of an established client."""

    cid: int
    kid: int
    env: Mapping = _env_field()


@dataclass(frozen=True)
class ClientEstablished(_FreezeEnv):
    """``>CLIENT:ESTABLISHED,{CID}`` + ENV: the client is admitted and configured."""

    cid: int
    env: Mapping = _env_field()


@dataclass(frozen=True)
class ClientDisconnect(_FreezeEnv):
    """``>CLIENT:DISCONNECT,{CID}`` + ENV; ``env`` is empty for never-admitted clients."""

    cid: int
    env: Mapping = _env_field()


@dataclass(frozen=True)
class ClientCrResponse(_FreezeEnv):
    """``>CLIENT:CR_RESPONSE,{CID},{KID},{base64}`` + ENV; ``response`` is kept out of ``repr``."""

    cid: int
    kid: int
    response: str = field(repr=False)
    env: Mapping = _env_field()


@dataclass(frozen=True)
class ClientAddress:
    """``>CLIENT:ADDRESS,{CID},{ADDR},{PRI}``: a single line, no ENV block."""

    cid: int
    address: str
    primary: bool


@dataclass(frozen=True)
class Hold:
    """``>HOLD:…``: OpenVPN waits for ``hold release``."""

    text: str


@dataclass(frozen=True)
class Info:
    """``>INFO:…``, including the banner."""

    text: str


@dataclass(frozen=True)
class Fatal:
    """``>FATAL:…``, sent right before OpenVPN resets the management socket."""

    text: str


@dataclass(frozen=True)
class Log:
    """``>LOG:{time},{flags},{text}`` (after ``log on``)."""

    timestamp: int
    flags: str
    text: str


@dataclass(frozen=True)
class State:
    """
    ``>STATE:{time},{STATE},{desc},{tun_ip},{remote_ip},…`` (after ``state on``).

    ``fields`` holds every raw comma-separated field, the timestamp included, so later
    fields (ports, local address, IPv6) are available without a new release.
    """

    timestamp: int
    name: str
    description: str
    tun_ip: str
    remote_ip: str
    fields: tuple


@dataclass(frozen=True)
class ByteCountClient:
    """``>BYTECOUNT_CLI:{CID},{bytes_in},{bytes_out}`` (after ``bytecount N``)."""

    cid: int
    bytes_in: int
    bytes_out: int


@dataclass(frozen=True)
class Unrecognized:
    """A ``>`` line that is unknown or malformed; harmless, for logging only."""

    line: str

    def __repr__(self):
        return "Unrecognized(line=%r)" % (scrub_line(self.line),)


# --- single-line notifications ---------------------------------------------------------------


def _parse_log(rest):
    timestamp, flags, text = rest.split(",", 2)
    return Log(_uint(timestamp), flags, text)


def _parse_state(rest):
    fields = tuple(rest.split(","))
    if len(fields) < 2:
        raise ValueError("too few fields")
    padded = fields + ("",) * (5 - len(fields))
    return State(_uint(fields[0]), padded[1], padded[2], padded[3], padded[4], fields)


def _parse_bytecount_cli(rest):
    cid, bytes_in, bytes_out = rest.split(",")
    return ByteCountClient(_uint(cid), _uint(bytes_in), _uint(bytes_out))


def _parse_address(rest):
    cid, address, primary = rest.split(",")
    if primary not in ("0", "1") or not address:
        raise ValueError("bad address or primary flag")
    return ClientAddress(_uint(cid), address, primary == "1")


_SINGLE_LINE = {
    ">INFO:": Info,
    ">HOLD:": Hold,
    ">FATAL:": Fatal,
    ">LOG:": _parse_log,
    ">STATE:": _parse_state,
    ">BYTECOUNT_CLI:": _parse_bytecount_cli,
    ">CLIENT:ADDRESS,": _parse_address,
}


def parse_notification(line):
    """
    Parse one single-line real-time notification.

    :param line: one decoded line without its line terminator.
    :returns: an event; :class:`Unrecognized` for an unknown or malformed ``>`` line;
        ``None`` for a line that is not a notification (no leading ``>``) and for the
        ``>CLIENT:`` lines that belong to a header + ENV block (feed those to a
        :class:`ClientBlockAssembler`). ``>CLIENT:ADDRESS,…`` *is* handled here.
    """
    if not line.startswith(">"):
        return None
    for prefix, parse in _SINGLE_LINE.items():
        if line.startswith(prefix):
            try:
                return parse(line[len(prefix) :])
            except ValueError:
                _log.warn("malformed notification: {line}", line=scrub_line(line))
                return Unrecognized(line)
    if line.startswith(">CLIENT:"):
        return None
    return Unrecognized(line)


# --- >CLIENT: blocks ---------------------------------------------------------------------------


def _hdr_cid_kid(rest):
    cid, kid = rest.split(",")[:2]
    return _uint(cid), _uint(kid)


def _hdr_cid(rest):
    return (_uint(rest.split(",")[0]),)


def _hdr_cr_response(rest):
    cid, kid, response = rest.split(",", 2)
    return _uint(cid), _uint(kid), response


#: header kind → (argument parser, event class)
_BLOCK_KINDS = {
    "CONNECT": (_hdr_cid_kid, ClientConnect),
    "REAUTH": (_hdr_cid_kid, ClientReauth),
    "ESTABLISHED": (_hdr_cid, ClientEstablished),
    "DISCONNECT": (_hdr_cid, ClientDisconnect),
    "CR_RESPONSE": (_hdr_cr_response, ClientCrResponse),
}

_CLIENT = ">CLIENT:"
_ENV = ">CLIENT:ENV,"
_ENV_END = ">CLIENT:ENV,END"


class ClientBlockAssembler:
    """
    Assemble ``>CLIENT:`` notifications into events.

    Feed it every line that starts with ``>CLIENT:``, in order. OpenVPN writes a
    CONNECT/REAUTH/ESTABLISHED/DISCONNECT/CR_RESPONSE header, its ``>CLIENT:ENV,…``
    lines and the closing ``>CLIENT:ENV,END`` atomically; ``>CLIENT:ADDRESS,…`` is a
    single line with no ENV block and is returned at once (it never joins a block).

    Robustness rules (nothing here raises):

    * a header arriving while a block is open discards the incomplete block (logged);
    * a malformed or unknown header yields :class:`Unrecognized` at once, and the ENV
      lines that follow it are swallowed up to their END;
    * an ENV line outside any block yields :class:`Unrecognized`.
    """

    _log = Logger()

    def __init__(self):
        self._kind = None  # (event class, header args) of the open block
        self._env = {}
        self._discarding = False

    @property
    def in_block(self):
        """``True`` while a header was seen and its ``>CLIENT:ENV,END`` was not."""
        return self._kind is not None

    def reset(self):
        """Forget any partial block (e.g. when the connection is lost)."""
        self._kind = None
        self._env = {}
        self._discarding = False

    def feed(self, line):
        """
        Consume one ``>CLIENT:`` line.

        :param line: the decoded line, without its terminator.
        :returns: a complete event, an :class:`Unrecognized`, or ``None`` while a block is
            still being collected (or a line was swallowed).
        """
        if line.startswith(_ENV):
            return self._feed_env(line)
        if line.startswith(">CLIENT:ADDRESS,"):
            return parse_notification(line)
        if not line.startswith(_CLIENT):
            return parse_notification(line) or Unrecognized(line)
        if self._kind is not None:
            self._log.warn("incomplete >CLIENT: block for {event} discarded", event=self._kind[0].__name__)
        self.reset()
        kind, _, rest = line[len(_CLIENT) :].partition(",")
        entry = _BLOCK_KINDS.get(kind)
        try:
            if entry is None:
                raise ValueError("unknown >CLIENT: notification")
            args = entry[0](rest)
        except ValueError as e:
            self._log.warn("malformed >CLIENT: header ({why}): {line}", why=str(e), line=scrub_line(line))
            self._discarding = True
            return Unrecognized(line)
        self._kind = (entry[1], args)
        return None

    def _feed_env(self, line):
        if self._kind is None:
            if self._discarding:
                if line == _ENV_END:
                    self._discarding = False
                return None
            self._log.warn("ENV line outside a >CLIENT: block: {line}", line=scrub_line(line))
            return Unrecognized(line)
        if line == _ENV_END:
            cls, args = self._kind
            env = Env(self._env)
            self.reset()
            return cls(*args, env=env)
        key, _, value = line[len(_ENV) :].partition("=")
        # ENV lines come newest-first; keep the first occurrence of a repeated key.
        self._env.setdefault(key, value)
        return None


# --- status 3 ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusClient:
    """One ``CLIENT_LIST`` row of ``status 3`` (established or pending)."""

    common_name: str
    real_address: str
    virtual_address: str
    virtual_ipv6: str
    bytes_received: int
    bytes_sent: int
    connected_since: int
    username: str
    cid: int
    peer_id: str
    cipher: str

    @property
    def pending(self):
        """``True`` for a client still awaiting authentication (no virtual address yet)."""
        return self.virtual_address == ""


@dataclass(frozen=True)
class StatusRoute:
    """One ``ROUTING_TABLE`` row of ``status 3``."""

    virtual_address: str
    common_name: str
    real_address: str
    last_ref: int


@dataclass(frozen=True)
class Status:
    """
    A parsed ``status 3`` reply.

    ``global_stats`` (an addition to the minimal API) maps each ``GLOBAL_STATS`` name to
    its raw value, e.g. ``{"dco_enabled": "0"}``.
    """

    title: str
    time: int
    clients: tuple
    routes: tuple
    global_stats: Mapping = field(default_factory=lambda: MappingProxyType({}), hash=False)


#: column name → (StatusClient field, converter); by name, never by position.
_CLIENT_COLUMNS = {
    "Common Name": ("common_name", str),
    "Real Address": ("real_address", str),
    "Virtual Address": ("virtual_address", str),
    "Virtual IPv6 Address": ("virtual_ipv6", str),
    "Bytes Received": ("bytes_received", _uint),
    "Bytes Sent": ("bytes_sent", _uint),
    "Connected Since (time_t)": ("connected_since", _uint),
    "Username": ("username", str),
    "Client ID": ("cid", _uint),
    "Peer ID": ("peer_id", str),
    "Data Channel Cipher": ("cipher", str),
}
_CLIENT_REQUIRED = ("cid",)
_CLIENT_DEFAULTS = {
    "common_name": "",
    "real_address": "",
    "virtual_address": "",
    "virtual_ipv6": "",
    "bytes_received": 0,
    "bytes_sent": 0,
    "connected_since": 0,
    "username": "",
    "peer_id": "",
    "cipher": "",
}

_ROUTE_COLUMNS = {
    "Virtual Address": ("virtual_address", str),
    "Common Name": ("common_name", str),
    "Real Address": ("real_address", str),
    "Last Ref (time_t)": ("last_ref", _uint),
}
_ROUTE_REQUIRED = ("virtual_address",)
_ROUTE_DEFAULTS = {"common_name": "", "real_address": "", "last_ref": 0}

#: The 2.6/2.7 headers, used only if a row arrives before its HEADER line.
_DEFAULT_HEADERS = {
    "CLIENT_LIST": (
        "Common Name",
        "Real Address",
        "Virtual Address",
        "Virtual IPv6 Address",
        "Bytes Received",
        "Bytes Sent",
        "Connected Since",
        "Connected Since (time_t)",
        "Username",
        "Client ID",
        "Peer ID",
        "Data Channel Cipher",
    ),
    "ROUTING_TABLE": ("Virtual Address", "Common Name", "Real Address", "Last Ref", "Last Ref (time_t)"),
}


def _build_row(cls, columns, required, defaults, header, values):
    kwargs = dict(defaults)
    seen = set()
    for name, value in zip(header, values):
        spec = columns.get(name)
        if spec is not None:
            kwargs[spec[0]] = spec[1](value)
            seen.add(spec[0])
    missing = [name for name in required if name not in seen]
    if missing:
        raise ValueError("missing column(s) %s" % ", ".join(missing))
    return cls(**kwargs)


def parse_status3(lines):
    """
    Parse the lines of a ``status 3`` reply (between the command and ``END``).

    Columns are located by the names on the ``HEADER`` lines, so reordered or extra
    columns (2.7) are fine; unknown columns are ignored. A row that cannot be parsed
    (bad number, missing ``Client ID``) is skipped and logged, never fatal. A trailing
    ``END`` line, if passed, is ignored.

    :param lines: the reply lines, as decoded strings without terminators.
    :returns: a :class:`Status`.
    """
    title = ""
    when = 0
    headers = dict(_DEFAULT_HEADERS)
    clients = []
    routes = []
    stats = {}
    for line in lines:
        if line == "END":
            continue
        fields = line.split("\t")
        tag = fields[0]
        try:
            if tag == "TITLE":
                title = "\t".join(fields[1:])
            elif tag == "TIME":
                when = _uint(fields[-1]) if len(fields) >= 3 else 0
            elif tag == "HEADER" and len(fields) >= 2:
                headers[fields[1]] = tuple(fields[2:])
            elif tag == "CLIENT_LIST":
                clients.append(
                    _build_row(
                        StatusClient,
                        _CLIENT_COLUMNS,
                        _CLIENT_REQUIRED,
                        _CLIENT_DEFAULTS,
                        headers["CLIENT_LIST"],
                        fields[1:],
                    )
                )
            elif tag == "ROUTING_TABLE":
                routes.append(
                    _build_row(
                        StatusRoute,
                        _ROUTE_COLUMNS,
                        _ROUTE_REQUIRED,
                        _ROUTE_DEFAULTS,
                        headers["ROUTING_TABLE"],
                        fields[1:],
                    )
                )
            elif tag == "GLOBAL_STATS" and len(fields) >= 3:
                stats[fields[1]] = fields[2]
        except ValueError as e:
            _log.warn("status 3: skipping unparsable {tag} row ({why})", tag=tag[:40], why=str(e))
    return Status(title, when, tuple(clients), tuple(routes), MappingProxyType(stats))


# --- quoting -----------------------------------------------------------------------------------


def quote(arg):
    """
    Quote one argument of a management command.

    OpenVPN parses management commands with its config-file lexer: inside double
    quotes, ``\\\\`` stands for ``\\`` and ``\\"`` for ``"``. Any other backslash
    sequence makes OpenVPN reject the whole line, and the input reader splits on
    ``\\n`` and silently drops control characters, so those are refused here.

    :param arg: the argument text.
    :returns: the argument wrapped in double quotes with ``\\`` and ``"`` escaped.
    :raises ValueError: if ``arg`` contains a control character (``\\r``, ``\\n``,
        NUL, tab, DEL, C1 controls…) or a lone surrogate.
    :raises TypeError: if ``arg`` is not a ``str``.
    """
    if not isinstance(arg, str):
        raise TypeError("management arguments must be str, not %s" % type(arg).__name__)
    for ch in arg:
        if unicodedata.category(ch) in ("Cc", "Cs"):
            raise ValueError("control character %r not allowed in a management argument" % ch)
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
