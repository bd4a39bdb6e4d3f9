# -*- test-case-name: tests.unit.test_dns_server -*-
"""Customer DNS: UDP and TCP listeners that answer each client through its own device.

Every query is identified by its source address; ``route_for`` says which device (and policy)
serves it. Unmapped sources get REFUSED, never an answer from this host; malformed packets are
dropped. Answers come from the device's cache or its DNS tunnel (:mod:`proxy.dnsupstream`); a
failure is a SERVFAIL and never falls back to the host's resolver, so names do not leak. UDP
answers above the client's limit are truncated so the client retries over TCP.

The sockets are bound with ``IP_FREEBIND`` so the daemon can start before OpenVPN has created
tun0 and its address. Query names are logged only with ``log_names`` (privacy).

Customers are untrusted and share phones, so no one of them can take the service from others:

- TCP: at most ``max_tcp_per_client`` connections per source address, and
  ``max_tcp_clients`` in all (a backstop for the process's file descriptors); beyond either a
  new connection is reset, counted (``tcp.refused_by``) and logged (throttled).
- Queries: a client may hold only its fair share of its device's queue
  (:func:`proxy.dnsqueue.fair_share`); its extra queries get SERVFAIL at once
  (``over_share``), and the device's queue is served round robin between clients
  (:class:`proxy.dnsqueue.FairQueue`). The ``host`` policy, with no queue of its own, gets
  the same per-client share of ``max_in_flight + max_queued``.
- Logs: every per-query and per-connection failure line goes through one
  :class:`proxy.logthrottle.LogThrottle` (at most one line per kind and client every 10 s);
  a line says how many similar ones were suppressed before it (field ``suppressed``).
"""

import math
import socket
from collections import Counter
from dataclasses import dataclass, field

from twisted.application import service
from twisted.internet import defer
from twisted.internet import error as terror
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.logger import Logger
from twisted.names import dns
from twisted.protocols.basic import Int16StringReceiver
from twisted.protocols.policies import TimeoutMixin

from proxy import dnsmessage
from proxy.dnscache import DNSCache
from proxy.dnsmessage import Malformed
from proxy.dnsdoh import DoHResolver, tls_options
from proxy.dnserrors import DNSUnavailable, Overloaded, OverShare
from proxy.dnshost import HostResolver
from proxy.dnsqueue import fair_share
from proxy.dnsupstream import DeviceResolver
from proxy.dohurl import DoHURL
from proxy.logthrottle import LogThrottle, held_back
from proxy.origdst import unmap
from proxy.settings import DNSSettings
from proxy.stats import Histogram
from proxy.upstream import Upstream, dial

__all__ = ["DNSRoute", "DNSSettings", "DNSStats", "DNSServer", "DNSService", "LATENCY_BUCKETS", "describe_resolver"]

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
POLICIES = ("via_device", "host")
_RESULTS = {dns.OK: "ok", dns.ENAME: "nxdomain", dns.ESERVER: "servfail"}


@dataclass(frozen=True)
class DNSRoute:
    """How one client's queries are resolved.

    :ivar key: identity of the cache and of the device connection (e.g. the device name).
    :ivar upstream: the device proxy; may be None only with policy ``host``.
    :ivar log_fields: added to log events (user, device...).
    """

    key: object
    upstream: Upstream | None
    policy: str = "via_device"
    log_fields: dict = field(default_factory=dict, compare=False)


class DNSStats:
    """Counters of the DNS service, cheap to bump; :meth:`snapshot` is JSON-friendly.

    :ivar queries: answered or dropped queries by result (``ok``, ``nxdomain``, ``servfail``,
        ``refused``, ``malformed``, ``timeout``, ``truncated``, ``overloaded``, ``error``).
    :ivar resolved: cache misses by where they went (``device``, ``host``).
    :ivar coalesced: queries that joined an identical one already being resolved.
    :ivar upstream_failed: device tunnels that could not be opened, by ``UpstreamError.kind``.
    :ivar upstream_closed: device tunnels closed, by why (``idle``, ``dropped``, ``stale``...).
    """

    def __init__(self):
        self.queries = Counter()
        self.resolved = Counter()
        self.cache_hits = 0
        self.cache_misses = 0
        self.coalesced = 0
        self.upstream_opened = 0
        self.upstream_failed = Counter()
        self.upstream_closed = Counter()
        self.tcp_clients = 0
        self.tcp_refused = 0
        self.tcp_refused_by = Counter()  # "per_client" or "full"
        self.latency_histogram = Histogram(LATENCY_BUCKETS)

    def observe(self, seconds):
        """Record one answered query's latency."""
        self.latency_histogram.observe(seconds)

    def latency(self):
        """Prometheus-style histogram: cumulative counts per upper bound (``+Inf`` last), sum, count."""
        h = self.latency_histogram
        buckets = {("+Inf" if math.isinf(bound) else "%g" % bound): n for bound, n in h.cumulative()}
        return {"buckets": buckets, "sum": h.sum, "count": h.count}

    def snapshot(self):
        """A JSON-friendly copy of every counter."""
        return {
            "queries": dict(self.queries),
            "resolved": dict(self.resolved),
            "cache": {"hits": self.cache_hits, "misses": self.cache_misses},
            "coalesced": self.coalesced,
            "upstream": {
                "opened": self.upstream_opened,
                "failed": dict(self.upstream_failed),
                "closed": dict(self.upstream_closed),
            },
            "tcp": {"clients": self.tcp_clients, "refused": self.tcp_refused, "refused_by": dict(self.tcp_refused_by)},
            "latency": self.latency(),
        }


class DNSServer:
    """The DNS service of one daemon: listeners, per-device resolvers and caches.

    :param route_for: ``ipaddress`` of the client → :class:`DNSRoute`, or None (REFUSED).
    :param dial: :func:`proxy.upstream.dial` (tests pass a scripted one).
    :param host_resolver: the ``host`` policy's resolver (an object with ``query(Query)``);
        a :class:`HostResolver` on ``settings.host_servers`` by default.
    """

    _log = Logger()

    def __init__(self, reactor, settings, route_for, stats=None, dial=dial, host_resolver=None):
        self.reactor = reactor
        self.settings = settings
        self.route_for = route_for
        self.stats = stats if stats is not None else DNSStats()
        self.cache = DNSCache(reactor, settings.cache_entries, settings.max_ttl, settings.max_negative_ttl)
        self.host = host_resolver or HostResolver(reactor, settings.host_servers, settings.query_timeout)
        self.udp_port = None
        self.tcp_port = None
        self._dial = dial
        # One TLS context for every device's DoH tunnels, built now so that a CA file gone
        # since the configuration was read fails the start (ValueError), not every query.
        self._doh_tls = None
        if isinstance(settings.resolver, DoHURL):
            self._doh_tls = tls_options(settings.resolver.host, settings.ca_file or None)
        self._devices = {}
        self._route_upstreams = {}  # route key -> the upstream it was last served through
        self._flights = {}  # (route key, query key) -> queries waiting for the one being resolved
        self._tcp = set()
        self._tcp_by_client = Counter()  # source address -> open TCP connections
        self._host_held = Counter()  # source address -> queries on the host policy's resolver
        self.log_throttle = LogThrottle(reactor)
        self._expired_at = reactor.seconds()
        #: device health (``alive(route key)``), or None: every device is taken as alive. A
        #: down device's uncached names get SERVFAIL at once; its cache still answers.
        self.health = None

    # --- lifecycle ------------------------------------------------------------------------------

    def listen(self):
        """Bind UDP and TCP on ``listen_host:listen_port`` (freebind).

        :raises twisted.internet.error.CannotListenError: naming the address and port.
        """
        s = self.settings
        udp = _bound_socket(s.listen_host, s.listen_port, socket.SOCK_DGRAM)
        try:
            self.udp_port = self.reactor.adoptDatagramPort(udp.fileno(), udp.family, _UDPProtocol(self), 65535)
        finally:
            udp.close()
        try:
            tcp = _bound_socket(s.listen_host, s.listen_port, socket.SOCK_STREAM)
            try:
                self.tcp_port = self.reactor.adoptStreamPort(tcp.fileno(), tcp.family, _TCPFactory(self))
            finally:
                tcp.close()
        except BaseException:
            port, self.udp_port = self.udp_port, None
            port.stopListening()
            raise
        return self.udp_port, self.tcp_port

    def stop(self):
        """Close the listeners, client TCP connections and device tunnels; a Deferred."""
        ports = [p for p in (self.udp_port, self.tcp_port) if p is not None]
        self.udp_port = self.tcp_port = None
        for proto in list(self._tcp):
            proto.transport.loseConnection()
        for key in list(self._devices):
            self.forget(key)
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])

    def sockets_held(self):
        """Sockets the DNS service may hold now, at most: its TCP clients and its device tunnels
        (one per device, or ``max_doh_connections`` with DoH)."""
        per_device = self.settings.max_doh_connections if self._doh_tls is not None else 1
        return len(self._tcp) + per_device * len(self._devices)

    def forget(self, key):
        """Drop the cache and close the tunnel of a route key (device removed or changed)."""
        self.cache.forget(key)
        self._route_upstreams.pop(key, None)
        resolver = self._devices.pop(key, None)
        if resolver is not None:
            resolver.close("forgotten")

    def close_tunnel(self, key, why):
        """Close a route key's device tunnel now (its queries in flight get SERVFAIL at once;
        the cache stays): the device went down or its exit address changed."""
        resolver = self._devices.pop(key, None)
        if resolver is not None:
            resolver.close(why)

    def forget_upstream(self, upstream):
        """Forget every route key served through ``upstream`` (no client maps to that proxy any
        more: its device was removed or its URL changed), closing its tunnels now rather than
        at stop."""
        for key in [k for k, u in self._route_upstreams.items() if u == upstream]:
            self.forget(key)

    # --- answering ------------------------------------------------------------------------------

    def answer(self, data, source, udp):
        """Answer one query from ``source`` (an ``ipaddress`` object).

        :returns: Deferred firing with the reply bytes (never failing).
        :raises Malformed: drop it (UDP) or close the connection (TCP); already counted.
        """
        started = self.reactor.seconds()
        try:
            query = dnsmessage.parse_query(data)
        except Malformed as e:
            self.stats.queries["malformed"] += 1
            self._warn("malformed", source, None, None, "dropped a malformed DNS packet from {client}: {why}", why=e)
            raise
        route = self.route_for(source)
        if route is None:
            self._warn("refused", source, None, query, "refused DNS query from {client}: source has no device mapping")
            refused = dnsmessage.error_reply(query, dns.EREFUSED)
            return defer.succeed(self._finish(query, refused, "refused", started, udp))
        if self._route_upstreams.get(route.key, route.upstream) != route.upstream:
            self.forget(route.key)  # the device's proxy changed: neither its tunnel nor its cache is reused
        self._route_upstreams[route.key] = route.upstream
        hit = self.cache.get(route.key, query.key)
        if hit is not None:
            self.stats.cache_hits += 1
            reply = dnsmessage.cached_reply(query, *hit)
            return defer.succeed(self._finish(query, reply, _result(reply), started, udp))
        flight = (route.key, query.key)
        followers = self._flights.get(flight)
        if followers is not None:  # the same question is already on its way: share its answer
            self.stats.coalesced += 1
            d = defer.Deferred()
            followers.append((query, started, udp, d))
            return d
        self.stats.cache_misses += 1
        self._flights[flight] = []
        d = defer.maybeDeferred(self._resolve, route, query, source)  # a raise must not strand the followers
        d.addCallback(self._resolved, route, query)
        d.addErrback(self._failed, route, query, source)
        d.addBoth(self._landed, flight, query)
        d.addCallback(lambda pair: self._finish(query, pair[0], pair[1], started, udp))
        return d

    def _landed(self, pair, flight, query):
        """Give every query that joined this one in flight the same answer, in its own words
        (ID, question casing, EDNS as *it* asked); a failure is the same SERVFAIL for all."""
        followers = self._flights.pop(flight, ())
        if not isinstance(pair, tuple):  # a bug in the chain above: still answer everyone
            self._failure("DNS answer failed internally", pair, ("internal", "answer"))
            pair = (dnsmessage.error_reply(query, dns.ESERVER), "servfail")
        reply, result = pair
        message = dnsmessage.parse_reply(reply) if followers else None
        if message is not None:
            message.additional = [r for r in message.additional if r.type != dns.OPT]  # the leader's EDNS
        for follower, started, udp, d in followers:
            own_result = result
            try:
                if message is not None:
                    own = dnsmessage.cached_reply(follower, message, 0)
                else:
                    own = dnsmessage.with_id(reply, follower.id)
            except Exception:
                self._failure("DNS answer for a coalesced query failed", None, ("internal", "coalesced"))
                own, own_result = dnsmessage.error_reply(follower, dns.ESERVER), "servfail"
            d.callback(self._finish(follower, own, own_result, started, udp))
        return pair

    def _resolve(self, route, query, source):
        if route.policy == "host":
            return self._resolve_host(query, source)
        if route.policy != "via_device" or route.upstream is None:
            return defer.fail(DNSUnavailable("no device to resolve through (policy %r)" % (route.policy,)))
        if self.health is not None and not self.health.alive(route.key):
            return defer.fail(DNSUnavailable("device %s is down" % (route.key,)))
        d = self._device_for(route).query(query.wire, owner=source)
        if not d.called:  # refused at once (over its share, overloaded, closed): not resolved
            self.stats.resolved["device"] += 1
        return d

    def _resolve_host(self, query, source):
        """The host policy: the same per-client fair share as a device, of ``max_in_flight +
        max_queued`` queries on the server's resolvers (which have no queue of their own)."""
        capacity = self.settings.max_in_flight + self.settings.max_queued
        held = self._host_held[source]
        share = fair_share(capacity, len(self._host_held) + (0 if held else 1))
        if held >= share:
            return defer.fail(OverShare("client holds %d DNS queries on the host resolver (its fair share)" % held))
        if sum(self._host_held.values()) >= capacity:
            return defer.fail(Overloaded("%d DNS queries pending on the host resolver" % capacity))
        self.stats.resolved["host"] += 1
        self._host_held[source] += 1

        def release(result):
            self._host_held[source] -= 1
            if self._host_held[source] <= 0:
                del self._host_held[source]
            return result

        return defer.maybeDeferred(self.host.query, query).addBoth(release)

    def _device_for(self, route):
        """The route's device resolver: DNS over TCP, or DoH when the resolver is a URL."""
        resolver = self._devices.get(route.key)
        if resolver is not None:
            return resolver
        s = self.settings
        common = dict(
            connect_timeout=s.connect_timeout,
            handshake_timeout=s.handshake_timeout,
            query_timeout=s.query_timeout,
            idle_timeout=s.idle_timeout,
            max_queued=s.max_queued,
            stats=self.stats,
            log_fields=route.log_fields,
            dial=self._dial,
            log_throttle=self.log_throttle,
        )
        if isinstance(s.resolver, DoHURL):
            resolver = DoHResolver(
                self.reactor, route.upstream, s.resolver, self._doh_tls, max_connections=s.max_doh_connections, **common
            )
        else:
            resolver = DeviceResolver(self.reactor, route.upstream, s.resolver, max_in_flight=s.max_in_flight, **common)
        self._devices[route.key] = resolver
        return resolver

    def _resolved(self, reply, route, query):
        reply = dnsmessage.with_id(reply, query.id)
        message = dnsmessage.parse_reply(reply)
        if message is not None:
            if not dnsmessage.same_question(query, message):
                raise DNSUnavailable("the resolver answered another question")
            self.cache.put(route.key, query.key, message)
        # An undecodable but well-framed reply is relayed as it came, just not cached.
        return reply, _result(reply)

    def _failed(self, reason, route, query, source):
        if reason.check(DNSUnavailable):
            kind = reason.value.kind
            self._warn(kind, source, route, query, "DNS query from {client} failed: {why}", why=reason.value)
        else:
            kind = "servfail"
            self._failure("DNS query from {client} failed internally", reason, ("internal", source), client=str(source))
        return dnsmessage.error_reply(query, dns.ESERVER), kind

    def _finish(self, query, reply, result, started, udp):
        if udp and len(reply) > query.udp_limit(self.settings.max_udp_payload):
            reply, result = dnsmessage.truncated_reply(query, reply), "truncated"
        self.stats.queries[result] += 1
        self.stats.observe(self.reactor.seconds() - started)
        return reply

    def _allow(self, key):
        """:meth:`LogThrottle.allow`, forgetting quiet keys once a minute."""
        now = self.reactor.seconds()
        if now - self._expired_at >= 60.0:
            self._expired_at = now
            self.log_throttle.expire()
        return self.log_throttle.allow(key)

    def _failure(self, text, reason, key, **fields):
        """A traceback line (a bug), throttled like the others."""
        suppressed = self._allow(key)
        if suppressed is not None:
            self._log.failure(text + held_back(suppressed), reason, suppressed=suppressed, **fields)

    def _warn(self, kind, client, route, query, text, key=None, **fields):
        """One line per failure, at most one per ``key`` (default (kind, client)) every 10 s,
        saying how many like it were suppressed; names only on request."""
        suppressed = self._allow(key if key is not None else (kind, client))
        if suppressed is None:
            return
        fields["suppressed"] = suppressed
        text += held_back(suppressed)
        if route is not None:
            fields.update(route.log_fields)  # user, device name... (the owner's; may be empty)
            fields["upstream"] = str(route.upstream) if route.policy == "via_device" else "host"
        if query is not None and self.settings.log_names:
            fields["qname"] = query.name.decode("ascii", "replace")
            text += " (name {qname})"
        fields["why"] = str(fields.get("why", ""))
        self._log.warn(text, client=str(client), kind=kind, event="dns-" + kind, **fields)

    def _tcp_admit(self, source):
        """Whether a new TCP connection from ``source`` fits both caps (else counted and logged)."""
        s = self.settings
        if len(self._tcp) >= s.max_tcp_clients:
            why, key = "full", ("tcp-refused", "full")  # one line for everyone: many sources
            text = "refused a DNS TCP connection from {client}: {open} connections open (dns.max_tcp_clients)"
        elif self._tcp_by_client[source] >= s.max_tcp_per_client:
            why, key = "per_client", None
            text = "refused a DNS TCP connection from {client}: it has {open} open (dns.max_tcp_per_client)"
        else:
            self._tcp_by_client[source] += 1
            return True
        self.stats.tcp_refused += 1
        self.stats.tcp_refused_by[why] += 1
        opened = len(self._tcp) if why == "full" else self._tcp_by_client[source]
        self._warn("tcp-refused", source, None, None, text, key=key, open=opened, why=why)
        return False

    def _tcp_closed(self, source):
        self._tcp_by_client[source] -= 1
        if self._tcp_by_client[source] <= 0:
            del self._tcp_by_client[source]


def describe_resolver(resolver):
    """``host:port`` for DNS over TCP, the URL for DoH (for log lines)."""
    if isinstance(resolver, DoHURL):
        return str(resolver)
    host, port = resolver
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def _result(reply):
    return _RESULTS.get(dnsmessage.reply_rcode(reply), "error")


def _bound_socket(host, port, kind):
    """A non-blocking socket bound with IP_FREEBIND (and SO_REUSEADDR, listening, for TCP)."""
    ip = unmap(host)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        sock = socket.socket(family, kind)
    except OSError as e:
        raise terror.CannotListenError(str(ip), port, e)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)  # Linux honours it on IPv6 sockets too
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((str(ip), port))
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise terror.CannotListenError(str(ip), port, e)
    return sock


class _UDPProtocol(DatagramProtocol):
    """Datagrams in, answers out; malformed ones are dropped silently (beyond the count)."""

    noisy = False

    def __init__(self, server):
        self.server = server

    def datagramReceived(self, data, addr):
        """IProtocol.datagramReceived"""
        try:
            d = self.server.answer(data, unmap(addr[0]), udp=True)
        except Malformed:
            return
        d.addCallback(self._send, addr)

    def _send(self, reply, addr):
        if self.transport is not None:
            try:
                self.transport.write(reply, addr)
            except OSError:
                pass  # e.g. ENETUNREACH while tun0 is down: the client retries


class _TCPProtocol(Int16StringReceiver, TimeoutMixin):
    """RFC 7766 client connection: pipelined queries, answers in completion order, idle timeout."""

    def __init__(self, server):
        self.server = server
        self.callLater = server.reactor.callLater  # TimeoutMixin's clock
        self.source = None
        self.pending = 0
        self.accepted = False

    def connectionMade(self):
        """IProtocol.connectionMade"""
        s = self.server
        self.source = unmap(self.transport.getPeer().host)
        if not s._tcp_admit(self.source):
            self.transport.abortConnection()
            return
        self.accepted = True
        s._tcp.add(self)
        s.stats.tcp_clients = len(s._tcp)
        self.setTimeout(s.settings.tcp_idle_timeout)

    def stringReceived(self, data):
        """Int16StringReceiver.stringReceived"""
        if not self.accepted:
            return
        self.resetTimeout()
        try:
            d = self.server.answer(data, self.source, udp=False)
        except Malformed:
            self.transport.loseConnection()
            return
        self.pending += 1
        if self.pending >= self.server.settings.max_tcp_pipeline:
            self.transport.pauseProducing()
        d.addCallback(self._reply)

    def _reply(self, reply):
        self.pending -= 1
        if not self.accepted:
            return
        self.resetTimeout()
        self.sendString(reply)
        if self.pending == self.server.settings.max_tcp_pipeline - 1:
            self.transport.resumeProducing()

    def timeoutConnection(self):
        """TimeoutMixin.timeoutConnection: idle clients are closed, busy ones kept."""
        if self.pending:
            self.setTimeout(self.server.settings.tcp_idle_timeout)
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        """IProtocol.connectionLost"""
        self.setTimeout(None)
        if self.accepted:
            self.accepted = False
            self.server._tcp.discard(self)
            self.server._tcp_closed(self.source)
            self.server.stats.tcp_clients = len(self.server._tcp)


class _TCPFactory(Factory):
    """Builds :class:`_TCPProtocol` for the server."""

    noisy = False

    def __init__(self, server):
        self.server = server

    def buildProtocol(self, addr):
        """IProtocolFactory.buildProtocol"""
        p = _TCPProtocol(self.server)
        p.factory = self
        return p


class DNSService(service.Service):
    """The DNS server as a Twisted service: binds at privileged start (port 53), stops cleanly.

    A bind failure stops the daemon at startup with a message naming address and port.
    """

    _log = Logger()

    def __init__(self, server):
        self.server = server

    def privilegedStartService(self):
        """IService.privilegedStartService"""
        udp, tcp = self.server.listen()
        s = self.server.settings
        self._log.info(
            "DNS listening on {host} port {port} (UDP+TCP, resolver {resolver} via devices)",
            host=s.listen_host,
            port=udp.getHost().port,
            resolver=describe_resolver(s.resolver),
        )
        service.Service.privilegedStartService(self)

    def stopService(self):
        """IService.stopService"""
        service.Service.stopService(self)
        return self.server.stop()
