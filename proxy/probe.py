# -*- test-case-name: tests.unit.test_probe -*-
"""One health probe of a device: a request through the phone's own proxy, timed.

The probe goes the way customers' traffic goes (dial the phone's proxy, CONNECT or SOCKS5 to
the target, speak to it), so it fails when their traffic would. With an ``http(s)://`` target
the answer's body is the address the target saw: the phone's **exit address** (any complete
HTTP answer proves the phone carried the request; a body that is not an address only leaves
the exit address unknown). A ``tcp://host:port`` target needs no third party at all: the
tunnel being opened is the proof, and there is no exit address.
"""

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.protocol import Factory, Protocol

from proxy.tunnel import open_tunnel
from proxy.tunnelendpoint import TunnelEndpoint
from proxy.upstream import dial
from proxy.upstreamerrors import UpstreamError

__all__ = ["ProbeTarget", "ProbeResult", "ProbeFailed", "probe"]

MAX_ANSWER = 8192  # bytes of an HTTP answer read (status line, headers and body)


@dataclass(frozen=True)
class ProbeTarget:
    """Where a probe goes: ``http://host[:port]/path``, ``https://...`` or ``tcp://host:port``."""

    scheme: str
    host: str
    port: int
    path: str = "/"
    ca_file: str | None = None  # https only: the CA file to verify against (None: the system store)

    @classmethod
    def parse(cls, url, ca_file=None):
        """:raises ValueError: with what is wrong with ``url``."""
        if not isinstance(url, str):
            raise ValueError("expected a URL string, got %r" % (url,))
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https", "tcp"):
            raise ValueError("scheme must be http, https or tcp, got %r" % (url,))
        try:
            port = parts.port
        except ValueError:
            raise ValueError("bad port in %r" % (url,)) from None
        if not parts.hostname:
            raise ValueError("no host in %r" % (url,))
        if parts.username or parts.password:
            raise ValueError("a probe target carries no credentials: %r" % (url,))
        if parts.scheme == "tcp":
            if port is None or parts.path not in ("", "/") or parts.query:
                raise ValueError("expected tcp://host:port, got %r" % (url,))
            return cls("tcp", parts.hostname, port)
        if port is None:
            port = 443 if parts.scheme == "https" else 80
        path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        return cls(parts.scheme, parts.hostname, port, path, ca_file if parts.scheme == "https" else None)

    def __str__(self):
        host = "[%s]" % self.host if ":" in self.host else self.host
        if self.scheme == "tcp":
            return "tcp://%s:%d" % (host, self.port)
        return "%s://%s:%d%s" % (self.scheme, host, self.port, self.path)


@dataclass(frozen=True)
class ProbeResult:
    """A probe that got through: how long it took (dial, tunnel, request and answer), the exit
    address the target reported (None when it reports none), and the HTTP status (None: tcp)."""

    rtt: float
    exit_address: object = None
    status: int | None = None


class ProbeFailed(Exception):
    """The device did not carry the probe; ``kind`` labels why (metrics and logs)."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


def probe(reactor, upstream, target, timeout, dial=dial, tls_options=None):
    """Probe ``target`` through ``upstream``; every step within ``timeout`` seconds in all.

    :param tls_options: ``host -> IOpenSSLClientConnectionCreator`` for https targets
        (:func:`proxy.dnsdoh.tls_options` by default).
    :returns: Deferred firing a :class:`ProbeResult` or failing with :class:`ProbeFailed`.
    """
    return _Probe(reactor, upstream, target, timeout, dial, tls_options).result


class _Probe:
    def __init__(self, reactor, upstream, target, timeout, dial, tls_options):
        self.reactor = reactor
        self.target = target
        self.started = reactor.seconds()
        self.result = defer.Deferred()
        self.exchange = None
        self.timer = reactor.callLater(timeout, self._timed_out, timeout)
        if target.scheme == "tcp":
            self.step = open_tunnel(reactor, upstream, (target.host, target.port), timeout, timeout, dial)
            self.step.addCallbacks(self._tunnelled, self._failed)
            return
        endpoint = TunnelEndpoint(reactor, upstream, target.host, target.port, timeout, timeout, close_grace=1.0, dial=dial)
        if target.scheme == "https":
            if tls_options is None:
                from proxy.dnsdoh import tls_options as default_tls

                tls_options = lambda host: default_tls(host, target.ca_file)  # noqa: E731
            endpoint = wrapClientTLS(tls_options(target.host), endpoint)
        self.step = endpoint.connect(Factory.forProtocol(lambda: _Exchange(self)))
        self.step.addCallbacks(self._connected, self._failed)

    def _tunnelled(self, tunnel):
        self.step = None
        tunnel.abort()
        self._succeed(ProbeResult(self.reactor.seconds() - self.started))

    def _connected(self, exchange):
        self.step = None
        self.exchange = exchange
        if self.result.called:
            exchange.transport.abortConnection()

    def _failed(self, failure):
        self.step = None
        if self.result.called:
            return None
        if failure.check(UpstreamError):
            self._fail(failure.value.kind, str(failure.value))
        elif failure.check(defer.CancelledError):
            pass  # our own timeout cancelled it; the result is settled
        else:
            self._fail("error", "%s: %s" % (type(failure.value).__name__, failure.getErrorMessage()))
        return None

    def answered(self, answer):
        """The target's whole answer (the connection ended or the body is complete)."""
        try:
            status, body = parse_answer(answer)
        except ValueError as e:
            self._fail("answer", "%s answered badly: %s" % (self.target, e))
            return
        self._succeed(ProbeResult(self.reactor.seconds() - self.started, exit_address(body), status))

    def lost(self, reason):
        """The connection ended before a complete answer."""
        self._fail("closed", "%s closed the connection without a complete answer (%s)" % (self.target, reason.getErrorMessage()))

    def _timed_out(self, timeout):
        self.timer = None
        self._fail("timeout", "no answer from %s within %gs" % (self.target, timeout))
        if self.step is not None:
            self.step.cancel()
        if self.exchange is not None and self.exchange.transport is not None:
            self.exchange.transport.abortConnection()

    def _succeed(self, result):
        if not self.result.called:
            self._stop_timer()
            self.result.callback(result)

    def _fail(self, kind, message):
        if not self.result.called:
            self._stop_timer()
            self.result.errback(ProbeFailed(kind, message))

    def _stop_timer(self):
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


class _Exchange(Protocol):
    """One HTTP/1.0 request and its answer (the server closes, or Content-Length is met)."""

    def __init__(self, probe):
        self.probe = probe
        self.buffer = b""
        self.done = False

    def connectionMade(self):
        t = self.probe.target
        host = "[%s]" % t.host if ":" in t.host else t.host
        default = 443 if t.scheme == "https" else 80
        if t.port != default:
            host = "%s:%d" % (host, t.port)
        request = "GET %s HTTP/1.0\r\nHost: %s\r\nUser-Agent: pocketproxy-health\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
        self.transport.write((request % (t.path, host)).encode("ascii"))

    def dataReceived(self, data):
        if self.done:
            return
        self.buffer += data
        if len(self.buffer) > MAX_ANSWER or _complete(self.buffer):
            self._finish()
            self.transport.abortConnection()

    def connectionLost(self, reason):
        if self.done:
            return
        if self.buffer and b"\r\n\r\n" in self.buffer:
            self._finish()
        else:
            self.done = True
            self.probe.lost(reason)

    def _finish(self):
        self.done = True
        self.probe.answered(self.buffer[:MAX_ANSWER])


def _complete(answer):
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                return len(body) >= int(value.strip())
            except ValueError:
                return False
    return False


def parse_answer(answer):
    """``(status, body)`` of an HTTP/1.x answer (body cut to its Content-Length if given).

    :raises ValueError: not an HTTP answer.
    """
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError("no end of headers in %d bytes" % len(answer))
    lines = head.split(b"\r\n")
    parts = lines[0].split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit() or len(parts[1]) != 3:
        raise ValueError("not an HTTP status line: %r" % lines[0][:80])
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            body = body[: int(value.strip())]
    return int(parts[1]), body


def exit_address(body):
    """The address in a probe answer's body (``203.0.113.7`` or ``2001:db8::7``, optionally
    followed by a newline), or None when the body is anything else."""
    text = body.strip()
    if not text or len(text) > 45:
        return None
    try:
        return ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
