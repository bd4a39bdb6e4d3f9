# -*- test-case-name: tests.unit.test_upstream,tests.unit.test_mappings -*-
"""Where a client's traffic exits: a device's HTTP CONNECT or SOCKS5 proxy.

:class:`Upstream` is the value type (credentials never appear in ``repr``/``str``, so it can
be logged safely). :func:`dial` opens a TCP connection to the device proxy and hands back a
:class:`HandshakeClient`; its :meth:`~HandshakeClient.handshake` asks the proxy to CONNECT to
the client's original destination and fires with the bytes that followed the proxy's reply.
Failures are typed (:class:`UpstreamError` subclasses with a short ``kind``) so the server can
count them, and every failure resets the device connection (the client gets an RST, see
``notes/transparent-proxy.md`` §4). After the handshake the protocol stays thin: it forwards its
events, including half-closes, to the relay leg given to :meth:`~HandshakeClient.attach`.

Error messages name the device proxy and the destination but never the password or the
``Proxy-Authorization`` value; text echoed by the proxy is scrubbed of both.
"""

import base64
import ipaddress
import re
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

__all__ = [
    "SCHEMES",
    "Upstream",
    "UpstreamError",
    "AuthRefused",
    "Forbidden",
    "Unreachable",
    "HandshakeTimeout",
    "MalformedReply",
    "UpstreamClosed",
    "MAX_STATUS_LINE",
    "MAX_HEAD",
    "MAX_HEADERS",
    "dial",
    "HandshakeClient",
    "HTTPConnectClient",
    "Socks5Client",
]

SCHEMES = {"http": 8080, "socks5": 1080}

MAX_STATUS_LINE = 4096  # bytes, including the line end
MAX_HEAD = 16384  # bytes of status line, headers and the blank line
MAX_HEADERS = 100  # header lines


@dataclass(frozen=True)
class Upstream:
    """A device proxy endpoint; ``username``/``password`` are hidden from repr."""

    scheme: str
    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url):
        """Parse ``http://[user:pass@]host:port`` or ``socks5://…``; raise ValueError naming the problem."""
        if not isinstance(url, str) or not url:
            raise ValueError("expected a proxy URL such as http://user:pass@192.0.2.10:8080")
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise ValueError("unsupported proxy scheme %r (use http or socks5)" % parts.scheme)
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("a proxy URL has no path, query or fragment")
        try:
            port = parts.port
        except ValueError:
            raise ValueError("invalid port in proxy URL")
        host = parts.hostname
        if not host:
            raise ValueError("proxy URL has no host")
        if any(c in host for c in " \r\n\t"):
            raise ValueError("proxy host contains whitespace")
        if host.startswith("[") or ":" in host:
            ipaddress.IPv6Address(host.strip("[]"))
        username = unquote(parts.username) if parts.username is not None else None
        password = unquote(parts.password) if parts.password is not None else None
        return cls(scheme, host, port or SCHEMES[scheme], username, password)

    def __str__(self):
        auth = "%s:***@" % self.username if self.username is not None else ""
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s://%s%s:%d" % (self.scheme, auth, host, self.port)


# --- errors -------------------------------------------------------------------------------------


class UpstreamError(Exception):
    """A device proxy could not give us a tunnel; ``kind`` is a short label for metrics and logs."""

    kind = "error"


class AuthRefused(UpstreamError):
    """HTTP 407, or the SOCKS5 proxy refused our method or our username/password."""

    kind = "auth"


class Forbidden(UpstreamError):
    """HTTP 403 or another 4xx, or SOCKS5 reply 2 (not allowed by ruleset)."""

    kind = "forbidden"


class Unreachable(UpstreamError):
    """The device proxy itself or, by its answer (HTTP 5xx, SOCKS5 1/3/4/5/6), the destination is unreachable."""

    kind = "unreachable"


class HandshakeTimeout(UpstreamError):
    """No complete reply within the handshake timeout."""

    kind = "timeout"


class MalformedReply(UpstreamError):
    """An unparsable, oversized or unexpected reply (also SOCKS5 replies 7 and 8)."""

    kind = "malformed"


class UpstreamClosed(UpstreamError):
    """The device proxy closed or reset the connection before its reply was complete."""

    kind = "closed"


# --- helpers ------------------------------------------------------------------------------------


def _where(upstream):
    """``scheme://host:port`` of a device proxy: the username stays out of error messages too."""
    host = "[%s]" % upstream.host if ":" in upstream.host else upstream.host
    return "device proxy %s://%s:%d" % (upstream.scheme, host, upstream.port)


_NAME = re.compile(r"[A-Za-z0-9._-]+\Z")


def _target(host, port):
    """Validate a destination; return ``(ip or None, ascii name or None, authority)``.

    Raises ValueError before anything is sent, so a bad name can never inject bytes into a
    request line or overflow a SOCKS5 length field.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError("invalid destination port %r" % (port,))
    if not isinstance(host, str) or not host:
        raise ValueError("invalid destination host %r" % (host,))
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if "%" not in bare:
        try:
            ip = ipaddress.ip_address(bare)
        except ValueError:
            pass
        else:
            return ip, None, ("[%s]:%d" if ip.version == 6 else "%s:%d") % (ip.compressed, port)
    name = host.encode("ascii") if host.isascii() else host.encode("idna")
    if not _NAME.match(name.decode("ascii")) or len(name) > 255:
        raise ValueError("destination %r is neither a hostname nor an IP address" % (host[:80],))
    return None, name, "%s:%d" % (name.decode("ascii"), port)


def _printable(text, limit):
    """Printable ASCII only, at most ``limit`` characters: safe inside a log line."""
    text = "".join(c if " " <= c <= "~" else "?" for c in text)
    return text[:limit] + ("..." if len(text) > limit else "")


def _has_credentials(upstream):
    return upstream.username is not None or upstream.password is not None


def _basic_token(upstream):
    """The RFC 7617 Basic credentials, UTF-8 encoded."""
    user, password = upstream.username or "", upstream.password or ""
    if ":" in user:
        raise ValueError("the username contains ':', which Basic authentication cannot carry")
    return base64.b64encode(("%s:%s" % (user, password)).encode("utf-8")).decode("ascii")


class _Context:
    """What an error message needs: which proxy, which destination, which secrets to scrub."""

    def __init__(self, upstream, authority):
        self.where = _where(upstream)
        self.target = "CONNECT %s" % authority
        secrets = []
        if _has_credentials(upstream):
            pair = "%s:%s" % (upstream.username or "", upstream.password or "")
            secrets = [pair, base64.b64encode(pair.encode("utf-8")).decode("ascii"), upstream.password]
        self._secrets = [s for s in secrets if s]

    def error(self, cls, text):
        """A typed error: ``device proxy <url> <text>``."""
        return cls("%s %s" % (self.where, text))

    def text(self, data, limit=60):
        """Proxy-supplied bytes made safe for a log line: secrets removed, printable ASCII, short."""
        text = bytes(data).decode("latin-1")
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return _printable(text, limit)

    def quote(self, data):
        """:meth:`text`, quoted."""
        return repr(self.text(data))


# --- HTTP CONNECT -------------------------------------------------------------------------------

_STATUS = re.compile(rb"HTTP/1\.[0-9] ([0-9]{3})(?: (.*))?\Z", re.DOTALL)


class _HTTPConnectReply:
    """Incremental parser of the head of a CONNECT reply (LF or CRLF line ends, bounded).

    A non-2xx status decides the outcome at once: its headers and body are never read.
    """

    def __init__(self, ctx, credentials_sent):
        self._ctx = ctx
        self._credentials_sent = credentials_sent
        self._buf = bytearray()
        self._size = 0  # bytes of complete head lines consumed so far
        self._status = None
        self._headers = 0

    def feed(self, data):
        """Consume bytes; return ``(b"", leftover)`` once the head is complete, ``(b"", None)`` before.

        :raises UpstreamError: a refusal or a malformed reply.
        """
        self._buf += data
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            self._size += nl + 1
            if self._size > MAX_HEAD:
                raise self._malformed("reply head exceeds %d bytes" % MAX_HEAD)
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if self._status is None:
                if nl + 1 > MAX_STATUS_LINE:
                    raise self._malformed("status line exceeds %d bytes" % MAX_STATUS_LINE)
                self._status_line(line)
            elif not line:
                return b"", bytes(self._buf)
            else:
                self._header_line(line)
        room = MAX_STATUS_LINE if self._status is None else MAX_HEAD - self._size
        if len(self._buf) >= room:
            what = "status line exceeds %d bytes" % MAX_STATUS_LINE if self._status is None else None
            raise self._malformed(what or "reply head exceeds %d bytes" % MAX_HEAD)
        return b"", None

    def _status_line(self, line):
        match = _STATUS.match(line)
        if match is None:
            raise self._malformed("status line %s" % self._ctx.quote(line))
        status = int(match.group(1))
        if 200 <= status < 300:
            self._status = status
            return
        reason = self._ctx.text(match.group(2) or b"")
        text = "answered %d %s to %s" % (status, reason, self._ctx.target)
        if status == 407:
            sent = "credentials were sent" if self._credentials_sent else "no credentials configured"
            raise self._ctx.error(AuthRefused, "%s (%s)" % (text, sent))
        if 400 <= status < 500:
            raise self._ctx.error(Forbidden, text)
        if 500 <= status < 600:
            raise self._ctx.error(Unreachable, text)
        raise self._ctx.error(MalformedReply, "unexpectedly " + text)

    def _header_line(self, line):
        self._headers += 1
        if self._headers > MAX_HEADERS:
            raise self._malformed("more than %d header lines" % MAX_HEADERS)
        if line[:1] in (b" ", b"\t"):  # obsolete line folding: part of the previous header
            return
        name, colon, _ = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise self._malformed("header line %s" % self._ctx.quote(line))

    def _malformed(self, why):
        return self._ctx.error(MalformedReply, "sent a malformed reply to %s: %s" % (self._ctx.target, why))


# --- SOCKS5 -------------------------------------------------------------------------------------

_SOCKS_REPLIES = {
    1: (Unreachable, "general SOCKS server failure"),
    2: (Forbidden, "connection not allowed by ruleset"),
    3: (Unreachable, "network unreachable"),
    4: (Unreachable, "host unreachable"),
    5: (Unreachable, "connection refused"),
    6: (Unreachable, "TTL expired"),
    7: (MalformedReply, "command not supported"),
    8: (MalformedReply, "address type not supported"),
}
_NO_AUTH, _USER_PASS, _NO_ACCEPTABLE = 0x00, 0x02, 0xFF


def _socks_auth(upstream):
    """The RFC 1929 username/password request; ValueError when a field does not fit its length byte."""
    user = (upstream.username or "").encode("utf-8")
    password = (upstream.password or "").encode("utf-8")
    if len(user) > 255 or len(password) > 255:
        raise ValueError("SOCKS5 username and password are limited to 255 bytes each")
    return b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password


def _socks_request(ip, name, port):
    """The RFC 1928 CONNECT request: ATYP 3 for names, 1 for IPv4, 4 for IPv6."""
    if ip is None:
        address = b"\x03" + bytes([len(name)]) + name
    else:
        address = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
    return b"\x05\x01\x00" + address + port.to_bytes(2, "big")


class _Socks5Reply:
    """Incremental parser of the server's side of RFC 1928/1929: method choice, auth status, reply.

    Returns the next client message as soon as the previous server message is complete, and
    copes with every message arriving split at any byte.
    """

    def __init__(self, ctx, auth, request):
        self._ctx = ctx
        self._auth = auth  # RFC 1929 request bytes, or None when no credentials are configured
        self._request = request
        self._buf = bytearray()
        self._step = self._method
        self.bound = None  # (host, port) from BND.ADDR/BND.PORT after success

    def feed(self, data):
        """Consume bytes; return ``(bytes to send, leftover or None)``.

        :raises UpstreamError: a refusal or a malformed reply.
        """
        self._buf += data
        out = []
        while True:
            step = self._step
            result = step(out)
            if result is not None:
                return b"".join(out), result
            if self._step is step:
                return b"".join(out), None

    def _method(self, out):
        if not self._version(5, "method selection"):
            return None
        if len(self._buf) < 2:
            return None
        method = self._buf[1]
        del self._buf[:2]
        offered = _USER_PASS if self._auth is not None else _NO_AUTH
        if method == _NO_ACCEPTABLE:
            what = "username/password" if self._auth is not None else "no authentication"
            raise self._ctx.error(AuthRefused, "accepts none of the offered SOCKS5 methods (offered %s)" % what)
        if method != offered:
            raise self._ctx.error(MalformedReply, "chose SOCKS5 method 0x%02x, which was not offered" % method)
        if self._auth is not None:
            out.append(self._auth)
            self._step = self._auth_status
        else:
            out.append(self._request)
            self._step = self._reply
        return None

    def _auth_status(self, out):
        if not self._version(1, "username/password reply"):
            return None
        if len(self._buf) < 2:
            return None
        status = self._buf[1]
        del self._buf[:2]
        if status != 0:
            raise self._ctx.error(AuthRefused, "rejected the SOCKS5 username/password (RFC 1929 status %d)" % status)
        out.append(self._request)
        self._step = self._reply
        return None

    def _reply(self, out):
        if not self._version(5, "reply") or len(self._buf) < 2:
            return None
        rep = self._buf[1]
        if rep != 0:
            cls, text = _SOCKS_REPLIES.get(rep, (MalformedReply, "unknown reply code"))
            raise self._ctx.error(cls, "refused %s: %s (SOCKS5 reply %d)" % (self._ctx.target, text, rep))
        if len(self._buf) < 5:
            return None
        atyp = self._buf[3]
        if atyp == 1:
            size = 4
        elif atyp == 4:
            size = 16
        elif atyp == 3:
            size = 1 + self._buf[4]
        else:
            raise self._ctx.error(MalformedReply, "sent SOCKS5 reply with unknown address type %d" % atyp)
        end = 4 + size + 2
        if len(self._buf) < end:
            return None
        raw = bytes(self._buf[4 : 4 + size])
        if atyp == 3:
            host = raw[1:].decode("ascii", "replace")
        else:
            host = str(ipaddress.ip_address(raw))
        self.bound = (host, int.from_bytes(self._buf[end - 2 : end], "big"))
        leftover = bytes(self._buf[end:])
        del self._buf[:]
        return leftover

    def _version(self, expected, what):
        """False until the version byte is in; raise at once when it is wrong."""
        if not self._buf:
            return False
        if self._buf[0] != expected:
            raise self._ctx.error(
                MalformedReply, "sent SOCKS5 %s with version %d (expected %d)" % (what, self._buf[0], expected)
            )
        return True


# --- the protocol -------------------------------------------------------------------------------

_IDLE, _HANDSHAKING, _ESTABLISHED, _FAILED = "idle", "handshaking", "established", "failed"


@implementer(IHalfCloseableProtocol)
class HandshakeClient(Protocol):
    """A connection to a device proxy: one handshake, then a thin forwarder to a relay leg.

    Subclasses only build the request and the reply parser (:meth:`_begin`). Half-closes are
    forwarded because the relay must keep the other direction open after a FIN.
    """

    bound = None  # SOCKS5 only: (host, port) the proxy reported as BND.ADDR/BND.PORT

    def __init__(self, reactor, upstream, handshake_timeout):
        self.upstream = upstream
        self._reactor = reactor
        self._handshake_timeout = handshake_timeout
        self._state = _IDLE
        self._gone = None  # "closed"/"reset" once the device connection ended (read side or whole)
        self._unsolicited = 0  # bytes the device sent before we asked anything
        self._ctx = None
        self._parser = None
        self._waiting = None
        self._timer = None
        self._held = deque()
        self._leg = None
        self._aborted = False
        self._lost = False

    def _begin(self, ctx, ip, name, port, authority):
        """Return ``(parser, first bytes to send)``; raise ValueError for unusable input."""
        raise NotImplementedError

    def handshake(self, host, port):
        """Ask the device proxy to connect to ``host``:``port``.

        :param host: a hostname or an IP literal (IPv6 without brackets).
        :returns: Deferred firing with the bytes received after the reply (may be ``b""``), or
            failing with an :class:`UpstreamError`; cancelling it aborts the connection.
        """
        if self._state != _IDLE:
            raise RuntimeError("handshake() was already called on this connection")
        if self.transport is None:
            raise RuntimeError("handshake() needs a connected transport")
        self._state = _HANDSHAKING
        self._waiting = defer.Deferred(self._cancelled)
        self._ctx = _Context(self.upstream, _printable("%s:%s" % (host, port), 100))
        if self._gone is not None:
            return self._finish(self._ctx.error(UpstreamClosed, "%s the connection before the handshake" % self._gone))
        if self._unsolicited:
            return self._finish(self._ctx.error(MalformedReply, "sent %d bytes before the request" % self._unsolicited))
        try:
            ip, name, authority = _target(host, port)
            self._ctx = _Context(self.upstream, authority)
            self._parser, request = self._begin(self._ctx, ip, name, port, authority)
        except ValueError as e:
            return self._finish(UpstreamError("cannot ask %s to %s: %s" % (self._ctx.where, self._ctx.target, e)))
        if self._handshake_timeout is not None:
            self._timer = self._reactor.callLater(self._handshake_timeout, self._timed_out)
        d = self._waiting
        self.transport.write(request)
        return d

    def attach(self, leg):
        """Forward all later events to ``leg``, first replaying those held since the handshake succeeded."""
        if self._state != _ESTABLISHED or self._leg is not None:
            raise RuntimeError("attach() needs a successful handshake and may be called once")
        while self._held:  # events arriving during the replay queue up behind it
            name, args = self._held.popleft()
            getattr(leg, name)(*args)
        self._leg = leg

    def abort(self):
        """Reset the device connection (cancelling a handshake in progress); safe to call any time."""
        if self._waiting is not None:
            self._waiting.cancel()
        else:
            self._reset()

    # Twisted callbacks

    def dataReceived(self, data):
        """IProtocol.dataReceived"""
        if self._state == _HANDSHAKING:
            try:
                reply, leftover = self._parser.feed(data)
            except UpstreamError as e:
                self._finish(e)
                return
            if reply:
                self.transport.write(reply)
            if leftover is not None:
                self._finish(leftover)
        elif self._state == _ESTABLISHED:
            self._forward("dataReceived", data)
        elif self._state == _IDLE:
            self._unsolicited += len(data)

    def readConnectionLost(self):
        """IHalfCloseableProtocol.readConnectionLost"""
        if self._state == _ESTABLISHED:
            self._forward("readConnectionLost")
        else:
            self._ended("closed")

    def writeConnectionLost(self):
        """IHalfCloseableProtocol.writeConnectionLost"""
        if self._state == _ESTABLISHED:
            self._forward("writeConnectionLost")
        else:
            self._ended("closed")

    def connectionLost(self, reason):
        """IProtocol.connectionLost"""
        self._lost = True
        if self._state == _ESTABLISHED:
            self._forward("connectionLost", reason)
        else:
            self._ended("closed" if reason.check(error.ConnectionDone) else "reset")

    # internals

    def _ended(self, how):
        """The device went away outside the relaying phase."""
        if self._gone is None:
            self._gone = how
        if self._state == _HANDSHAKING:
            why = "%s the connection before replying to %s" % (how, self._ctx.target)
            self._finish(self._ctx.error(UpstreamClosed, why))
        elif self._state == _IDLE:
            self._reset()  # a half-open connection to a proxy that hung up is useless

    def _forward(self, name, *args):
        if self._leg is not None:
            getattr(self._leg, name)(*args)
        else:
            self._held.append((name, args))

    def _timed_out(self):
        self._timer = None
        why = "sent no complete reply to %s within %gs" % (self._ctx.target, self._handshake_timeout)
        self._finish(self._ctx.error(HandshakeTimeout, why))

    def _finish(self, result):
        """Settle the handshake exactly once: stop the timer, reset on failure, fire the Deferred.

        Nothing is logged here: the caller logs one line per failed connection, with client context.
        """
        d, self._waiting = self._waiting, None
        self._stop_timer()
        if isinstance(result, UpstreamError):
            self._state = _FAILED
            self._reset()
            d.errback(result)
        else:
            self._state = _ESTABLISHED
            self.bound = getattr(self._parser, "bound", None)
            d.callback(result)
        return d

    def _cancelled(self, d):
        """Canceller of the handshake Deferred (Deferred then fails with CancelledError)."""
        self._waiting = None
        self._stop_timer()
        self._state = _FAILED
        self._reset()

    def _stop_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _reset(self):
        if not self._aborted and not self._lost and self.transport is not None:
            self._aborted = True
            self.transport.abortConnection()


class HTTPConnectClient(HandshakeClient):
    """HTTP CONNECT (RFC 9110 §9.3.6) with pre-sent Basic credentials, so no 407 round trip is needed."""

    def _begin(self, ctx, ip, name, port, authority):
        lines = ["CONNECT %s HTTP/1.1" % authority, "Host: %s" % authority]
        credentials = _has_credentials(self.upstream)
        if credentials:
            lines.append("Proxy-Authorization: Basic %s" % _basic_token(self.upstream))
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
        return _HTTPConnectReply(ctx, credentials), request


class Socks5Client(HandshakeClient):
    """SOCKS5 CONNECT (RFC 1928), offering only username/password (RFC 1929) when credentials exist."""

    def _begin(self, ctx, ip, name, port, authority):
        auth = _socks_auth(self.upstream) if _has_credentials(self.upstream) else None
        greeting = b"\x05\x01" + bytes([_USER_PASS if auth is not None else _NO_AUTH])
        return _Socks5Reply(ctx, auth, _socks_request(ip, name, port)), greeting


_CLIENTS = {"http": HTTPConnectClient, "socks5": Socks5Client}


# --- dialing ------------------------------------------------------------------------------------


class _HandshakeFactory(Factory):
    """Builds the client for one dial; quiet, since there is one factory per connection."""

    noisy = False

    def __init__(self, reactor, upstream, handshake_timeout):
        self._reactor = reactor
        self._upstream = upstream
        self._handshake_timeout = handshake_timeout

    def buildProtocol(self, addr):
        """IProtocolFactory.buildProtocol"""
        return _CLIENTS[self._upstream.scheme](self._reactor, self._upstream, self._handshake_timeout)


def _endpoint(reactor, upstream, connect_timeout):
    """TCP4/TCP6 endpoints for IP literals (no resolver involved), HostnameEndpoint for names."""
    try:
        ip = ipaddress.ip_address(upstream.host)
    except ValueError:
        return HostnameEndpoint(reactor, upstream.host, upstream.port, timeout=connect_timeout)
    cls = TCP4ClientEndpoint if ip.version == 4 else TCP6ClientEndpoint
    return cls(reactor, upstream.host, upstream.port, timeout=connect_timeout)


def dial(reactor, upstream, connect_timeout, handshake_timeout):
    """TCP-connect to a device proxy.

    :param reactor: IReactorTCP + IReactorTime (+ a name resolver for hostnames); also the
        clock of the later handshake timeout.
    :param connect_timeout: seconds for the whole connect, name resolution included.
    :returns: Deferred firing with a connected :class:`HandshakeClient` (HTTPConnectClient or
        Socks5Client by scheme), or failing with :class:`Unreachable`. Cancelling it aborts the
        attempt and fails it with CancelledError.
    """
    if upstream.scheme not in _CLIENTS:
        raise ValueError("unsupported proxy scheme %r" % (upstream.scheme,))
    where = _where(upstream)

    def timed_out(failure, timeout):
        raise Unreachable("%s is unreachable: no connection within %gs" % (where, timeout))

    def failed(failure):
        if failure.check(UpstreamError):
            return failure
        if failure.check(defer.CancelledError, error.ConnectingCancelledError):
            raise defer.CancelledError("dialing %s was cancelled" % where)
        raise Unreachable("%s is unreachable: %s" % (where, failure.getErrorMessage()))

    d = _endpoint(reactor, upstream, connect_timeout).connect(_HandshakeFactory(reactor, upstream, handshake_timeout))
    d.addTimeout(connect_timeout, reactor, onTimeoutCancel=timed_out)
    d.addErrback(failed)
    return d
