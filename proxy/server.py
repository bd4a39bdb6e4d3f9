# -*- test-case-name: tests.unit.test_server -*-
"""The transparent proxy's listening side: accept, guard, sniff, dial, relay.

Every accepted connection is identified by its source address (the VPN
client) and its original destination. It is refused with an RST, and
counted, when the source has no mapping (never an open proxy), when the
destination is this host (loop guard) or not the public internet
(:mod:`proxy.destinations`), or when a limit is reached: the global one, the
client's own, or its fair share of its phone (:mod:`proxy.fairshare`). Otherwise
the client's device proxy is dialled at once while, on client-first ports
only, the first bytes are sniffed for a TLS SNI or HTTP Host name within a
short budget; the CONNECT goes out when both are ready, unless the name is one
no public host has (refused like an address). Any upstream failure reaches the
client as an RST. Every per-connection log line is throttled per (what, client)
with a count of the lines held back (:mod:`proxy.logthrottle`).
"""

import collections
import errno
import resource
import socket

from twisted.internet import defer, task
from twisted.internet import error as terror
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python import failure
from zope.interface import implementer

from proxy import fairshare, origdst, sniff
from proxy.destinations import DestinationPolicy
from proxy.localaddr import LocalAddresses
from proxy.logthrottle import LogThrottle, held_back
from proxy.relay import Relay
from proxy.settings import ProxySettings
from proxy.stats import ProxyStats
from proxy.tunnel import open_tunnel
from proxy.upstream import dial
from proxy.upstreamerrors import UpstreamError

FDS_RESERVED = 256  # management, admin, netlink, logs, dialling headroom


def fd_derived_limit(splice):
    """Connections that fit under ``RLIMIT_NOFILE``: 2 fds each, plus pipes when spliced."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    per_connection = 3 if splice else 2
    return max(16, (soft - FDS_RESERVED) // per_connection)


def raise_nofile_limit():
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (Debian's soft default is 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else 1048576
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


class SniffSkipList:
    """(client, destination, port) triples where the client stayed silent: stop sniffing them.

    Some client-first-looking ports carry server-first protocols; after
    ``threshold`` silent budgets in a row a destination is skipped for ``ttl``
    seconds (mihomo's rule), so its banner stops waiting on us. What one client
    teaches applies to that client only: another's TLS to the same destination
    is still sent to its phone by name.
    """

    def __init__(self, clock, threshold=5, ttl=600.0, size=4096):
        self.clock = clock
        self.threshold = threshold
        self.ttl = ttl
        self.size = size
        self._silent = collections.OrderedDict()

    def skip(self, key):
        entry = self._silent.get(key)
        if entry is None:
            return False
        count, since = entry
        if self.clock.seconds() - since > self.ttl:
            del self._silent[key]
            return False
        return count >= self.threshold

    def silent(self, key):
        count, _ = self._silent.pop(key, (0, 0.0))
        self._silent[key] = (count + 1, self.clock.seconds())
        while len(self._silent) > self.size:
            self._silent.popitem(last=False)

    def spoke(self, key):
        self._silent.pop(key, None)


def tune_socket(transport, keepalive):
    """TCP_NODELAY (relayed small writes must not wait on Nagle) and keepalive
    (idle ``keepalive`` s, probes every quarter of that, 4 probes) on a real socket."""
    try:
        transport.setTcpNoDelay(True)
        if keepalive:
            sock = transport.getHandle()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, keepalive // 4))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)
    except (AttributeError, OSError):
        pass  # not a kernel TCP socket (tests' StringTransport)


@implementer(IHalfCloseableProtocol)
class ProxyConnection(Protocol):
    """One accepted client connection, from identification to the end of its relay."""

    _log = Logger()
    device_key = None  # the route key (device name) while device health is watched

    def __init__(self, factory):
        self.factory = factory
        self.client_ip = None
        self.destination = None
        self.upstream = None
        self.relay = None
        self.sniffed_name = None
        self._buffer = bytearray()
        self._sniffing = False
        self._sniff_timer = None
        self._opening = None  # the open_tunnel Deferred until it fires
        self._target = None  # (host, port) to ask the device for, once sniffing is over
        self._target_later = None  # Deferred of _target while sniffing runs beside the dial
        self._tunnel = None  # established, not yet relaying
        self._client_eof = False
        self._registered = False
        self._done = False
        self.accepted_at = factory.reactor.seconds()

    # --- Twisted callbacks -------------------------------------------------

    def connectionMade(self):
        try:
            self._admit()
        except Exception:
            self._log.failure("proxy connection setup failed; aborting it")
            self._close_setup()
            self.transport.abortConnection()

    def dataReceived(self, data):
        # Until the relay starts (then the relay's own method takes the transport's chunks).
        self._buffer += data
        # An HTTP head can only progress at a line end: skip re-parsing byte-by-byte dribbles.
        if self._sniffing and (self._buffer[0] == 0x16 or b"\n" in data or len(self._buffer) >= sniff.SNIFF_CAP):
            self._try_sniff()

    def readConnectionLost(self):
        # A paused-then-resumed transport can report EOF twice; pass it on once.
        if self._client_eof:
            return
        self._client_eof = True
        if self.relay is not None:
            self.relay.client_leg.readConnectionLost()
            return
        if self._sniffing:
            self._end_sniff(None, "eof")

    def writeConnectionLost(self):
        if self.relay is not None:
            self.relay.client_leg.writeConnectionLost()

    def connectionLost(self, reason=None):
        if self.relay is not None:
            self.relay.client_leg.connectionLost(reason)
            return
        try:
            self._close_setup()
        finally:
            self._forget()

    # --- used by MappingTable when the client's mapping goes away ------------

    def abortConnection(self):
        """RST this client connection and its upstream (mapping removed or changed)."""
        if self.relay is not None:
            self.relay.abort("mapping removed")
            return
        self._close_setup()
        self.transport.abortConnection()

    # --- admission -----------------------------------------------------------

    def _admit(self):
        f = self.factory
        f.stats.accepted += 1
        self.client_ip = origdst.unmap(self.transport.getPeer().host)
        try:
            dst_ip, dst_port = f.destination_of(self.transport)
        except OSError as e:
            return self._refuse("origdst", "no original destination (%s)" % (e.strerror or e))
        self.destination = (dst_ip, dst_port)
        if f.is_loop(dst_ip, dst_port, self.transport.getHost()):
            return self._refuse("loop", "destination %s is this host" % self._dest())
        upstream = f.mappings.lookup(self.client_ip)
        if upstream is None:
            return self._refuse("unmapped", "source has no device mapping")
        if f.health is not None:
            self.device_key = f.mappings.route(self.client_ip).key
            if not f.health.alive(self.device_key):
                return self._refuse("device-down", "device %s is down" % (self.device_key,))
        policy = f.mappings.policy(self.client_ip)
        why = f.destinations.address_refusal(dst_ip, policy)
        if why is not None:
            return self._refuse("destination", why)
        limit = f.connection_limit()
        if f.stats.active >= limit:
            return self._refuse("limit", "global connection limit %d reached" % limit)
        if f.mappings.live_count(self.client_ip) >= f.settings.max_connections_per_client:
            return self._refuse(
                "client-limit", "per-client limit %d reached" % f.settings.max_connections_per_client
            )
        why = fairshare.refusal(f.mappings, self.client_ip, upstream, policy.device_limit)
        if why is not None:
            return self._refuse("device-share", why)
        self.upstream = upstream
        f.mappings.register(self.client_ip, self)
        self._registered = True
        f.stats.active += 1
        f.connections.add(self)
        tune_socket(self.transport, f.settings.keepalive)

        key = self._skip_key()
        if dst_port not in f.settings.sniff_ports:
            self._end_sniff(None, "skipped")
        elif f.skiplist.skip(key):
            self._end_sniff(None, "learned")
        else:
            self._sniffing = True
            self._sniff_timer = f.reactor.callLater(f.settings.sniff_budget, self._sniff_timeout)
        if not self._done:
            self._open()

    def _skip_key(self):
        return (self.client_ip,) + self.destination

    def _refuse(self, reason, why):
        """RST an unacceptable connection, count it, log it (throttled per reason and source)."""
        self.factory.stats.refused[reason] += 1
        suppressed = self.factory.log_throttle.allow((reason, self.client_ip))
        if suppressed is not None:
            self._log.warn(
                "refused connection from {client} to {dest}: {why}" + held_back(suppressed),
                client=str(self.client_ip),
                dest=self._dest(),
                why=why,
                reason=reason,
                event="proxy-refused",
                suppressed=suppressed,
            )
        self._close_setup()
        self.transport.abortConnection()

    def _dest(self):
        if self.destination is None:
            return "?"
        ip, port = self.destination
        return "[%s]:%d" % (ip, port) if ip.version == 6 else "%s:%d" % (ip, port)

    # --- sniffing --------------------------------------------------------------

    def _try_sniff(self):
        data = bytes(self._buffer)
        if data[:1] == b"\x16":
            result, how = sniff.tls_sni(data), "sni"
        else:
            result, how = sniff.http_host(data), "host"
        if result is sniff.NEED_MORE and len(data) < sniff.SNIFF_CAP:
            return
        self._end_sniff(None if result is sniff.NEED_MORE else result, how)

    def _sniff_timeout(self):
        self._sniff_timer = None
        try:
            if self._sniffing:
                if not self._buffer:
                    self.factory.skiplist.silent(self._skip_key())
                self._end_sniff(None, "timeout")
        except Exception:
            self._internal_error(failure.Failure())

    def _end_sniff(self, name, how):
        """Sniffing is over (name found, not found, budget spent, or port skipped)."""
        self._sniffing = False
        if self._sniff_timer is not None and self._sniff_timer.active():
            self._sniff_timer.cancel()
        self._sniff_timer = None
        if self._buffer and self.destination is not None:
            self.factory.skiplist.spoke(self._skip_key())
        if name is not None:
            valid = sniff.valid_hostname(name)
            if valid is None:
                how = "invalid"
            self.sniffed_name = valid
        elif how in ("sni", "host"):
            how = "none"
        self.factory.stats.sniffed[how] += 1
        if self.sniffed_name is not None:
            why = self.factory.destinations.name_refusal(self.sniffed_name)
            if why is not None:
                return self._refuse("destination-name", why)
        self.transport.pauseProducing()
        self._target = (self.sniffed_name or str(self.destination[0]), self.destination[1])
        waiting, self._target_later = self._target_later, None
        if waiting is not None:
            waiting.callback(self._target)

    # --- upstream ------------------------------------------------------------------

    def _open(self):
        """Open the tunnel: the dial starts now; the device is asked once the name is known."""
        f = self.factory
        s = f.settings
        target = self._target
        if target is None:
            target = self._target_later = defer.Deferred()
        self._opening = open_tunnel(f.reactor, self.upstream, target, s.connect_timeout, s.handshake_timeout, f.dial)
        self._opening.addCallbacks(self._opened, self._failed).addErrback(self._internal_error)

    def _opened(self, tunnel):
        self._opening = None
        if self._done:
            tunnel.abort()
            return
        f = self.factory
        if f.health is not None:
            f.health.traffic_succeeded(self.device_key)
        tune_socket(tunnel.transport, f.settings.keepalive)
        self._tunnel = tunnel
        self.relay = relay = Relay(f.reactor, self.transport, tunnel.transport, on_finished=self._relay_finished, splice=f.splice)
        f.stats.relayed += 1
        self.dataReceived = relay.client_leg.dataReceived  # one hop per chunk from now on
        to_upstream, self._buffer = bytes(self._buffer), None
        relay.start(to_upstream=to_upstream, attach=tunnel.attach)
        self._tunnel = self._target = None  # the relay owns both sides now
        if self._client_eof:
            relay.client_leg.readConnectionLost()

    def _failed(self, reason):
        self._opening = None
        if self._done:
            return None  # the client went away first; nothing to report
        err = reason.value
        kind = err.kind if isinstance(err, UpstreamError) else "internal"
        if not isinstance(err, UpstreamError):
            self._log.failure("unexpected error while connecting through the device", reason)
        self.factory.stats.upstream_errors[kind] += 1
        if self.factory.health is not None and kind in ("unreachable", "timeout"):
            self.factory.health.traffic_failed(self.device_key)
        suppressed = self.factory.log_throttle.allow(("upstream-" + kind, self.client_ip))
        if suppressed is not None:
            fields = {"device": str(self.upstream)}  # Upstream.__str__ never shows credentials
            fields.update(self.factory.mappings.log_fields(self.client_ip))  # the owner's user, device name, ...
            self._log.warn(
                "upstream failed for {client} via {upstream} to {dest}: {kind}: {reason}" + held_back(suppressed),
                client=str(self.client_ip),
                upstream=str(self.upstream),
                dest=self._dest() if not self.sniffed_name else "%s (%s)" % (self.sniffed_name, self._dest()),
                kind=kind,
                reason=str(err),
                event="upstream-failed",
                suppressed=suppressed,
                **fields,
            )
        self._close_setup()
        self.transport.abortConnection()
        return None

    def _internal_error(self, reason):
        """A bug in our own setup code: log it (throttled: a bug hit by every connection must
        not flood the log either), RST both sides, release the slot."""
        suppressed = self.factory.log_throttle.allow(("internal", self.client_ip))
        if suppressed is not None:
            self._log.failure(
                "proxy connection from {client} failed internally" + held_back(suppressed),
                reason,
                client=str(self.client_ip),
                suppressed=suppressed,
            )
        self.factory.stats.upstream_errors["internal"] += 1
        relay, self.relay = self.relay, None
        if relay is not None:
            relay.abort("internal error")
        try:
            self._close_setup()
        finally:
            self.transport.abortConnection()
        return None

    # --- teardown ----------------------------------------------------------------

    def _close_setup(self):
        """Stop whatever is in flight before the relay exists (idempotent)."""
        self._done = True
        self._sniffing = False
        if self._sniff_timer is not None and self._sniff_timer.active():
            self._sniff_timer.cancel()
        self._sniff_timer = None
        if self._opening is not None:
            d, self._opening = self._opening, None
            d.cancel()
        if self._tunnel is not None and self.relay is None:
            self._tunnel.abort()

    def bytes_relayed(self):
        """``(up, down)`` bytes relayed so far (0 before the relay starts); for per-client totals."""
        relay = self.relay
        return (relay.bytes_up, relay.bytes_down) if relay is not None else (0, 0)

    def _relay_finished(self, relay):
        stats = self.factory.stats
        stats.finished_up += relay.bytes_up
        stats.finished_down += relay.bytes_down
        stats.completed += 1
        if self._registered:
            self.factory.mappings.add_bytes(self.client_ip, relay.bytes_up, relay.bytes_down)
        self._forget()

    def _forget(self):
        if self._registered:
            self._registered = False
            f = self.factory
            f.mappings.unregister(self.client_ip, self)
            f.stats.active -= 1
            f.connections.discard(self)


class ProxyFactory(Factory):
    """Builds :class:`ProxyConnection` s sharing mappings, settings, stats and limits.

    :param destination_of: ``transport → (ip, port)``; REDIRECT lookup by default,
        :func:`proxy.origdst.tproxy_destination` for TPROXY, a stub in tests.
    :param local: a container of local addresses for the loop guard.
    :param splice: a :class:`proxy.splice.SplicePolicy`, or None for the plain relay.
    :param transparent: TPROXY mode (the accepted socket's address is the destination).
    :param dial: :func:`proxy.upstream.dial` (tests pass a scripted one).
    :param destinations: the :class:`~proxy.destinations.DestinationPolicy`; by default
        special and private addresses and special-use names are refused.
    """

    _log = Logger()

    def __init__(
        self,
        reactor,
        mappings,
        settings=ProxySettings(),
        stats=None,
        destination_of=None,
        local=None,
        splice=None,
        transparent=False,
        dial=dial,
        destinations=None,
    ):
        self.reactor = reactor
        self.mappings = mappings
        self.settings = settings
        self.stats = stats if stats is not None else ProxyStats()
        self.transparent = transparent
        self.dial = dial
        if destination_of is None:
            lookup = origdst.tproxy_destination if transparent else origdst.redirect_destination
            destination_of = lambda transport: lookup(transport.getHandle())  # noqa: E731
        self.destination_of = destination_of
        self.local = local if local is not None else LocalAddresses()
        self.splice = splice
        self.max_connections = settings.max_connections or fd_derived_limit(splice is not None)
        self._per_connection = 3 if splice is not None else 2
        #: ``() -> int``: sockets the rest of the process holds outside this proxy (device health
        #: probes, the DNS service's clients and device tunnels); an fd-derived cap shrinks by them,
        #: so a proxy at its cap never takes the descriptors a health probe needs (a probe failing
        #: for want of an fd would mark a live phone down). An explicit max_connections is kept.
        self.sockets_elsewhere = None
        self.destinations = destinations if destinations is not None else DestinationPolicy()
        self.skiplist = SniffSkipList(reactor)
        self.connections = set()
        self.stats.live = lambda: (c.bytes_relayed() for c in self.connections)
        self.listening = set()  # (ip, port) pairs of our own listeners
        self.listening_ports = set()
        self.log_throttle = LogThrottle(reactor)
        #: device health (:class:`proxy.health.HealthMonitor`: ``alive``, ``traffic_failed``,
        #: ``traffic_succeeded`` by route key), or None: every device is taken as alive.
        self.health = None

    def connection_limit(self):
        """The global cap now: ``max_connections``, less what :attr:`sockets_elsewhere` holds when
        the cap was derived from ``RLIMIT_NOFILE``."""
        if self.settings.max_connections or self.sockets_elsewhere is None:
            return self.max_connections
        return max(16, self.max_connections - -(-self.sockets_elsewhere() // self._per_connection))

    def buildProtocol(self, addr):
        p = ProxyConnection(self)
        p.factory = self
        return p

    def is_loop(self, ip, port, accepted_on):
        """Destinations on this host (our listeners above all) are never relayed.

        With REDIRECT, a connection that was not redirected reports its real
        destination, i.e. the very address it was accepted on: caught here even
        before the local-address cache knows a new tun address.
        """
        if not self.transparent and port == accepted_on.port and ip == origdst.unmap(accepted_on.host):
            return True
        if ip in self.local:
            return True
        if port in self.listening_ports and (ip, port) not in self.listening:
            # Our port on an address the cache may not know yet (a tun that just
            # came up): a direct connection to us under TPROXY. Re-read (≈1 ms).
            refresh = getattr(self.local, "refresh", None)
            if refresh is not None:
                refresh()
                return ip in self.local
        return (ip, port) in self.listening

    def sweep(self):
        """Enforce idle and half-closed timeouts (a coarse pass every few seconds)."""
        now = self.reactor.seconds()
        s = self.settings
        expired = 0
        setup_limit = s.sniff_budget + s.connect_timeout + s.handshake_timeout + 2 * s.sweep_interval
        for conn in list(self.connections):
            relay = conn.relay
            if relay is not None:
                why = relay.check_timeouts(now, s.idle_timeout, s.half_closed_timeout)
                if why is not None:
                    self.stats.closed[why] += 1
                    expired += 1
            elif now - conn.accepted_at > setup_limit:
                # Every setup step has its own timeout; this only catches a bug.
                self._log.error("proxy connection from {client} stuck in setup; aborting", client=str(conn.client_ip))
                self.stats.closed["setup-stuck"] += 1
                conn.abortConnection()
        if expired:
            self._log.info("closed {count} proxied connections on timeout", count=expired)
        self.log_throttle.expire()
        refresh = getattr(self.local, "refresh", None)
        if refresh is not None:
            refresh()


def listen(reactor, factory, port, addresses=("0.0.0.0", "::"), transparent=False, backlog=1024):
    """Listen on ``port`` at each address; IPv6 sockets are v6-only so both families coexist.

    Sockets are built by hand (``IP_TRANSPARENT`` must be set before bind for
    TPROXY) and adopted by the reactor. Returns the listening ports; raises
    ``CannotListenError`` naming the address on failure.
    """
    ports = []
    try:
        for address in addresses:
            ip = origdst.unmap(address)
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError as e:  # e.g. EAFNOSUPPORT on a host booted without IPv6
                raise terror.CannotListenError(str(ip), port, e)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if transparent:
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, origdst.IPV6_TRANSPARENT, 1)
                    else:
                        sock.setsockopt(socket.SOL_IP, origdst.IP_TRANSPARENT, 1)
                sock.bind((str(ip), port))
                sock.listen(backlog)
                sock.setblocking(False)
                lp = reactor.adoptStreamPort(sock.fileno(), family, factory)
            except OSError as e:
                raise terror.CannotListenError(str(ip), port, e)
            finally:
                sock.close()
            host = lp.getHost()
            factory.listening.add((origdst.unmap(host.host), host.port))
            factory.listening_ports.add(host.port)
            ports.append(lp)
    except BaseException:
        for lp in ports:
            lp.stopListening()
        raise
    return ports


def is_unavailable_family(err):
    """An address family this host lacks (IPv6 disabled): worth a warning, not a crash."""
    reason = getattr(err, "socketError", None)
    return isinstance(reason, OSError) and reason.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL)


class SweepLoop:
    """Runs :meth:`ProxyFactory.sweep` every ``settings.sweep_interval`` seconds."""

    def __init__(self, factory):
        self.factory = factory
        self._loop = task.LoopingCall(factory.sweep)
        self._loop.clock = factory.reactor

    def start(self):
        self._loop.start(self.factory.settings.sweep_interval, now=False).addErrback(
            lambda f: Logger().failure("proxy sweeper stopped", f)
        )

    def stop(self):
        if self._loop.running:
            self._loop.stop()


