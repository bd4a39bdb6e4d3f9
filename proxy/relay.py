# -*- test-case-name: tests.unit.test_relay -*-
"""Joins an accepted client connection to its upstream connection, byte for byte, both ways.

Why it is more than ``portforward``: stock portforward turns a client's FIN
into a full close and loses the reply, and does not tell a reset from a clean
close. Here each side half-closes independently (a FIN read on one side
becomes ``shutdown(SHUT_WR)`` on the other once its buffer is flushed), a
reset on one side becomes a reset (``abortConnection``) on the other, and
memory stays bounded because each transport is the other's streaming
producer. Long, busy connections may move to the ``splice(2)`` pump
(:mod:`proxy.splice`); counters and timeouts work the same in both modes.

A reset is reported (and passed on) only when bytes could still be lost: an
RST or a socket errno while a side still had something to send or receive.
A FIN is never one, whichever side sends it first and whether it comes from
shutdown() or close(); nor is the reactor's guess about a hang-up, nor a
side ending after both of its directions were done.
"""

import errno

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, IReactorFDSet
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from proxy.splice import CLIENT, SIDE_NAMES, UPSTREAM, SplicePump

try:
    from twisted.internet.tcp import Connection as _TCPConnection
except ImportError:  # pragma: no cover - platforms without the posix TCP transport
    _TCPConnection = None

_RESET_ERRNOS = (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ECONNABORTED, errno.ETIMEDOUT)


def write_buffer_len(transport):
    """Bytes a Twisted FileDescriptor transport still holds in userspace (0 for other transports)."""
    data = getattr(transport, "dataBuffer", None)
    if data is None:
        return 0
    return len(data) - transport.offset + transport._tempDataLen


@implementer(IPushProducer)
class _Producer:
    """A transport as the other transport's streaming producer, except that it cannot be stopped.

    A Twisted transport calls its producer's stopProducing() (``loseConnection()`` on a
    transport) from its own connectionLost, before its protocol hears of it. With the bare
    transport as producer, a client's RST would first close the upstream cleanly (at once
    when its write side is already shut: the relay hears "upstream closed" before "client
    reset", and the device gets a FIN instead of an RST). The relay decides what the other
    side gets, in ``_connection_lost``.
    """

    def __init__(self, transport):
        self.transport = transport

    def pauseProducing(self):
        """IPushProducer.pauseProducing: the consumer's buffer is full."""
        self.transport.pauseProducing()

    def resumeProducing(self):
        """IPushProducer.resumeProducing: the consumer's buffer drained."""
        self.transport.resumeProducing()

    def stopProducing(self):
        """IPushProducer.stopProducing: ignored; the relay ends the other side itself."""


@implementer(IHalfCloseableProtocol)
class _Leg:
    """The events of one side of a relay; the side's protocol forwards its callbacks here.

    ``dataReceived`` is the relay's own bound method for this side, so a chunk reaches the
    other transport in one call from the protocol (protocols may bind it as their own).
    """

    def __init__(self, relay, side):
        self._relay = relay
        self._side = side
        self.dataReceived = relay._from_client if side == CLIENT else relay._from_upstream

    def readConnectionLost(self):
        """IHalfCloseableProtocol.readConnectionLost: this side sent FIN."""
        self._relay._read_lost(self._side)

    def writeConnectionLost(self):
        """IHalfCloseableProtocol.writeConnectionLost: our shutdown(SHUT_WR) on this side happened."""
        self._relay._write_lost(self._side)

    def connectionLost(self, reason):
        """IProtocol.connectionLost: this side is gone (ConnectionDone clean, anything else a reset)."""
        self._relay._connection_lost(self._side, reason)

    def __repr__(self):
        return "<_Leg %s of %r>" % (SIDE_NAMES[self._side], self._relay)


class Relay:
    """Two connected transports joined into one proxied connection.

    :param reactor: IReactorTime (``seconds()``), plus IReactorFDSet when ``splice`` is used.
    :param client_transport: the accepted socket's transport, paused by the server while it dialled.
    :param upstream_transport: the device proxy connection after its handshake.
    :param on_finished: ``on_finished(relay)``, called once when both sides' connectionLost arrived.
    :param splice: a :class:`proxy.splice.SplicePolicy`, or None for the plain relay only.
    """

    _log = Logger()

    def __init__(self, reactor, client_transport, upstream_transport, *, on_finished=None, splice=None):
        self._reactor = reactor
        self._transports = (client_transport, upstream_transport)
        self._on_finished = on_finished
        self._policy = splice
        # Per side: True while nothing may be written to it (before start, once aborted, closed,
        # its write side ended, or while the splice pump owns the sockets): one test per chunk.
        self._blocked = [True, True]
        self.client_leg = _Leg(self, CLIENT)
        self.upstream_leg = _Leg(self, UPSTREAM)
        self.bytes_up = 0
        self.bytes_down = 0
        self.last_activity = reactor.seconds()
        self.half_closed_since = None
        self.spliced = False
        self.pump = None
        self.aborted = None
        self.finished = False
        self._started = False
        self._replaying = False
        self._handing_back = False
        self._read_ended = [False, False]
        self._write_ended = [False, False]
        self._closed = [False, False]
        self._producer_registered = [False, False]
        self._splice_refused = splice is None or not splice.available

    def __repr__(self):
        return "<Relay up=%d down=%d%s%s>" % (
            self.bytes_up,
            self.bytes_down,
            " spliced" if self.spliced else "",
            " aborted=%s" % self.aborted if self.aborted else "",
        )

    # -- public API

    def start(self, to_upstream=b"", to_client=b"", attach=None):
        """Begin relaying, with everything that was pending, in one call: write the client's
        bytes buffered during setup (and ``to_client``), join the transports as each other's
        producers, let ``attach(upstream_leg)`` deliver what the device sent since its handshake
        (:meth:`proxy.upstream.Tunnel.attach`), then resume the client.
        """
        if self._started:
            raise RuntimeError("relay already started")
        self._started = True
        self.last_activity = self._reactor.seconds()
        if self.aborted is not None or any(self._closed):
            return  # whatever closed already propagated to the other side in _connection_lost
        client, upstream = self._transports
        self._blocked = [False, False]
        if to_upstream:
            upstream.write(to_upstream)
            self.bytes_up += len(to_upstream)
        if to_client:
            client.write(to_client)
            self.bytes_down += len(to_client)
        upstream.registerProducer(_Producer(client), True)
        client.registerProducer(_Producer(upstream), True)
        self._producer_registered = [True, True]
        if attach is not None:
            self._replaying = True  # no switch to splice between replayed events
            attach(self.upstream_leg)
            self._replaying = False
        if self.aborted is not None or self._closed[CLIENT]:
            return
        if not self._maybe_splice():
            client.resumeProducing()

    def abort(self, why):
        """Reset both sides (abortConnection sends RST); idempotent."""
        if self.aborted is not None:
            return
        self.aborted = why
        self._blocked = [True, True]
        self._log.debug("relay aborted: {why} ({relay!r})", why=why, relay=self)
        self._stop_pump()
        for side in (CLIENT, UPSTREAM):
            if not self._closed[side]:
                self._transports[side].abortConnection()

    def check_timeouts(self, now, idle_timeout, half_closed_timeout):
        """Abort and return "idle" or "half-closed" when that timeout has expired, else None.

        Idle: no byte either way for ``idle_timeout``. Half-closed: a side sent
        FIN and nothing moved for ``half_closed_timeout`` since (the later of
        the first EOF and the last byte), so a long reply after a client's
        FIN is not cut. A timeout of None or ≤ 0 is off.
        """
        if self.aborted is not None or self.finished:
            return None
        if half_closed_timeout and half_closed_timeout > 0 and self.half_closed_since is not None:
            if now - max(self.half_closed_since, self.last_activity) >= half_closed_timeout:
                self.abort("half-closed")
                return "half-closed"
        if idle_timeout and idle_timeout > 0 and now - self.last_activity >= idle_timeout:
            self.abort("idle")
            return "idle"
        return None

    # -- leg events

    def _from_client(self, data):
        if self._blocked[UPSTREAM]:
            return self._unwritable(data)
        if not self._splice_refused and self._maybe_splice(CLIENT, data):
            return None
        self._transports[UPSTREAM].write(data)
        self.bytes_up += len(data)
        self.last_activity = self._reactor.seconds()
        return None

    def _from_upstream(self, data):
        if self._blocked[CLIENT]:
            return self._unwritable(data)
        if not self._splice_refused and self._maybe_splice(UPSTREAM, data):
            return None
        self._transports[CLIENT].write(data)
        self.bytes_down += len(data)
        self.last_activity = self._reactor.seconds()
        return None

    def _unwritable(self, data):
        """Data for a side that takes no more: dropped (it was reset, closed or shut down),
        except before :meth:`start`, where nothing may arrive (the tunnel holds it until then)."""
        if not self._started:
            raise RuntimeError("relay got %d bytes before start()" % len(data))

    def _count(self, src, n):
        if src == CLIENT:
            self.bytes_up += n
        else:
            self.bytes_down += n
        self.last_activity = self._reactor.seconds()

    def _pumping(self):
        # The pump owns the sockets and sees EOFs itself (a socket's EOF repeats); a late
        # half-close event (e.g. a server replaying an EOF it saw before start) must not touch them.
        return self.pump is not None and not self.pump.finished

    def _read_lost(self, side):
        if self._read_ended[side] or self._pumping():
            return
        self._mark_eof(side)
        other = 1 - side
        if self.aborted is None and not self._closed[other]:
            self._unregister_producer(other)
            transport = self._transports[other]
            if hasattr(transport, "loseWriteConnection"):
                transport.loseWriteConnection()
            else:
                transport.loseConnection()
        self._maybe_lose(side)

    def _write_lost(self, side):
        if self._write_ended[side] or self._pumping():
            return
        self._write_ended[side] = True
        self._blocked[side] = True
        self._maybe_lose(side)

    def _mark_eof(self, side):
        self._read_ended[side] = True
        if self.half_closed_since is None:
            self.half_closed_since = self._reactor.seconds()

    def _maybe_lose(self, side):
        if self._read_ended[side] and self._write_ended[side] and not self._closed[side] and self.aborted is None:
            self._unregister_producer(side)
            self._transports[side].loseConnection()

    def _unregister_producer(self, side):
        if self._producer_registered[side]:
            self._producer_registered[side] = False
            self._transports[side].unregisterProducer()

    def _connection_lost(self, side, reason):
        if self._closed[side]:
            return
        self._closed[side] = True
        self._blocked[side] = True
        # Both halves of this side had already ended (its EOF read, ours delivered): nothing of it
        # was still in flight through the relay, so a reason other than ConnectionDone now (an RST
        # racing the close, or a hang-up the reactor could only guess about) loses nothing.
        reset = not reason.check(ConnectionDone)
        if reset and self._read_ended[side] and self._write_ended[side]:
            self._log.debug(
                "{side} ended both ways before {reason}; closing cleanly ({relay!r})",
                side=SIDE_NAMES[side],
                reason=reason.value,
                relay=self,
            )
            reset = False
        if not self._read_ended[side]:
            self._mark_eof(side)
        self._stop_pump()
        other = 1 - side
        if not self._closed[other]:
            if reset:
                self.abort("%s reset" % SIDE_NAMES[side])
            elif self.aborted is None and not self._handing_back:
                self._unregister_producer(other)
                self._transports[other].loseConnection()
        if all(self._closed):
            self._finish()

    def _finish(self):
        if self.finished:
            return
        self.finished = True
        if self._on_finished is not None:
            try:
                self._on_finished(self)
            except Exception:
                self._log.failure("on_finished raised for {relay!r}", relay=self)

    # -- splice

    def _spliceable(self, transport):
        return (
            transport.connected
            and not transport.disconnecting
            and getattr(transport, "socket", None) is not None
            and write_buffer_len(transport) == 0
        )

    def _maybe_splice(self, side=None, data=b""):
        """Hand the sockets to a SplicePump when the policy wants it and Twisted holds no bytes."""
        policy = self._policy
        if self._splice_refused or self.spliced or self._replaying or self.aborted is not None:
            return False
        if not policy.wants(self.bytes_up + self.bytes_down + len(data)):
            return False
        if any(self._read_ended) or any(self._write_ended) or any(self._closed):
            return False
        if len(data) > policy.pipe_size or not IReactorFDSet.providedBy(self._reactor):
            self._splice_refused = True
            return False
        client, upstream = self._transports
        if _TCPConnection is None or not all(
            isinstance(t, _TCPConnection) and not getattr(t, "TLS", False) for t in self._transports
        ):
            self._splice_refused = True  # StringTransport, TLS (wrapped or startTLS), …: never
            return False
        if not (self._spliceable(client) and self._spliceable(upstream)):
            return False  # bytes still buffered in Twisted: try again on a later chunk
        if not policy.acquire():
            self._splice_refused = True
            return False
        pump = SplicePump(
            self._reactor,
            (client.getHandle(), upstream.getHandle()),
            policy.pipe_size,
            on_bytes=self._count,
            on_eof=self._spliced_eof,
            on_done=self._pump_done,
        )
        try:
            pump.open()
        except OSError as e:
            policy.release(failed=True)
            self._splice_refused = True
            failed = policy.setup_failed
            if failed & (failed - 1) == 0:  # 1st, 2nd, 4th, 8th...: visible but never a flood
                self._log.warn(
                    "splice pipes unavailable ({count} times so far), staying on the plain relay: {error}",
                    count=failed,
                    error=e,
                )
            return False
        for s in (CLIENT, UPSTREAM):
            self._unregister_producer(s)
            self._transports[s].stopReading()
            self._transports[s].stopWriting()
        self.pump = pump
        self.spliced = True
        self._blocked = [True, True]
        pump.start({side: data} if data else None)
        return True

    def _spliced_eof(self, src):
        self._mark_eof(src)
        self._write_ended[1 - src] = True

    def _pump_done(self, error, side):
        self._policy.release()
        if error is None:
            # The pump shut both write sides down itself, behind Twisted's back. loseConnection()
            # would register each transport for writing only; epoll then reports the hang-up
            # of the fully closed socket without EPOLLIN and the reactor calls it ConnectionLost,
            # i.e. "client reset" for a download that ended normally. End the transports
            # directly, as loseConnection does once Twisted itself has shut the write side.
            self._handing_back = True
            for s in (CLIENT, UPSTREAM):
                if not self._closed[s]:
                    self._transports[s].connectionLost(Failure(ConnectionDone()))
        elif getattr(error, "errno", None) in _RESET_ERRNOS:
            # From a syscall on the socket, never from a reactor guess (SplicePump._lost asks the
            # socket). A peer's FIN reads as EOF and the pump never writes after its own shutdown,
            # so these mean the peer reset (or, ETIMEDOUT, died).
            self.abort("%s reset" % SIDE_NAMES[side])
        else:
            self.abort("splice error on %s: %s" % (SIDE_NAMES[side], error))

    def _stop_pump(self):
        if self.pump is not None and not self.pump.finished:
            self.pump.stop()
            self._policy.release()
