# -*- test-case-name: tests.unit.test_upstream,tests.unit.test_mappings -*-
"""Where a client's traffic exits: a device's HTTP CONNECT or SOCKS5 proxy.

:class:`Upstream` is the value type (credentials never appear in ``repr``/``str``, so it can
be logged safely). :func:`dial` opens a TCP connection to the device proxy (``connectTCP``
itself for IP literals, so no endpoint wrapper sits between the socket and the protocol) and
hands back a :class:`HandshakeClient`; its :meth:`~HandshakeClient.handshake` asks the proxy to CONNECT to
the client's original destination and fires with the bytes that followed the proxy's reply.
This module holds what both protocols share (the connection, its timer, the error context);
their wire formats are in :mod:`proxy.httpconnect` and :mod:`proxy.socks5`.
Failures are typed (:class:`~proxy.upstreamerrors.UpstreamError` subclasses with a short
``kind``) so the server can count them, and every failure resets the device connection (the
client gets an RST, see ``notes/transparent-proxy.md`` §4). After the handshake the protocol
stays thin: it forwards its events, including half-closes, to the relay leg given to
:meth:`~HandshakeClient.attach` (its chunks go to the leg directly). :mod:`proxy.tunnel`
is how callers use all this.

Error messages name the device proxy and the destination but never the password or the
``Proxy-Authorization`` value; text echoed by the proxy is scrubbed of both.
"""

import base64
import functools
import ipaddress
import re
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from zope.interface import implementer

from proxy import httpconnect, socks5
from proxy.upstreamerrors import HandshakeTimeout, MalformedReply, Unreachable, UpstreamClosed, UpstreamError

__all__ = [
    "SCHEMES",
    "Upstream",
    "dial",
    "HandshakeClient",
    "HTTPConnectClient",
    "Socks5Client",
]

SCHEMES = {"http": 8080, "socks5": 1080}


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

    @functools.cached_property
    def is_ip(self):
        """The host is an IP literal (dialled directly, no resolver)."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self):
        auth = "%s:***@" % self.username if self.username is not None else ""
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s://%s%s:%d" % (self.scheme, auth, host, self.port)


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


# --- the protocol -------------------------------------------------------------------------------

_IDLE, _HANDSHAKING, _ESTABLISHED, _FAILED = "idle", "handshaking", "established", "failed"


@implementer(IHalfCloseableProtocol)
class HandshakeClient(Protocol):
    """A connection to a device proxy: one handshake, then a thin forwarder to a relay leg.

    Subclasses only build the request and the reply parser (:meth:`_begin`). Half-closes are
    forwarded because the relay must keep the other direction open after a FIN.
    """

    bound = None  # SOCKS5 only: (host, port) the proxy reported as BND.ADDR/BND.PORT
    on_connected = None  # f(self) once connected (a direct dial's completion)

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

    def attach(self, leg, first=b""):
        """Forward all later events to ``leg``: first ``first`` (the bytes that followed the
        proxy's reply), then the events held since the handshake succeeded, then live ones.
        From then on a chunk from the device goes to ``leg.dataReceived`` directly."""
        if self._state != _ESTABLISHED or self._leg is not None:
            raise RuntimeError("attach() needs a successful handshake and may be called once")
        if first:
            self._held.appendleft(("dataReceived", (first,)))
        while self._held:  # events arriving during the replay queue up behind it
            name, args = self._held.popleft()
            getattr(leg, name)(*args)
        self._leg = leg
        self._held = None  # never used again (an empty deque is 600 bytes per idle connection)
        self.dataReceived = leg.dataReceived  # one hop per chunk: the transport calls the leg

    def abort(self):
        """Reset the device connection (cancelling a handshake in progress); safe to call any time."""
        if self._waiting is not None:
            self._waiting.cancel()
        else:
            self._reset()

    # Twisted callbacks

    def connectionMade(self):
        """IProtocol.connectionMade"""
        hook, self.on_connected = self.on_connected, None
        if hook is not None:
            hook(self)

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
        credentials = _has_credentials(self.upstream)
        token = httpconnect.basic_token(self.upstream) if credentials else None
        return httpconnect.HTTPConnectReply(ctx, credentials), httpconnect.connect_request(authority, token)


class Socks5Client(HandshakeClient):
    """SOCKS5 CONNECT (RFC 1928), offering only username/password (RFC 1929) when credentials exist."""

    def _begin(self, ctx, ip, name, port, authority):
        auth = socks5.auth_request(self.upstream) if _has_credentials(self.upstream) else None
        greeting = socks5.greeting(auth)
        return socks5.Socks5Reply(ctx, auth, socks5.connect_request(ip, name, port)), greeting


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


class _DirectDial(ClientFactory):
    """One dial to an IP literal with ``connectTCP`` itself: no endpoint wrapper, so the device's
    transport delivers straight to the :class:`HandshakeClient` (and, once attached, to the relay)."""

    noisy = False

    def __init__(self, reactor, upstream, connect_timeout, handshake_timeout, where):
        self._reactor = reactor
        self._upstream = upstream
        self._handshake_timeout = handshake_timeout
        self._where = where
        self._connect_timeout = connect_timeout
        self.result = defer.Deferred(self._cancel)
        self._giving_up = False
        self._timer = reactor.callLater(connect_timeout, self._timed_out)
        # Our timer is the only one (the connector's own would be a second per dial).
        self._connector = reactor.connectTCP(upstream.host, upstream.port, self, timeout=None)

    def buildProtocol(self, addr):
        """IProtocolFactory.buildProtocol"""
        protocol = _CLIENTS[self._upstream.scheme](self._reactor, self._upstream, self._handshake_timeout)
        protocol.on_connected = self._connected
        return protocol

    def _connected(self, protocol):
        self._stop_timer()
        result, self.result = self.result, None  # the connector keeps this factory as long as the connection
        self._connector = None
        if result.called:  # cancelled or timed out just before the connect completed
            protocol.transport.abortConnection()
        else:
            result.callback(protocol)

    def clientConnectionFailed(self, connector, reason):
        """IProtocolFactory (ClientFactory): the TCP connect failed (or we stopped it)."""
        self._stop_timer()
        if self.result is not None and not self.result.called and not self._giving_up:
            self.result.errback(Unreachable("%s is unreachable: %s" % (self._where, reason.getErrorMessage())))

    def _timed_out(self):
        self._timer = None
        self._stop_connecting()
        if not self.result.called:
            why = "%s is unreachable: no connection within %gs" % (self._where, self._connect_timeout)
            self.result.errback(Unreachable(why))

    def _cancel(self, d):
        self._stop_timer()
        self._stop_connecting()
        d.errback(defer.CancelledError("dialing %s was cancelled" % self._where))

    def _stop_connecting(self):
        """Give up the attempt; its clientConnectionFailed (synchronous) is ours, not news."""
        self._giving_up = True
        if self._connector is None:
            return
        try:
            self._connector.stopConnecting()
        except error.NotConnectingError:
            pass

    def _stop_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


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
    if upstream.is_ip:
        return _DirectDial(reactor, upstream, connect_timeout, handshake_timeout, where).result

    def timed_out(failure, timeout):
        raise Unreachable("%s is unreachable: no connection within %gs" % (where, timeout))

    def failed(failure):
        if failure.check(UpstreamError):
            return failure
        if failure.check(defer.CancelledError, error.ConnectingCancelledError):
            raise defer.CancelledError("dialing %s was cancelled" % where)
        raise Unreachable("%s is unreachable: %s" % (where, failure.getErrorMessage()))

    endpoint = HostnameEndpoint(reactor, upstream.host, upstream.port, timeout=connect_timeout)
    d = endpoint.connect(_HandshakeFactory(reactor, upstream, handshake_timeout))
    d.addTimeout(connect_timeout, reactor, onTimeoutCancel=timed_out)
    d.addErrback(failed)
    return d
