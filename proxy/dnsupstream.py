# -*- test-case-name: tests.unit.test_dns_upstream -*-
"""Where customer DNS queries are resolved: through the device, or (by policy) by this host.

:class:`DeviceResolver` keeps one DNS-over-TCP connection (RFC 7766 framing) per device,
tunnelled through the device's CONNECT/SOCKS5 proxy to a public resolver, so names are resolved
from the customer's own network and never leak from the server. Queries are pipelined with
per-connection IDs (clients' IDs may collide; ours never do). A dropped connection costs each
in-flight query one retry on a fresh connection while its time lasts; the dial itself is never
retried in a loop, and there is no fallback to the host's resolver: a device failure is a
SERVFAIL, not a leak.

:class:`HostResolver` is the explicit ``host`` policy: the server's own resolvers, UDP with a
TCP retry on truncation, through ``twisted.names.client.Resolver``.
"""

import random
from collections import deque

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import client, dns
from twisted.protocols.basic import Int16StringReceiver

from proxy import dnsmessage
from proxy.upstream import UpstreamError, dial

__all__ = [
    "DNSUnavailable",
    "DNSTimeout",
    "Overloaded",
    "DeviceResolver",
    "HostResolver",
    "read_resolv_conf",
]

MAX_STALE_IDS = 1024  # timed-out IDs kept reserved on one connection before we give up on it


class DNSUnavailable(Exception):
    """The query could not be answered upstream; ``kind`` labels it for stats."""

    kind = "servfail"


class DNSTimeout(DNSUnavailable):
    """No reply within the query timeout."""

    kind = "timeout"


class Overloaded(DNSUnavailable):
    """Too many queries in flight and queued for this device."""

    kind = "overloaded"


class _Pending:
    """One client query on its way through the device."""

    __slots__ = ("wire", "d", "timer", "deadline", "attempts", "conn", "id", "heard")

    def __init__(self, wire, deadline):
        self.wire = wire
        self.d = defer.Deferred()
        self.timer = None
        self.deadline = deadline
        self.attempts = 0
        self.conn = None
        self.id = None
        self.heard = None  # replies the connection had delivered when this query went out


class _Leg(Int16StringReceiver):
    """The DNS side of one tunnel: RFC 7766 length framing over the device connection."""

    def __init__(self, owner, device):
        self.owner = owner
        self.device = device  # the HandshakeClient
        self.in_flight = {}  # our ID -> _Pending
        self.stale = set()  # IDs of timed-out queries whose late replies we still expect
        self.replies = 0
        self.closing = None  # why we closed it ourselves
        self._next = random.randrange(0x10000)

    def allocate(self):
        """A 16-bit ID unused on this connection."""
        while True:
            self._next = (self._next + 1) & 0xFFFF
            if self._next not in self.in_flight and self._next not in self.stale:
                return self._next

    def stringReceived(self, frame):
        """Int16StringReceiver.stringReceived"""
        self.owner._frame(self, frame)

    def readConnectionLost(self):
        """IHalfCloseableProtocol.readConnectionLost (forwarded): no more replies can come."""
        self.device.abort()

    def writeConnectionLost(self):
        """IHalfCloseableProtocol.writeConnectionLost (forwarded): no more queries can go."""
        self.device.abort()

    def connectionLost(self, reason):
        """IProtocol.connectionLost (forwarded)"""
        self.owner._lost(self, reason)


class DeviceResolver:
    """One device's DNS connection: lazily dialled, pipelined, closed when idle.

    :param reactor: IReactorTCP + IReactorTime (the clock of every timeout here).
    :param upstream: the device's :class:`proxy.upstream.Upstream`.
    :param resolver: ``(host, port)`` asked through the device.
    :param stats: counts ``upstream_opened``/``upstream_failed[kind]``/``upstream_closed[why]``
        (a :class:`proxy.dnsserver.DNSStats`), or None.
    :param dial: :func:`proxy.upstream.dial`; tests pass a scripted one.
    """

    _log = Logger()

    def __init__(
        self,
        reactor,
        upstream,
        resolver=("1.1.1.1", 53),
        connect_timeout=10.0,
        handshake_timeout=10.0,
        query_timeout=5.0,
        idle_timeout=60.0,
        max_in_flight=64,
        max_queued=256,
        stats=None,
        log_fields=None,
        dial=dial,
    ):
        self.reactor = reactor
        self.upstream = upstream
        self.resolver = resolver
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.query_timeout = query_timeout
        self.idle_timeout = idle_timeout
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self.stats = stats
        self.log_fields = dict(log_fields or {})
        self._dial = dial
        self._queue = deque()
        self._leg = None  # the open connection
        self._connecting = None  # Deferred of a dial + handshake in progress
        self._idle = None
        self._closed = False

    @property
    def connected(self):
        """True while a tunnel to the resolver is open."""
        return self._leg is not None

    def pending(self):
        """Queries waiting or in flight."""
        return len(self._queue) + (len(self._leg.in_flight) if self._leg is not None else 0)

    def query(self, wire):
        """Send a client query (its ID is rewritten on the way and restored by the caller).

        :returns: Deferred firing with the resolver's reply bytes (carrying our ID), or failing
            with :class:`DNSTimeout`, :class:`Overloaded` or :class:`DNSUnavailable`.
        """
        if self._closed:
            return defer.fail(DNSUnavailable("resolver for %s is closed" % (self.upstream,)))
        if self.pending() >= self.max_in_flight + self.max_queued:
            return defer.fail(Overloaded("%d DNS queries pending via %s" % (self.pending(), self.upstream)))
        p = _Pending(bytes(wire), self.reactor.seconds() + self.query_timeout)
        p.timer = self.reactor.callLater(self.query_timeout, self._timed_out, p)
        self._queue.append(p)
        self._pump()
        return p.d

    def close(self, why="closed"):
        """Close the connection and fail every pending query (device removed or server stopping)."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        exc = DNSUnavailable("resolver for %s %s" % (self.upstream, why))
        if self._leg is not None:
            in_flight, self._leg.in_flight = list(self._leg.in_flight.values()), {}
            for p in in_flight:
                self._settle(p, exc)
        self._drop_leg(why)
        self._fail_all(exc)

    # --- sending --------------------------------------------------------------------------------

    def _pump(self):
        leg = self._leg
        if leg is None:
            if self._queue and self._connecting is None and not self._closed:
                self._connect()
            return
        while self._queue and len(leg.in_flight) < self.max_in_flight:
            self._send(leg, self._queue.popleft())
        if leg.in_flight or self._queue:
            self._stop_idle()
        elif self._idle is None:
            self._idle = self.reactor.callLater(self.idle_timeout, self._idle_expired)

    def _send(self, leg, p):
        p.id = leg.allocate()
        p.conn = leg
        p.attempts += 1
        p.heard = leg.replies
        leg.in_flight[p.id] = p
        leg.sendString(dnsmessage.with_id(p.wire, p.id))

    # --- connecting -----------------------------------------------------------------------------

    def _connect(self):
        host, port = self.resolver
        state = {}

        def dialled(device):
            state["device"] = device
            return device.handshake(host, port)

        def established(leftover):
            device = state["device"]
            leg = _Leg(self, device)
            leg.transport = device.transport  # writes go straight to the device connection
            self._connecting = None
            self._leg = leg
            if self.stats is not None:
                self.stats.upstream_opened += 1
            device.attach(leg)
            if leftover:
                leg.dataReceived(leftover)
            if self._leg is leg:
                self._pump()

        def failed(reason):
            self._connecting = None
            if reason.check(defer.CancelledError) and self._closed:
                return None
            kind = reason.value.kind if isinstance(reason.value, UpstreamError) else "internal"
            if self.stats is not None:
                self.stats.upstream_failed[kind] += 1
            if kind == "internal":
                self._log.failure("DNS tunnel via {upstream} failed internally", reason, upstream=str(self.upstream))
            else:
                self._log.warn(
                    "DNS tunnel via {upstream} to {resolver} failed: {kind}: {reason}",
                    upstream=str(self.upstream),
                    resolver="%s:%d" % (host, port),
                    kind=kind,
                    reason=str(reason.value),
                    event="dns-upstream-failed",
                    **self.log_fields,
                )
            self._fail_all(DNSUnavailable("DNS tunnel via %s failed: %s" % (self.upstream, kind)))
            return None

        d = self._dial(self.reactor, self.upstream, self.connect_timeout, self.handshake_timeout)
        d.addCallback(dialled)
        self._connecting = d
        d.addCallbacks(established, failed)
        d.addErrback(lambda f: self._log.failure("DNS tunnel setup bug", f))

    # --- replies and losses ---------------------------------------------------------------------

    def _frame(self, leg, frame):
        leg.replies += 1
        message_id = dnsmessage.reply_id(frame)
        if message_id is None:
            return
        p = leg.in_flight.pop(message_id, None)
        if p is None:
            leg.stale.discard(message_id)  # a late reply to a timed-out query: nobody waits
            return
        p.timer.cancel()
        p.d.callback(frame)
        if self._leg is leg:
            self._pump()

    def _lost(self, leg, reason):
        if self._leg is leg:
            self._leg = None
            self._stop_idle()
        if self.stats is not None:
            self.stats.upstream_closed[leg.closing or "dropped"] += 1
        now = self.reactor.seconds()
        retry = []
        for p in leg.in_flight.values():
            p.conn = None
            if p.attempts < 2 and p.deadline > now and not self._closed:
                retry.append(p)
            else:
                self._settle(p, DNSUnavailable("DNS tunnel via %s lost with the query in flight" % (self.upstream,)))
        leg.in_flight.clear()
        self._queue.extendleft(reversed(retry))  # retries go first, in their original order
        if leg.closing is None and not self._closed:
            self._log.info(
                "DNS tunnel via {upstream} lost ({retried} queries retried)",
                upstream=str(self.upstream),
                retried=len(retry),
                **self.log_fields,
            )
        self._pump()

    def _timed_out(self, p):
        p.timer = None
        leg = p.conn
        if leg is not None and leg.in_flight.get(p.id) is p:
            del leg.in_flight[p.id]
            leg.stale.add(p.id)
        else:
            try:
                self._queue.remove(p)
            except ValueError:
                pass
        p.d.errback(DNSTimeout("no DNS reply via %s within %gs" % (self.upstream, self.query_timeout)))
        if leg is not None and self._leg is leg:
            # Nothing heard on the tunnel since this query went out: it is dead (cellular NAT
            # dropped it, the phone slept). Later queries get a fresh one.
            if leg.replies == p.heard or len(leg.stale) > MAX_STALE_IDS:
                self._drop_leg("stale")
            else:
                self._pump()

    def _settle(self, p, exc):
        if p.timer is not None and p.timer.active():
            p.timer.cancel()
        p.timer = None
        p.d.errback(exc)

    def _fail_all(self, exc):
        queue, self._queue = self._queue, deque()
        for p in queue:
            self._settle(p, exc)

    def _drop_leg(self, why):
        leg, self._leg = self._leg, None
        self._stop_idle()
        if leg is not None:
            leg.closing = why
            leg.device.abort()  # connectionLost reaches _lost, which retries what was in flight

    def _idle_expired(self):
        self._idle = None
        leg, self._leg = self._leg, None
        if leg is not None:
            leg.closing = "idle"
            leg.transport.loseConnection()

    def _stop_idle(self):
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None


def read_resolv_conf(path="/etc/resolv.conf"):
    """``nameserver`` entries as ``(host, 53)`` pairs; glibc's default 127.0.0.1 when none."""
    servers = []
    try:
        with open(path) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "nameserver":
                    servers.append((fields[1].split("%", 1)[0], 53))
    except OSError:
        pass
    return servers or [("127.0.0.1", 53)]


class HostResolver:
    """The ``host`` policy: this server's resolvers, over UDP, retried over TCP when truncated.

    :param servers: ``(host, port)`` pairs; empty means ``/etc/resolv.conf`` (read once, here).
    :param resolver: anything with ``queryUDP``/``queryTCP`` like ``twisted.names.client.Resolver``
        (tests inject a fake); built from ``servers`` when None.
    """

    def __init__(self, reactor, servers=(), query_timeout=5.0, resolver=None):
        self.reactor = reactor
        self.query_timeout = query_timeout
        if resolver is None:
            servers = list(servers) or read_resolv_conf()
            resolver = client.Resolver(servers=servers, reactor=reactor)
        self.resolver = resolver

    def query(self, query):
        """Resolve a :class:`proxy.dnsmessage.Query`; fires with reply bytes, fails like DeviceResolver."""
        question = [dns.Query(query.name, query.qtype, query.qclass)]
        # Two UDP tries within the budget; the overall timeout below is the real bound.
        d = self.resolver.queryUDP(question, timeout=(self.query_timeout / 2.5, self.query_timeout / 2.5))

        def truncated(message):
            if message.trunc:
                return self.resolver.queryTCP(question, timeout=self.query_timeout)
            return message

        def encoded(message):
            message.maxSize = 0
            return message.toStr()

        def failed(reason):
            if reason.check(defer.TimeoutError, defer.CancelledError, dns.DNSQueryTimeoutError):
                raise DNSTimeout("no DNS reply from the host resolver within %gs" % self.query_timeout)
            raise DNSUnavailable("host resolver failed: %s" % reason.getErrorMessage())

        d.addCallback(truncated)
        d.addTimeout(self.query_timeout, self.reactor)
        d.addCallbacks(encoded, failed)
        return d
