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

__all__ = ["ProbeTarget", "ProbeResult", "ProbeFailed", "Prober", "probe"]

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
    """A probe that got through: how long it took (on a fresh tunnel: dial, tunnel, request and
    answer; on a kept one: the request's round trip), the exit address the target reported
    (None when it reports none), the HTTP status (None: tcp), and whether the tunnel was fresh."""

    rtt: float
    exit_address: object = None
    status: int | None = None
    fresh: bool = True


class ProbeFailed(Exception):
    """The device did not carry the probe; ``kind`` labels why (metrics and logs)."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


def probe(reactor, upstream, target, timeout, dial=dial, tls_options=None):
    """Probe ``target`` through ``upstream`` on a fresh tunnel, closed afterwards; every step
    within ``timeout`` seconds in all.

    :param tls_options: ``host -> IOpenSSLClientConnectionCreator`` for https targets
        (:func:`proxy.dnsdoh.tls_options` by default).
    :returns: Deferred firing a :class:`ProbeResult` or failing with :class:`ProbeFailed`.
    """
    return _Probe(reactor, target, timeout).start(upstream, dial, tls_options, None)


class Prober:
    """Probes devices, keeping each device's tunnel to an ``http(s)`` target open between probes.

    A probe on a kept tunnel is one request and one answer (HTTP/1.1 keep-alive): a fifth of
    the CPU of a fresh one, and no new TCP handshakes over the phone's cellular link. Whoever
    calls asks for a ``fresh`` tunnel when it must prove that the phone still opens new
    connections (:class:`proxy.health.HealthMonitor` does every few minutes, after a failure
    and when real traffic failed). A tunnel the target or the phone closed is replaced by a
    fresh one on the next probe, whatever was asked. ``tcp://`` targets are always fresh.

    Called as ``prober(reactor, upstream, target, timeout, fresh=False, key=None)``; ``key``
    (the device name) names the kept tunnel, None keeps nothing.
    """

    def __init__(self, dial=dial, tls_options=None):
        self._dial = dial
        self._tls_options = tls_options
        self._kept = {}  # key -> (upstream, target, _Exchange)

    def __call__(self, reactor, upstream, target, timeout, fresh=False, key=None):
        kept = self._kept.pop(key, None) if key is not None else None
        p = _Probe(reactor, target, timeout)
        if kept is not None:
            k_upstream, k_target, exchange = kept
            if fresh or (k_upstream, k_target) != (upstream, target) or exchange.closed:
                exchange.close()
            else:
                p.fresh = False
                return p.ask(exchange, self._keeper(key, upstream, target))
        keep = self._keeper(key, upstream, target) if key is not None and target.scheme != "tcp" else None
        return p.start(upstream, self._dial, self._tls_options, keep)

    def _keeper(self, key, upstream, target):
        def keep(exchange):
            old = self._kept.pop(key, None)
            if old is not None and old[2] is not exchange:
                old[2].close()
            self._kept[key] = (upstream, target, exchange)

        return keep

    def forget(self, key):
        """Close ``key``'s kept tunnel (the device is no longer watched)."""
        kept = self._kept.pop(key, None)
        if kept is not None:
            kept[2].close()

    def close(self):
        """Close every kept tunnel (the daemon is stopping)."""
        for key in list(self._kept):
            self.forget(key)

    @property
    def kept(self):
        """How many tunnels are kept open now."""
        return len(self._kept)


class _Probe:
    def __init__(self, reactor, target, timeout):
        self.reactor = reactor
        self.target = target
        self.timeout = timeout
        self.started = reactor.seconds()
        self.result = defer.Deferred()
        self.exchange = None
        self.keep = None
        self.fresh = True
        self.step = None
        self.timer = reactor.callLater(timeout, self._timed_out, timeout)

    def start(self, upstream, dial, tls_options, keep):
        """A fresh tunnel; ``keep(exchange)`` is called when it may be kept for the next probe."""
        target, timeout = self.target, self.timeout
        self.keep = keep
        if target.scheme == "tcp":
            self.step = open_tunnel(self.reactor, upstream, (target.host, target.port), timeout, timeout, dial)
            self.step.addCallbacks(self._tunnelled, self._failed)
            return self.result
        endpoint = TunnelEndpoint(self.reactor, upstream, target.host, target.port, timeout, timeout, close_grace=1.0, dial=dial)
        if target.scheme == "https":
            if tls_options is None:
                from proxy.dnsdoh import tls_options as default_tls

                tls_options = lambda host: default_tls(host, target.ca_file)  # noqa: E731
            endpoint = wrapClientTLS(tls_options(target.host), endpoint)
        self.step = endpoint.connect(Factory.forProtocol(lambda: _Exchange(target)))
        self.step.addCallbacks(self._connected, self._failed)
        return self.result

    def ask(self, exchange, keep):
        """Probe over an open ``exchange`` (a kept tunnel)."""
        self.keep = keep
        self.exchange = exchange
        exchange.ask(self)
        return self.result

    def _tunnelled(self, tunnel):
        self.step = None
        tunnel.abort()
        self._succeed(ProbeResult(self.reactor.seconds() - self.started))

    def _connected(self, exchange):
        self.step = None
        self.exchange = exchange
        if self.result.called:
            exchange.close()
        else:
            exchange.ask(self)

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

    def answered(self, answer, reusable):
        """The target's whole answer; ``reusable``: the exchange may carry the next probe."""
        try:
            status, body = parse_answer(answer)
        except ValueError as e:
            self.exchange.close()
            self._fail("answer", "%s answered badly: %s" % (self.target, e))
            return
        if reusable and self.keep is not None and not self.result.called:
            self.keep(self.exchange)
        else:
            self.exchange.close()
        self._succeed(ProbeResult(self.reactor.seconds() - self.started, exit_address(body), status, self.fresh))

    def lost(self, reason):
        """The connection ended before a complete answer."""
        self._fail("closed", "%s closed the connection without a complete answer (%s)" % (self.target, reason.getErrorMessage()))

    def _timed_out(self, timeout):
        self.timer = None
        self._fail("timeout", "no answer from %s within %gs" % (self.target, timeout))
        if self.step is not None:
            self.step.cancel()
        if self.exchange is not None:
            self.exchange.close()

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
    """HTTP/1.1 requests over one tunnel, one at a time; the answer ends at its Content-Length,
    its last chunk, or the connection's end."""

    def __init__(self, target):
        t = target
        host = "[%s]" % t.host if ":" in t.host else t.host
        if t.port != (443 if t.scheme == "https" else 80):
            host = "%s:%d" % (host, t.port)
        self.request = (
            "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: pocketproxy-health\r\nAccept: text/plain\r\n\r\n" % (t.path, host)
        ).encode("ascii")
        self.buffer = b""
        self.waiting = None
        self.closed = False

    def ask(self, probe):
        self.waiting = probe
        self.buffer = b""
        self.transport.write(self.request)

    def close(self):
        if not self.closed:
            self.closed = True
            self.transport.abortConnection()

    def dataReceived(self, data):
        if self.waiting is None:  # nothing asked: a kept tunnel must stay silent
            self.close()
            return
        self.buffer += data
        if len(self.buffer) > MAX_ANSWER:
            self._finish(False)
        else:
            done = _complete(self.buffer)
            if done is not None:
                self._finish(done)

    def connectionLost(self, reason):
        self.closed = True
        probe, self.waiting = self.waiting, None
        if probe is None:
            return
        if b"\r\n\r\n" in self.buffer:
            self.waiting = probe
            self._finish(False)
        else:
            probe.lost(reason)

    def _finish(self, reusable):
        probe, self.waiting = self.waiting, None
        answer, self.buffer = self.buffer[:MAX_ANSWER], b""
        probe.answered(answer, reusable and not self.closed)


def _complete(answer):
    """None while more of ``answer`` is due; else whether the connection may carry another
    request (an HTTP/1.1 answer delimited by its length or last chunk, without ``close``)."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.split(b"\r\n")
    keep = lines[0].startswith(b"HTTP/1.1")
    length = chunked = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value) if value.isdigit() else -1
        elif name == b"transfer-encoding":
            chunked = value == b"chunked"
        elif name == b"connection" and value == b"close":
            keep = False
    if chunked:
        return keep if _dechunk(body) is not None else None
    if length is None or length < 0:
        return None  # delimited by the connection's end
    return keep if len(body) >= length else None


def _dechunk(body):
    """The data of a complete chunked ``body``, or None while its last chunk has not come."""
    out, rest = [], body
    while True:
        line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            return None
        try:
            size = int(line.split(b";")[0].strip(), 16)
        except ValueError:
            return b"".join(out)  # not chunked after all: what came so far
        if size == 0:
            return b"".join(out)
        if len(rest) < size + 2:
            return None
        out.append(rest[:size])
        rest = rest[size + 2:]


def parse_answer(answer):
    """``(status, body)`` of an HTTP/1.x answer (body cut to its Content-Length, or dechunked).

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
        name, value = name.strip().lower(), value.strip()
        if name == b"content-length" and value.isdigit():
            body = body[: int(value)]
        elif name == b"transfer-encoding" and value.lower() == b"chunked":
            body = _dechunk(body) or b""
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
