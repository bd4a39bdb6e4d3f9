# -*- test-case-name: tests.unit.test_dns_upstream -*-
"""Where customer DNS queries are resolved: through the device, or (by policy) by this host.

:class:`DeviceResolver` keeps one DNS-over-TCP connection (RFC 7766 framing) per device,
tunnelled through the device's CONNECT/SOCKS5 proxy to a public resolver, so names are resolved
from the customer's own network and never leak from the server. Queries are pipelined with
per-connection IDs (clients' IDs may collide; ours never do). A dropped connection costs each
in-flight query one retry on a fresh connection while its time lasts; the dial itself is never
retried in a loop, and there is no fallback to the host's resolver: a device failure is a
SERVFAIL, not a leak.

Customers sharing a phone share its resolver fairly (:mod:`proxy.dnsqueue`). The ``host``
policy's resolver is :mod:`proxy.dnshost`; the errors all of them raise, :mod:`proxy.dnserrors`.
"""

import random

from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols.basic import Int16StringReceiver

from proxy import dnsmessage
from proxy.dnserrors import DNSTimeout, DNSUnavailable, Overloaded, OverShare
from proxy.dnsqueue import FairQueue, admit_fairly
from proxy.logthrottle import LogThrottle, held_back
from proxy.tunnel import open_tunnel
from proxy.upstream import dial
from proxy.upstreamerrors import UpstreamError

__all__ = ["DeviceResolver"]

MAX_STALE_IDS = 1024  # timed-out IDs kept reserved on one connection before we give up on it


class _Pending:
    """One client query on its way through the device."""

    __slots__ = ("wire", "d", "timer", "deadline", "attempts", "conn", "id", "heard", "owner", "held", "flying")

    def __init__(self, wire, deadline, owner=None):
        self.wire = wire
        self.owner = owner
        self.held = self.flying = False
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
    :param log_throttle: a :class:`proxy.logthrottle.LogThrottle` for the tunnel's failure
        lines (the DNS server shares its own); one on ``reactor`` by default.
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
        log_throttle=None,
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
        self.log_throttle = log_throttle if log_throttle is not None else LogThrottle(reactor)
        self._fair = FairQueue(max_in_flight)
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
        return self._fair.queued + (len(self._leg.in_flight) if self._leg is not None else 0)

    def held(self, owner):
        """Queries ``owner`` has waiting or in flight here."""
        return self._fair.held(owner)

    def query(self, wire, owner=None):
        """Send a client query (its ID is rewritten on the way and restored by the caller).

        :param owner: who asks (the client's address): the unit of fairness (:class:`FairQueue`).
        :returns: Deferred firing with the resolver's reply bytes (carrying our ID), or failing
            with :class:`DNSTimeout`, :class:`Overloaded` (:class:`OverShare`) or
            :class:`DNSUnavailable`.
        """
        if self._closed:
            return defer.fail(DNSUnavailable("resolver for %s is closed" % (self.upstream,)))
        try:
            victim = admit_fairly(self._fair, owner, self.max_in_flight + self.max_queued, self.pending(), self.upstream)
        except Overloaded as e:
            return defer.fail(e)
        if victim is not None:
            self._settle(victim, OverShare("evicted for a client under its fair share via %s" % (self.upstream,)))
        p = _Pending(bytes(wire), self.reactor.seconds() + self.query_timeout, owner)
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
        """Close the connection and fail every pending query (device removed or server stopping)."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        exc = DNSUnavailable("resolver for %s %s" % (self.upstream, why))
        if self._leg is not None:
            in_flight, self._leg.in_flight = list(self._leg.in_flight.values()), {}
            for p in in_flight:
                self._fair.landed(p)
                self._settle(p, exc)
        self._drop_leg(why)
        self._fail_all(exc)

    # --- sending --------------------------------------------------------------------------------

    def _pump(self):
        leg = self._leg
        if leg is None:
            if self._fair.queued and self._connecting is None and not self._closed:
                self._connect()
            return
        while len(leg.in_flight) < self.max_in_flight:
            p = self._fair.take()
            if p is None:
                break
            self._send(leg, p)
        if leg.in_flight or self._fair.queued:
            self._stop_idle()
        elif self._idle is None:
            self._idle = self.reactor.callLater(self.idle_timeout, self._idle_expired)

    def _send(self, leg, p):
        self._fair.sent(p)
        p.id = leg.allocate()
        p.conn = leg
        p.attempts += 1
        p.heard = leg.replies
        leg.in_flight[p.id] = p
        leg.sendString(dnsmessage.with_id(p.wire, p.id))

    # --- connecting -----------------------------------------------------------------------------

    def _connect(self):
        host, port = self.resolver

        def established(tunnel):
            leg = _Leg(self, tunnel.device)
            leg.transport = tunnel.transport  # writes go straight to the device connection
            self._connecting = None
            self._leg = leg
            if self.stats is not None:
                self.stats.upstream_opened += 1
            tunnel.attach(leg)
            if self._leg is leg:
                self._pump()

        def failed(reason):
            self._connecting = None
            if reason.check(defer.CancelledError) and self._closed:
                return None
            kind = reason.value.kind if isinstance(reason.value, UpstreamError) else "internal"
            if self.stats is not None:
                self.stats.upstream_failed[kind] += 1
            suppressed = self.log_throttle.allow(("dns-upstream-failed", kind, str(self.upstream)))
            if suppressed is None:
                pass
            elif kind == "internal":
                self._log.failure(
                    "DNS tunnel via {upstream} failed internally" + held_back(suppressed),
                    reason,
                    upstream=str(self.upstream),
                    suppressed=suppressed,
                )
            else:
                self._log.warn(
                    "DNS tunnel via {upstream} to {resolver} failed: {kind}: {reason}" + held_back(suppressed),
                    upstream=str(self.upstream),
                    resolver="%s:%d" % (host, port),
                    kind=kind,
                    reason=str(reason.value),
                    event="dns-upstream-failed",
                    suppressed=suppressed,
                    **self.log_fields,
                )
            self._fail_all(DNSUnavailable("DNS tunnel via %s failed: %s" % (self.upstream, kind)))
            return None

        d = open_tunnel(self.reactor, self.upstream, (host, port), self.connect_timeout, self.handshake_timeout, self._dial)
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
        self._fair.landed(p)
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
            self._fair.landed(p)
            if p.attempts < 2 and p.deadline > now and not self._closed:
                retry.append(p)
            else:
                self._settle(p, DNSUnavailable("DNS tunnel via %s lost with the query in flight" % (self.upstream,)))
        leg.in_flight.clear()
        for p in reversed(retry):  # retries go first, in their original order
            self._fair.enqueue(p, front=True)
        if leg.closing is None and not self._closed:
            suppressed = self.log_throttle.allow(("dns-upstream-lost", str(self.upstream)))
            if suppressed is not None:
                self._log.info(
                    "DNS tunnel via {upstream} lost ({retried} queries retried)" + held_back(suppressed),
                    upstream=str(self.upstream),
                    retried=len(retry),
                    event="dns-upstream-lost",
                    suppressed=suppressed,
                    **self.log_fields,
                )
        self._pump()

    def _timed_out(self, p):
        p.timer = None
        leg = p.conn
        if leg is not None and leg.in_flight.get(p.id) is p:
            del leg.in_flight[p.id]
            self._fair.landed(p)
            leg.stale.add(p.id)
        else:
            self._fair.remove(p)
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
        for p in self._fair.clear():
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
