# -*- test-case-name: tests.unit.test_dns_doh -*-
"""DNS-over-HTTPS (RFC 8484) through the device: the resolver sees the phone, not this server.

Each query is an HTTP/1.1 ``GET url?dns=<base64url>`` with message ID 0 (cache-friendly, as
§4.1 asks) over TLS inside a CONNECT/SOCKS5 tunnel through the device. Twisted's ``Agent``
does the HTTP; its pool keeps up to ``max_connections`` tunnels open per device (HTTP/1.1 has
no multiplexing, and pipelining is too fragile on public resolvers, so a few keep-alive
connections carry the concurrency) and retries a GET once when a kept-alive tunnel turns out
to be dead. The certificate is verified for the URL's host against the system trust store or
an operator CA file. A failure is a SERVFAIL for the client, never a lookup from this host.

:class:`DoHResolver` has the interface of :class:`proxy.dnsupstream.DeviceResolver`.
"""

import base64

from OpenSSL import SSL
from twisted.internet import defer, ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from zope.interface import implementer

from proxy import dnsmessage
from proxy.dnserrors import DNSTimeout, DNSUnavailable, Overloaded, OverShare
from proxy.dnsqueue import FairQueue, admit_fairly
from proxy.logthrottle import LogThrottle, held_back
from proxy.tunnelendpoint import TunnelEndpoint
from proxy.upstream import dial
from proxy.upstreamerrors import UpstreamError

from twisted.web.iweb import IAgentEndpointFactory

try:
    from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
    from service_identity.pyopenssl import extract_patterns
except ImportError:  # service-identity 18.1 (Debian 12) has them under older names
    from service_identity._common import DNS_ID, IPAddress_ID, verify_service_identity
    from service_identity.pyopenssl import extract_ids as extract_patterns

__all__ = ["DoHResolver", "tls_options", "load_ca_file", "MEDIA_TYPE", "MAX_REPLY"]

MEDIA_TYPE = b"application/dns-message"
MAX_REPLY = 65535  # a DNS message cannot be longer
MIN_REPLY = 12  # nor shorter than its header


def load_ca_file(path):
    """The certificates of a PEM file, for verifying the resolver.

    :raises ValueError: naming the file when it is unreadable or holds no valid certificate.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError("cannot read %s: %s" % (path, e.strerror or e)) from None
    marker = b"-----BEGIN CERTIFICATE-----"
    blocks = [marker + chunk for chunk in data.split(marker)[1:]]
    if not blocks:
        raise ValueError("%s holds no PEM certificate (-----BEGIN CERTIFICATE-----)" % path)
    certificates = []
    for n, block in enumerate(blocks, 1):
        try:
            certificates.append(ssl.Certificate.loadPEM(block))
        except Exception as e:  # OpenSSL.crypto.Error carries a list of reasons
            raise ValueError("certificate %d in %s is not valid PEM: %s" % (n, path, _ssl_reason(e))) from None
    return certificates


def tls_options(host, ca_file=None):
    """Client TLS options verifying ``host`` (name or IP) against ``ca_file`` or the system store."""
    trust = ssl.trustRootFromCertificates(load_ca_file(ca_file)) if ca_file else ssl.platformTrust()
    return _StrictClientTLS(host, ssl.optionsForClientTLS(host, trustRoot=trust))


@implementer(IOpenSSLClientConnectionCreator)
class _StrictClientTLS:
    """``optionsForClientTLS`` plus our own identity check on the leaf certificate, failing closed.

    Twisted's own check is made after the handshake and, in current releases, lets a
    certificate through when service-identity raises anything but VerificationError (e.g. a
    SAN that is an IP literal written as a DNS name): a trusted CA's certificate for another
    name was then accepted. Checking in the OpenSSL verify callback refuses it in every version.
    """

    def __init__(self, host, options):
        self._options = options
        self._host = host
        self._id = IPAddress_ID(host) if isIPAddress(host) or isIPv6Address(host) else DNS_ID(host)

    def clientConnectionForTLS(self, tls_protocol):
        connection = self._options.clientConnectionForTLS(tls_protocol)
        wanted = self._id

        def verify(conn, certificate, errno, depth, preverified):
            if not preverified:
                return False
            if depth != 0:
                return True
            try:
                verify_service_identity(extract_patterns(certificate), [wanted], [])
            except Exception as e:  # VerificationError, CertificateError, anything: not verified
                tls_protocol.failVerification(Failure(IdentityMismatch("certificate is not valid for %s: %s" % (self._host, e))))
                return False
            return True

        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return connection


class IdentityMismatch(Exception):
    """The resolver's certificate does not name the host in the URL."""


class _Pending:
    """One client query waiting for, or in, an HTTP exchange."""

    __slots__ = ("wire", "d", "timer", "request", "owner", "held", "flying")

    def __init__(self, wire, owner=None):
        self.wire = wire
        self.owner = owner
        self.held = self.flying = False
        self.d = defer.Deferred()
        self.timer = None
        self.request = None


class DoHResolver:
    """One device's DoH client: lazily connected, a few keep-alive tunnels, closed when idle.

    :param url: a :class:`proxy.dohurl.DoHURL`.
    :param tls: client TLS options for ``url.host`` (:func:`tls_options`), shared by devices.
    :param stats: a :class:`proxy.dnsserver.DNSStats` (``upstream_*`` counters), or None.
    :param close_grace: seconds an idle tunnel's TLS close may wait for the resolver's reply.
    :param log_throttle: a :class:`proxy.logthrottle.LogThrottle` for failure lines (the DNS
        server shares its own); one on ``reactor`` by default.

    Queries are shared fairly between clients (``owner``) as in
    :class:`proxy.dnsupstream.DeviceResolver`: the window is ``max_connections`` exchanges.
    """

    _log = Logger()

    def __init__(
        self,
        reactor,
        upstream,
        url,
        tls,
        connect_timeout=10.0,
        handshake_timeout=10.0,
        query_timeout=5.0,
        idle_timeout=60.0,
        max_connections=4,
        max_queued=256,
        stats=None,
        log_fields=None,
        close_grace=5.0,
        dial=dial,
        log_throttle=None,
    ):
        self.reactor = reactor
        self.upstream = upstream
        self.url = url
        self.query_timeout = query_timeout
        self.max_connections = max_connections
        self.max_queued = max_queued
        self.stats = stats
        self.log_fields = dict(log_fields or {})
        self.log_throttle = log_throttle if log_throttle is not None else LogThrottle(reactor)
        self._fair = FairQueue(max_connections)
        self._active = set()
        self._open = 0
        self._closed = False
        self._close_why = None
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = max_connections
        self._pool.cachedConnectionTimeout = idle_timeout
        self._pool.retryAutomatically = True
        self._tunnels = TunnelEndpoint(
            reactor, upstream, url.host, url.port, connect_timeout, handshake_timeout,
            on_open=self._opened, on_close=self._tunnel_closed, close_grace=close_grace, dial=dial,
        )
        endpoint = wrapClientTLS(tls, self._tunnels)
        self._agent = Agent.usingEndpointFactory(reactor, _OneEndpoint(endpoint), pool=self._pool)

    @property
    def connected(self):
        """True while at least one tunnel to the resolver is open."""
        return self._open > 0

    def pending(self):
        """Queries waiting or in flight."""
        return self._fair.queued + len(self._active)

    def held(self, owner):
        """Queries ``owner`` has waiting or in flight here."""
        return self._fair.held(owner)

    def query(self, wire, owner=None):
        """Resolve a client query; the reply carries ID 0 (the caller restores the client's).

        :param owner: who asks (the client's address): the unit of fairness.
        :returns: Deferred firing with the reply bytes, or failing with :class:`DNSTimeout`,
            :class:`Overloaded` (:class:`OverShare`) or :class:`DNSUnavailable`.
        """
        if self._closed:
            return defer.fail(DNSUnavailable("resolver for %s is closed" % (self.upstream,)))
        try:
            victim = admit_fairly(self._fair, owner, self.max_connections + self.max_queued, self.pending(), self.upstream)
        except Overloaded as e:
            return defer.fail(e)
        if victim is not None:
            self._settle(victim, OverShare("evicted for a client under its fair share via %s" % (self.upstream,)))
        p = _Pending(dnsmessage.with_id(bytes(wire), 0), owner)
        self._fair.admit(p)
        p.d.addBoth(self._release, p)
        p.timer = self.reactor.callLater(self.query_timeout, self._timed_out, p)
        self._fair.enqueue(p)
        self._pump()
        return p.d

    def _release(self, result, p):
        self._fair.release(p)
        return result

    def close(self, why="closed"):
        """Fail every pending query and close the tunnels (device removed or server stopping)."""
        self._closed = True
        self._close_why = why
        exc = DNSUnavailable("resolver for %s %s" % (self.upstream, why))
        for p in self._fair.clear() + list(self._active):
            self._settle(p, exc)
        d = self._pool.closeCachedConnections()
        self._tunnels.abort_all()  # a silent phone would keep a graceful TLS close waiting
        return d

    # --- exchanges ------------------------------------------------------------------------------

    def _pump(self):
        while len(self._active) < self.max_connections and not self._closed:
            p = self._fair.take()
            if p is None:
                break
            self._start(p)

    def _start(self, p):
        self._active.add(p)
        encoded = base64.urlsafe_b64encode(p.wire).rstrip(b"=").decode("ascii")
        headers = Headers({b"accept": [MEDIA_TYPE]})
        d = self._agent.request(b"GET", self.url.query_url(encoded), headers)
        d.addCallback(self._response)
        p.request = d
        d.addBoth(self._done, p)

    def _response(self, response):
        if response.code != 200:
            _discard(response)
            raise DNSUnavailable("%s answered HTTP %d %s" % (self.url, response.code, _text(response.phrase)))
        types = response.headers.getRawHeaders(b"content-type") or [b""]
        media = types[0].split(b";", 1)[0].strip().lower()
        if media != MEDIA_TYPE:
            _discard(response)
            raise DNSUnavailable("%s answered with content type %r, not a DNS message" % (self.url, _text(types[0])))
        if isinstance(response.length, int) and response.length > MAX_REPLY:
            _discard(response)
            raise DNSUnavailable("%s announced a %d-byte reply" % (self.url, response.length))
        body = _Body(MAX_REPLY)
        response.deliverBody(body)
        return body.d

    def _done(self, result, p):
        self._active.discard(p)
        self._fair.landed(p)
        p.request = None
        if not p.d.called:
            if isinstance(result, bytes):
                self._settle(p, None, result)
            else:
                self._settle(p, self._unavailable(result))
        self._pump()

    def _unavailable(self, reason):
        """Turn an exchange failure into the client's DNSUnavailable (logging the tunnel's)."""
        if reason.check(DNSUnavailable):
            return reason.value
        kind, why = _describe(reason, self.url.host)
        if self.stats is not None:
            self.stats.upstream_failed[kind] += 1
        suppressed = self.log_throttle.allow(("dns-upstream-failed", kind, str(self.upstream)))
        if suppressed is not None:
            self._log.warn(
                "DNS-over-HTTPS via {upstream} to {resolver} failed: {kind}: {reason}" + held_back(suppressed),
                upstream=str(self.upstream),
                resolver=str(self.url),
                kind=kind,
                reason=why,
                event="dns-upstream-failed",
                suppressed=suppressed,
                **self.log_fields,
            )
        return DNSUnavailable("DNS-over-HTTPS via %s failed: %s" % (self.upstream, kind))

    def _timed_out(self, p):
        p.timer = None
        self._fair.remove(p)
        p.d.errback(DNSTimeout("no DNS reply via %s within %gs" % (self.upstream, self.query_timeout)))
        if p.request is not None:
            p.request.cancel()  # aborts the tunnel: a stuck exchange must not hold a connection

    def _settle(self, p, exc, reply=None):
        if p.timer is not None and p.timer.active():
            p.timer.cancel()
        p.timer = None
        if p.d.called:
            return
        if exc is None:
            p.d.callback(reply)
        else:
            p.d.errback(exc)
        if p.request is not None:
            p.request.cancel()

    def _opened(self):
        self._open += 1
        if self.stats is not None:
            self.stats.upstream_opened += 1

    def _tunnel_closed(self, reason):
        self._open -= 1
        if self.stats is not None:
            if self._closed:
                why = self._close_why  # we reset it: not the device's doing
            else:
                why = "closed" if reason.check(ConnectionDone) else "dropped"
            self.stats.upstream_closed[why] += 1


class _Body(Protocol):
    """Collects a response body up to ``limit`` bytes; cancelling (timeout) aborts the connection."""

    def __init__(self, limit):
        self.limit = limit
        self.parts = []
        self.size = 0
        self.d = defer.Deferred(self._cancel)

    def dataReceived(self, data):
        if self.d.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.d.errback(DNSUnavailable("the resolver's reply exceeded %d bytes" % self.limit))
            self.transport.stopProducing()
            return
        self.parts.append(data)

    def connectionLost(self, reason):
        if self.d.called:
            return
        body = b"".join(self.parts)
        if reason.check(ResponseDone) and len(body) < MIN_REPLY:
            self.d.errback(DNSUnavailable("the resolver's %d-byte reply is not a DNS message" % len(body)))
        elif reason.check(ResponseDone):
            self.d.callback(body)
        else:
            self.d.errback(DNSUnavailable("the resolver's reply was cut short: %s" % _text(reason.getErrorMessage())))

    def _cancel(self, d):
        if self.transport is not None:
            self.transport.stopProducing()


class _Discard(Protocol):
    """Drops a body we will not read, closing its connection instead of draining it."""

    def connectionMade(self):
        self.transport.stopProducing()


def _discard(response):
    response.deliverBody(_Discard())


@implementer(IAgentEndpointFactory)
class _OneEndpoint:
    """Agent endpoint factory: every request goes to the resolver through the device."""

    def __init__(self, endpoint):
        self.endpoint = endpoint

    def endpointForURI(self, uri):
        return self.endpoint


def _reasons(failure):
    """The failures inside Agent's ResponseNeverReceived/RequestTransmissionFailed wrappers."""
    inner = getattr(failure.value, "reasons", None)
    if not inner:
        return [failure]
    out = []
    for f in inner:
        out.extend(_reasons(f))
    return out


def _describe(failure, host):
    """``(kind, text)`` of a failed exchange: ``tls`` for certificate/handshake problems."""
    reasons = _reasons(failure)
    for f in reasons:
        if f.check(UpstreamError):
            return f.value.kind, str(f.value)
    for f in reasons:
        if f.check(IdentityMismatch):  # ours says which name; OpenSSL's would only say "verify failed"
            return "tls", "TLS with %s failed: %s" % (host, f.value)
    for f in reasons:
        if (type(f.value).__module__ or "").startswith(("OpenSSL", "service_identity")):
            return "tls", "TLS with %s failed: %s" % (host, _ssl_reason(f.value))
    for f in reasons:
        if f.check(defer.CancelledError):
            return "cancelled", "cancelled"
    return "closed", "the connection ended without a reply: %s" % "; ".join(_text(f.getErrorMessage()) for f in reasons)


def _ssl_reason(exc):
    """OpenSSL errors are lists of (library, function, reason) tuples: keep the reasons."""
    args = exc.args[0] if exc.args and isinstance(exc.args[0], list) else None
    if args:
        texts = [t[-1] for t in args if isinstance(t, tuple) and t and t[-1]]
        if texts:
            return ", ".join(texts)
    return str(exc) or type(exc).__name__


def _text(value):
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return "".join(c if " " <= c <= "~" else "?" for c in str(value))[:200]

