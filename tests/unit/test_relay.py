"""Relay and splice policy without sockets: StringTransport/FileDescriptor fakes and a Clock."""

import errno
import os
import select
import socket
import struct

import pytest
from twisted.internet import abstract
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from proxy.relay import Relay, write_buffer_len
from proxy.splice import (
    CLIENT,
    UPSTREAM,
    SplicePolicy,
    SplicePump,
    cap_eff_from_status,
    pages_for,
    pipe_privileged,
    splice_supported,
)

DONE = Failure(ConnectionDone())
RESET = Failure(ConnectionLost())
ABORTED = Failure(ConnectionAborted())
NO_CAPS = 0
CAP_SYS_RESOURCE = 1 << 24
CAP_SYS_ADMIN = 1 << 21
CAP_NET_ADMIN = 1 << 12


class FakeTransport(StringTransport):
    """A StringTransport that records half-close, close and abort calls."""

    def __init__(self):
        super().__init__()
        self.write_closes = 0
        self.closes = 0
        self.aborts = 0

    def loseWriteConnection(self):
        self.write_closes += 1

    def loseConnection(self):
        self.closes += 1
        self.disconnecting = True

    def abortConnection(self):
        self.aborts += 1
        self.disconnecting = True
        self.disconnected = True


class SlowSocketTransport(abstract.FileDescriptor):
    """A real FileDescriptor write path whose 'socket' accepts only ``room`` more bytes."""

    connected = 1

    def __init__(self, reactor):
        super().__init__(reactor)
        self.sent = bytearray()
        self.room = 0
        self.write_closed = 0

    def writeSomeData(self, data):
        n = min(len(data), self.room)
        self.sent += bytes(data[:n])
        self.room -= n
        return n

    def _closeWriteConnection(self):
        self.write_closed += 1


class Pair:
    """A relay between two fake transports, the client paused as the server leaves it."""

    def __init__(self, client=None, upstream=None, splice=None, start=True, **start_kw):
        self.clock = Clock()
        self.clock.advance(1000)
        self.client = client if client is not None else FakeTransport()
        self.upstream = upstream if upstream is not None else FakeTransport()
        self.client.pauseProducing()
        self.finished = []
        self.relay = Relay(self.clock, self.client, self.upstream, on_finished=self.finished.append, splice=splice)
        if start:
            self.relay.start(**start_kw)

    def lost(self, side, reason=DONE):
        leg = self.relay.client_leg if side == CLIENT else self.relay.upstream_leg
        leg.connectionLost(reason)


# -- start and data


def test_start_writes_buffered_bytes_registers_producers_and_resumes_client():
    """start() writes both buffers, makes each transport the other's streaming producer, resumes the client."""
    p = Pair(to_upstream=b"GET / HTTP/1.1\r\n", to_client=b"early")
    assert p.upstream.value() == b"GET / HTTP/1.1\r\n"
    assert p.client.value() == b"early"
    assert p.client.producer.transport is p.upstream
    assert p.upstream.producer.transport is p.client
    assert p.client.streaming is True and p.upstream.streaming is True
    assert p.client.producerState == "producing"
    assert (p.relay.bytes_up, p.relay.bytes_down) == (16, 5)
    assert p.relay.last_activity == 1000
    assert p.relay.spliced is False


def test_start_twice_is_an_error():
    """A relay starts once."""
    p = Pair()
    with pytest.raises(RuntimeError):
        p.relay.start()


def test_data_both_ways_is_relayed_and_counted():
    """Bytes from each leg reach the other transport unchanged and are counted per direction."""
    p = Pair()
    p.clock.advance(5)
    p.relay.client_leg.dataReceived(b"hello ")
    p.relay.client_leg.dataReceived(b"world")
    p.clock.advance(3)
    p.relay.upstream_leg.dataReceived(b"HTTP/1.1 200 OK\r\n")
    assert p.upstream.value() == b"hello world"
    assert p.client.value() == b"HTTP/1.1 200 OK\r\n"
    assert (p.relay.bytes_up, p.relay.bytes_down) == (11, 17)
    assert p.relay.last_activity == 1008


def test_start_delivers_what_the_tunnel_held_after_the_buffered_bytes():
    """start(attach=...) hands the upstream leg to the tunnel, which delivers what the device sent
    since its reply (data, then its FIN) after the start buffers, in order, in the same call."""
    p = Pair(start=False)

    def attach(leg):
        leg.dataReceived(b"-later")
        leg.readConnectionLost()

    p.relay.start(to_client=b"first", attach=attach)
    assert p.client.value() == b"first-later" and p.client.write_closes == 1
    assert p.relay.bytes_down == 11 and not p.relay.spliced


def test_data_before_start_is_a_bug_not_a_silent_drop():
    """Nothing may reach a relay before start(): the tunnel holds it. A caller that breaks this learns at once."""
    p = Pair(start=False)
    with pytest.raises(RuntimeError):
        p.relay.upstream_leg.dataReceived(b"early")


# -- half-close


def test_client_half_close_keeps_the_reply_flowing_then_closes_fully():
    """Client FIN → upstream write-closed; the upstream's reply still reaches the client; then both close."""
    p = Pair()
    p.clock.advance(2)
    p.relay.client_leg.dataReceived(b"request")
    p.relay.client_leg.readConnectionLost()
    assert p.upstream.write_closes == 1
    assert p.upstream.producer is None  # unregistered: a paused producer would block the write-close
    assert p.client.producer.transport is p.upstream  # the reply direction keeps its backpressure
    assert p.relay.half_closed_since == 1002
    assert (p.client.closes, p.upstream.closes) == (0, 0)
    p.relay.upstream_leg.writeConnectionLost()
    assert p.upstream.closes == 0  # the upstream can still send
    p.relay.upstream_leg.dataReceived(b"reply")
    assert p.client.value() == b"reply"
    p.relay.upstream_leg.readConnectionLost()
    assert p.client.write_closes == 1
    assert p.upstream.closes == 1  # read- and write-ended
    p.relay.client_leg.writeConnectionLost()
    assert p.client.closes == 1
    p.lost(UPSTREAM)
    assert p.finished == []
    p.lost(CLIENT)
    assert p.finished == [p.relay]
    assert (p.client.aborts, p.upstream.aborts) == (0, 0)
    assert (p.relay.bytes_up, p.relay.bytes_down) == (7, 5)
    assert p.relay.half_closed_since == 1002


def test_upstream_half_close_keeps_the_client_upload_flowing_then_closes_fully():
    """Upstream FIN → client write-closed; the client's bytes still reach the upstream; then both close."""
    p = Pair()
    p.relay.upstream_leg.dataReceived(b"banner")
    p.relay.upstream_leg.readConnectionLost()
    assert p.client.write_closes == 1
    assert p.client.producer is None
    assert p.upstream.producer.transport is p.client
    p.relay.client_leg.writeConnectionLost()
    assert p.client.closes == 0
    p.relay.client_leg.dataReceived(b"upload")
    assert p.upstream.value() == b"upload"
    p.relay.client_leg.readConnectionLost()
    assert p.upstream.write_closes == 1
    assert p.client.closes == 1
    p.relay.upstream_leg.writeConnectionLost()
    assert p.upstream.closes == 1
    p.lost(CLIENT)
    p.lost(UPSTREAM)
    assert p.finished == [p.relay]
    assert (p.relay.bytes_up, p.relay.bytes_down) == (6, 6)


def test_clean_close_without_half_close_closes_the_other_side_cleanly():
    """A side that closes cleanly without a separate FIN event gets the other side closed, not reset."""
    p = Pair()
    p.lost(UPSTREAM, DONE)
    assert p.client.closes == 1
    assert p.client.aborts == 0
    assert p.relay.aborted is None


# -- resets and abort


@pytest.mark.parametrize("side", [CLIENT, UPSTREAM])
def test_reset_on_one_side_resets_the_other(side):
    """connectionLost with ConnectionLost (a reset) on one side aborts (RSTs) the other side."""
    p = Pair()
    p.lost(side, RESET)
    other = p.upstream if side == CLIENT else p.client
    this = p.client if side == CLIENT else p.upstream
    assert other.aborts == 1
    assert this.aborts == 0
    assert p.relay.aborted == ("client reset" if side == CLIENT else "upstream reset")
    assert p.finished == []
    p.lost(1 - side, ABORTED)
    assert p.finished == [p.relay]


def test_reset_after_half_close_still_resets_the_other_side():
    """A reset during the half-closed phase is propagated as a reset too."""
    p = Pair()
    p.relay.client_leg.readConnectionLost()
    p.lost(UPSTREAM, RESET)
    assert p.client.aborts == 1


def test_reset_after_both_halves_ended_is_a_clean_close():
    """A side whose EOF was read and ours delivered has nothing in flight: a late RST/guess is not a reset."""
    p = Pair()
    p.relay.client_leg.readConnectionLost()
    p.relay.upstream_leg.readConnectionLost()
    p.relay.client_leg.writeConnectionLost()
    p.lost(CLIENT, RESET)
    assert p.relay.aborted is None
    assert (p.client.aborts, p.upstream.aborts) == (0, 0)
    assert p.upstream.closes == 1
    p.lost(UPSTREAM, DONE)
    assert p.finished == [p.relay]


def test_reset_after_only_our_eof_was_delivered_is_still_a_reset():
    """A side that got our FIN but never sent its own may still have had bytes for us: its RST is a reset."""
    p = Pair()
    p.relay.upstream_leg.readConnectionLost()
    p.relay.client_leg.writeConnectionLost()
    p.lost(CLIENT, RESET)
    assert p.relay.aborted == "client reset"
    assert p.upstream.aborts == 1


@pytest.mark.parametrize("side", [CLIENT, UPSTREAM])
def test_a_lost_transport_stopping_its_producer_does_not_close_the_other_side(side):
    """Twisted stops a lost transport's producer before its protocol hears why; only the relay ends the other side."""
    p = Pair()
    this, other = (p.client, p.upstream) if side == CLIENT else (p.upstream, p.client)
    this_leg = p.relay.client_leg if side == CLIENT else p.relay.upstream_leg
    this_leg.readConnectionLost()  # the other side's write side gets shut: a loseConnection would be immediate
    this.producer.stopProducing()  # what FileDescriptor.connectionLost does first
    assert (other.closes, other.aborts) == (0, 0)
    assert other.producerState == "producing"
    p.lost(side, RESET)
    assert p.relay.aborted == "%s reset" % ("client" if side == CLIENT else "upstream")
    assert (other.closes, other.aborts) == (0, 1)


def test_abort_is_idempotent_and_drops_later_data():
    """abort() RSTs each side once, keeps the first reason, and relays nothing afterwards."""
    p = Pair()
    p.relay.abort("mapping removed")
    p.relay.abort("idle")
    assert (p.client.aborts, p.upstream.aborts) == (1, 1)
    assert p.relay.aborted == "mapping removed"
    p.relay.client_leg.dataReceived(b"late")
    assert p.upstream.value() == b""
    assert p.relay.bytes_up == 0


def test_abort_before_start_makes_start_a_no_op():
    """A relay aborted while the upstream was still being set up writes and registers nothing."""
    p = Pair(start=False)
    p.relay.abort("shutting down")
    p.relay.start(to_upstream=b"x", to_client=b"y")
    assert (p.upstream.value(), p.client.value()) == (b"", b"")
    assert p.client.producer is None and p.upstream.producer is None
    assert p.client.producerState == "paused"


def test_on_finished_exactly_once():
    """Repeated connectionLost notifications call on_finished only once, after both sides."""
    p = Pair()
    p.lost(CLIENT)
    p.lost(CLIENT)
    assert p.finished == []
    p.lost(UPSTREAM)
    p.lost(UPSTREAM, RESET)
    assert p.finished == [p.relay]
    assert p.relay.finished is True


# -- timeouts


def test_idle_timeout_fires_after_no_traffic():
    """check_timeouts returns None until idle_timeout has passed without bytes, then aborts with "idle"."""
    p = Pair()
    assert p.relay.check_timeouts(1299, 300, 60) is None
    assert p.relay.check_timeouts(1300, 300, 60) == "idle"
    assert p.relay.aborted == "idle"
    assert (p.client.aborts, p.upstream.aborts) == (1, 1)
    assert p.relay.check_timeouts(5000, 300, 60) is None


def test_activity_resets_idle():
    """A chunk either way moves last_activity, so the idle deadline moves with it."""
    p = Pair()
    p.clock.advance(200)
    p.relay.upstream_leg.dataReceived(b"x")
    assert p.relay.last_activity == 1200
    assert p.relay.check_timeouts(1300, 300, 60) is None
    assert p.relay.check_timeouts(1499, 300, 60) is None
    assert p.relay.check_timeouts(1500, 300, 60) == "idle"


def test_half_closed_timeout_counts_from_first_eof_without_traffic():
    """After a FIN, half_closed_timeout of silence aborts with "half-closed" long before the idle timeout."""
    p = Pair()
    p.clock.advance(10)
    p.relay.client_leg.readConnectionLost()
    assert p.relay.half_closed_since == 1010
    assert p.relay.check_timeouts(1069, 300, 60) is None
    assert p.relay.check_timeouts(1070, 300, 60) == "half-closed"
    assert p.relay.aborted == "half-closed"
    assert (p.client.aborts, p.upstream.aborts) == (1, 1)


def test_half_closed_timeout_is_pushed_by_the_reply_still_flowing():
    """A long reply after the client's FIN is not cut: the half-closed deadline follows the last byte."""
    p = Pair()
    p.relay.client_leg.readConnectionLost()
    p.clock.advance(50)
    p.relay.upstream_leg.dataReceived(b"more of the download")
    assert p.relay.check_timeouts(1070, 300, 60) is None
    assert p.relay.check_timeouts(1109, 300, 60) is None
    assert p.relay.check_timeouts(1110, 300, 60) == "half-closed"


def test_timeouts_off_when_none_or_zero():
    """A timeout of None or 0 never fires."""
    p = Pair()
    p.relay.client_leg.readConnectionLost()
    assert p.relay.check_timeouts(10**9, None, 0) is None
    assert p.relay.aborted is None


def test_no_timeouts_after_finish():
    """A finished relay reports nothing and aborts nothing."""
    p = Pair()
    p.lost(CLIENT)
    p.lost(UPSTREAM)
    assert p.relay.check_timeouts(10**9, 1, 1) is None
    assert p.relay.aborted is None


# -- bounded memory (real FileDescriptor buffering semantics)


def test_full_upstream_buffer_pauses_the_client():
    """When the upstream transport buffers more than bufferSize, the client is paused; draining resumes it."""
    upstream = SlowSocketTransport(MemoryReactorClock())
    p = Pair(upstream=upstream)
    chunk = b"u" * 65536
    p.relay.client_leg.dataReceived(chunk)
    assert p.client.producerState == "producing"
    p.relay.client_leg.dataReceived(chunk)
    assert p.client.producerState == "paused"
    assert write_buffer_len(upstream) == 131072
    upstream.room = 10**9
    upstream.doWrite()  # SEND_LIMIT per call
    upstream.doWrite()
    assert write_buffer_len(upstream) == 0
    assert p.client.producerState == "producing"
    assert bytes(upstream.sent) == chunk * 2


def test_full_client_buffer_pauses_the_upstream():
    """The reverse direction has the same backpressure: a full client buffer pauses the upstream."""
    client = SlowSocketTransport(MemoryReactorClock())
    p = Pair(client=client)
    p.relay.upstream_leg.dataReceived(b"d" * 65537)
    assert p.upstream.producerState == "paused"
    client.room = 10**9
    client.doWrite()
    assert p.upstream.producerState == "producing"


def test_half_close_completes_even_with_a_paused_producer():
    """Client FIN while the upstream buffer is full: the buffer drains, then the write side closes."""
    upstream = SlowSocketTransport(MemoryReactorClock())
    p = Pair(upstream=upstream)
    p.relay.client_leg.dataReceived(b"x" * 70000)
    assert p.client.producerState == "paused"
    p.relay.client_leg.readConnectionLost()
    assert upstream.write_closed == 0
    upstream.room = 10**9
    upstream.doWrite()
    assert len(upstream.sent) == 70000
    assert upstream.write_closed == 1


def test_half_close_events_while_spliced_leave_the_transports_alone():
    """While a splice pump owns the sockets, leg half-close events must not reach the Twisted transports."""
    p = Pair()

    class BusyPump:
        finished = False

    p.relay.pump = BusyPump()
    p.relay.client_leg.readConnectionLost()
    p.relay.upstream_leg.writeConnectionLost()
    assert (p.upstream.write_closes, p.upstream.closes, p.client.closes) == (0, 0, 0)
    assert p.relay.half_closed_since is None


# -- splice policy


def test_cap_eff_parsing_and_privilege():
    """CapEff is read from /proc/self/status text; only CAP_SYS_RESOURCE or CAP_SYS_ADMIN exempt from the limit."""
    status = "Name:\tpython3\nCapInh:\t0000000000000000\nCapEff:\t0000000001000000\nCapBnd:\t000001ffffffffff\n"
    assert cap_eff_from_status(status) == CAP_SYS_RESOURCE
    assert cap_eff_from_status("Name: x\n") == 0
    assert cap_eff_from_status("CapEff:\tzz\n") == 0
    assert pipe_privileged(CAP_SYS_RESOURCE) is True
    assert pipe_privileged(CAP_SYS_ADMIN) is True
    assert pipe_privileged(CAP_NET_ADMIN) is False
    assert pipe_privileged(0) is False


def test_pages_are_rounded_up_to_a_power_of_two():
    """The kernel charges pipes in power-of-two page counts."""
    assert pages_for(1) == 1
    assert pages_for(4096) == 1
    assert pages_for(65536) == 16
    assert pages_for(100000) == 32
    assert pages_for(1 << 20) == 256


def test_unprivileged_budget_is_half_the_soft_limit():
    """Without the capabilities: 64 KiB pipes, 8192 of 16384 pages → 256 connections, the 257th refused."""
    policy = SplicePolicy(available=True, soft_pages=16384, cap_eff=NO_CAPS, pipe_max_size=1 << 20)
    assert (policy.pipe_size, policy.pages_per_pipe, policy.budget_pages) == (65536, 16, 8192)
    assert all(policy.acquire() for _ in range(256))
    assert policy.acquire() is False
    assert (policy.spliced_now, policy.spliced_total, policy.refused_budget) == (256, 256, 1)
    assert policy.pages_in_use == 8192
    policy.release()
    assert policy.acquire() is True
    assert (policy.spliced_now, policy.spliced_total, policy.refused_budget) == (256, 257, 1)


def test_unprivileged_big_pipes_fit_fewer_connections():
    """Asking for 1 MiB pipes without the capabilities: 512 pages a connection → 16 connections."""
    policy = SplicePolicy(pipe_size=1 << 20, available=True, soft_pages=16384, cap_eff=NO_CAPS, pipe_max_size=1 << 20)
    assert sum(policy.acquire() for _ in range(20)) == 16
    assert policy.refused_budget == 4


def test_unprivileged_pipe_size_is_capped_by_pipe_max_size_and_floored_at_64k():
    """An unprivileged pipe never exceeds fs.pipe-max-size (F_SETPIPE_SZ would fail) nor goes below 64 KiB."""
    big = SplicePolicy(pipe_size=4 << 20, available=True, soft_pages=16384, cap_eff=NO_CAPS, pipe_max_size=1 << 20)
    assert big.pipe_size == 1 << 20
    small = SplicePolicy(pipe_size=8192, available=True, soft_pages=16384, cap_eff=NO_CAPS, pipe_max_size=1 << 20)
    assert small.pipe_size == 65536


def test_privileged_gets_1mib_pipes_within_a_memory_budget():
    """With CAP_SYS_RESOURCE (or CAP_SYS_ADMIN): 1 MiB pipes, bounded by privileged_budget (256 MiB)."""
    for caps in (CAP_SYS_RESOURCE, CAP_SYS_ADMIN):
        policy = SplicePolicy(available=True, soft_pages=16384, cap_eff=caps, pipe_max_size=1 << 20)
        assert (policy.pipe_size, policy.budget_pages) == (1 << 20, 65536)
        assert all(policy.acquire() for _ in range(128))  # 128 connections x 2 pipes x 1 MiB
        assert not policy.acquire() and policy.refused_budget == 1
    unbounded = SplicePolicy(available=True, cap_eff=CAP_SYS_ADMIN, privileged_budget=0)
    assert unbounded.budget_pages is None and all(unbounded.acquire() for _ in range(1000))


def test_soft_limit_zero_means_no_budget():
    """fs.pipe-user-pages-soft = 0 disables the kernel limit, so there is no budget either."""
    policy = SplicePolicy(available=True, soft_pages=0, cap_eff=NO_CAPS, pipe_max_size=1 << 20)
    assert policy.budget_pages is None
    assert all(policy.acquire() for _ in range(1000))


def test_max_pipes_caps_spliced_connections():
    """max_pipes=5 allows two spliced connections (two pipes each)."""
    policy = SplicePolicy(max_pipes=5, available=True, soft_pages=0, cap_eff=CAP_SYS_ADMIN)
    assert [policy.acquire() for _ in range(3)] == [True, True, False]
    assert policy.refused_budget == 1


def test_release_after_failed_setup_undoes_the_total():
    """Pipes that could not be made leave spliced_total unchanged and count setup_failed."""
    policy = SplicePolicy(available=True, soft_pages=16384, cap_eff=NO_CAPS, pipe_max_size=1 << 20)
    assert policy.acquire()
    policy.release(failed=True)
    assert policy.stats() == {
        "spliced_now": 0,
        "spliced_total": 0,
        "refused_budget": 0,
        "setup_failed": 1,
        "pages_in_use": 0,
        "budget_pages": 8192,
        "pipe_size": 65536,
    }


def test_min_bytes_decides_when_to_switch():
    """Only connections that relayed min_bytes want splice, and never where splice is unavailable."""
    policy = SplicePolicy(available=True, soft_pages=16384, cap_eff=NO_CAPS, pipe_max_size=1 << 20)
    assert policy.min_bytes == 65536
    assert policy.wants(65535) is False
    assert policy.wants(65536) is True
    off = SplicePolicy(available=False, soft_pages=16384, cap_eff=NO_CAPS, pipe_max_size=1 << 20)
    assert off.wants(10**9) is False


def test_relay_on_string_transports_stays_plain_and_holds_no_pipes():
    """Non-socket transports never switch to splice and never take from the budget."""
    policy = SplicePolicy(min_bytes=0, available=True, soft_pages=16384, cap_eff=NO_CAPS, pipe_max_size=1 << 20)
    p = Pair(splice=policy)
    p.relay.client_leg.dataReceived(b"a" * 100000)
    p.relay.upstream_leg.dataReceived(b"b" * 100000)
    assert p.relay.spliced is False
    assert (policy.spliced_now, policy.spliced_total, policy.refused_budget) == (0, 0, 0)
    assert len(p.upstream.value()) == 100000


# -- splice pump, driven by hand over socketpairs (no reactor loop)

needs_splice = pytest.mark.skipif(not splice_supported(), reason="os.splice/F_SETPIPE_SZ unavailable")


class PumpRig:
    """A SplicePump between two socketpairs on a MemoryReactor, with recorded callbacks."""

    def __init__(self, pipe_size=65536):
        self.reactor = MemoryReactorClock()
        self.c_app, self.c_relay = socket.socketpair()
        self.u_relay, self.u_app = socket.socketpair()
        for s in (self.c_relay, self.u_relay):
            s.setblocking(False)
        for s in (self.c_app, self.u_app):
            s.settimeout(5)  # a test waiting for bytes that never come fails instead of hanging
        self.bytes = {CLIENT: 0, UPSTREAM: 0}
        self.eofs = []
        self.done = []
        self.fails = []
        self.fds_before = len(os.listdir("/proc/self/fd"))
        self.pump = SplicePump(
            self.reactor,
            (self.c_relay, self.u_relay),
            pipe_size,
            on_bytes=self._on_bytes,
            on_eof=self.eofs.append,
            on_done=self._on_done,
        )
        self.pump.open()
        self.ends = self.pump._ends

    def _on_done(self, error, side):
        self.done.append(error)
        self.fails.append(side)

    def _on_bytes(self, side, n):
        self.bytes[side] += n

    def close(self):
        for s in (self.c_app, self.c_relay, self.u_relay, self.u_app):
            s.close()


@pytest.fixture
def rig():
    r = PumpRig()
    yield r
    r.pump.stop()
    r.close()


@needs_splice
def test_pump_moves_pending_bytes_and_data_both_ways(rig):
    """Pending bytes go first; then each readable end's data arrives on the other socket and is counted."""
    rig.pump.start({CLIENT: b"peeked "})
    assert rig.u_app.recv(100) == b"peeked "
    assert rig.reactor.readers == set(rig.ends)
    rig.c_app.sendall(b"request")
    rig.ends[CLIENT].doRead()
    assert rig.u_app.recv(100) == b"request"
    rig.u_app.sendall(b"reply")
    rig.ends[UPSTREAM].doRead()
    assert rig.c_app.recv(100) == b"reply"
    assert rig.bytes == {CLIENT: 14, UPSTREAM: 5}
    assert rig.pump.stalls == 0


@needs_splice
def test_pump_swaps_to_writer_when_the_destination_is_full(rig):
    """A full destination stops reading the source and waits for writability; draining swaps back."""
    rig.pump.start()
    rig.u_app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    rig.c_app.setblocking(False)
    sent = 0
    payload = b"z" * 65536
    for _ in range(10000):
        try:
            sent += rig.c_app.send(payload)
        except BlockingIOError:
            pass
        rig.ends[CLIENT].doRead()
        if rig.pump.stalls:
            break
    assert rig.pump.stalls == 1
    assert rig.pump.in_pipe(CLIENT) > 0
    assert rig.ends[CLIENT] not in rig.reactor.readers
    assert rig.ends[UPSTREAM] in rig.reactor.writers
    received = 0
    rig.u_app.setblocking(False)
    for _ in range(100000):
        if received == sent:
            break
        try:
            received += len(rig.u_app.recv(1 << 20))
        except BlockingIOError:
            pass
        if rig.ends[UPSTREAM] in rig.reactor.writers:
            rig.ends[UPSTREAM].doWrite()
        if rig.ends[CLIENT] in rig.reactor.readers:
            rig.ends[CLIENT].doRead()
    assert received == sent == rig.bytes[CLIENT]
    assert rig.pump.in_pipe(CLIENT) == 0
    assert rig.ends[CLIENT] in rig.reactor.readers
    assert rig.ends[UPSTREAM] not in rig.reactor.writers


@needs_splice
def test_pump_half_closes_each_way_then_finishes_and_closes_pipes(rig):
    """EOF from one side shuts the other's write side; the reply still flows; both EOFs end the pump cleanly."""
    rig.pump.start()
    rig.c_app.sendall(b"last words")
    rig.c_app.shutdown(socket.SHUT_WR)
    rig.ends[CLIENT].doRead()
    assert rig.u_app.recv(100) == b"last words"
    assert rig.eofs == []
    rig.ends[CLIENT].doRead()
    assert rig.eofs == [CLIENT]
    assert rig.ends[CLIENT] not in rig.reactor.readers
    assert rig.u_app.recv(100) == b""  # the upstream saw our FIN
    assert rig.done == []
    rig.u_app.sendall(b"reply after FIN")
    rig.ends[UPSTREAM].doRead()
    assert rig.c_app.recv(100) == b"reply after FIN"
    rig.u_app.shutdown(socket.SHUT_WR)
    rig.ends[UPSTREAM].doRead()
    assert rig.eofs == [CLIENT, UPSTREAM]
    assert rig.done == [None]
    assert rig.c_app.recv(100) == b""
    assert rig.reactor.readers == set() and rig.reactor.writers == set()
    assert len(os.listdir("/proc/self/fd")) == rig.fds_before  # the four pipe fds are closed


def tcp_pair():
    """A connected loopback TCP pair (app end, relay end); the relay end non-blocking, as Twisted's are."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        app = socket.create_connection(listener.getsockname(), timeout=5)
        relay_end, _ = listener.accept()
    relay_end.setblocking(False)
    return app, relay_end


def wait_readable(sock):
    """Block (bounded) until the kernel has something to report on ``sock``: data, EOF or an error."""
    readable, _, _ = select.select([sock], [], [], 5)
    assert readable, "the kernel reported nothing within 5 s"


@needs_splice
@pytest.mark.parametrize("guess", [RESET, DONE], ids=["ConnectionLost", "ConnectionDone"])
def test_pump_reactor_hangup_guess_on_a_healthy_socket_keeps_pumping(rig, guess):
    """A reactor HUP report without a socket error does not fail the pump; the socket is read again."""
    rig.pump.start()
    rig.ends[UPSTREAM].connectionLost(guess)
    assert rig.done == []
    assert rig.ends[UPSTREAM] in rig.reactor.readers
    rig.u_app.sendall(b"still here")
    rig.ends[UPSTREAM].doRead()
    assert rig.c_app.recv(100) == b"still here"


@needs_splice
@pytest.mark.parametrize("guess", [RESET, DONE], ids=["ConnectionLost", "ConnectionDone"])
def test_pump_reactor_hangup_guess_after_fins_ends_cleanly(rig, guess):
    """Peers that sent FIN, reported by the reactor as lost/done: their EOFs are passed on, the pump ends clean."""
    rig.pump.start()
    rig.u_app.sendall(b"tail")
    rig.u_app.shutdown(socket.SHUT_WR)
    rig.ends[UPSTREAM].connectionLost(guess)
    assert rig.c_app.recv(100) == b"tail"
    assert rig.ends[UPSTREAM] in rig.reactor.readers  # read again: the EOF comes next
    rig.ends[UPSTREAM].doRead()
    assert rig.eofs == [UPSTREAM]
    assert rig.c_app.recv(100) == b""  # the FIN was passed on
    assert rig.done == []
    rig.c_app.shutdown(socket.SHUT_WR)
    rig.ends[CLIENT].connectionLost(guess)
    assert rig.eofs == [UPSTREAM, CLIENT]
    assert rig.done == [None] and rig.fails == [None]
    assert rig.reactor.readers == set() and rig.reactor.writers == set()
    assert len(os.listdir("/proc/self/fd")) == rig.fds_before


@needs_splice
def test_pump_reactor_report_of_a_real_reset_fails_with_econnreset():
    """An RST the reactor reports (a pending socket error) fails the pump with ECONNRESET on that side."""
    c_app, c_relay = tcp_pair()
    u_app, u_relay = tcp_pair()
    reactor = MemoryReactorClock()
    done = []
    pump = SplicePump(
        reactor,
        (c_relay, u_relay),
        65536,
        on_bytes=lambda *a: None,
        on_eof=lambda side: None,
        on_done=lambda error, side: done.append((error, side)),
    )
    fds = len(os.listdir("/proc/self/fd"))
    try:
        pump.open()
        pump.start()
        c_app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c_app.close()  # RST
        wait_readable(c_relay)
        pump._ends[CLIENT].connectionLost(RESET)
        assert len(done) == 1
        error, side = done[0]
        assert (type(error), error.errno, side) == (ConnectionResetError, errno.ECONNRESET, CLIENT)
        assert pump.finished is True
        assert reactor.readers == set() and reactor.writers == set()
        assert len(os.listdir("/proc/self/fd")) == fds - 1  # the pipes are gone (and c_app is closed)
    finally:
        pump.stop()
        for s in (c_app, c_relay, u_app, u_relay):
            s.close()


@needs_splice
def test_pump_socket_closed_under_it_is_an_error_not_a_reset(rig):
    """A socket closed behind the pump's back (a bug, fd gone) fails it with EBADF, which the relay calls an error."""
    rig.pump.start()
    rig.u_relay.close()
    rig.ends[UPSTREAM].connectionLost(RESET)
    assert len(rig.done) == 1 and rig.done[0].errno == errno.EBADF
    assert rig.fails == [UPSTREAM]
    assert rig.reactor.readers == set() and rig.reactor.writers == set()
    assert rig.pump.finished is True


# -- how the relay names a pump failure

SPLICE_POLICY_KW = dict(min_bytes=0, available=True, soft_pages=0, cap_eff=0)


@pytest.mark.parametrize(
    "error,side,label",
    [
        (ConnectionResetError(errno.ECONNRESET, "reset"), CLIENT, "client reset"),
        (BrokenPipeError(errno.EPIPE, "broken pipe"), CLIENT, "client reset"),
        (OSError(errno.ENOTCONN, "not connected"), UPSTREAM, "upstream reset"),
        (OSError(errno.EBADF, "gone"), CLIENT, "splice error on client: [Errno 9] gone"),
        (ConnectionLost(), UPSTREAM, "splice error on upstream: %s" % ConnectionLost()),
    ],
    ids=["ECONNRESET", "EPIPE", "ENOTCONN", "EBADF", "ConnectionLost"],
)
def test_pump_failure_label(error, side, label):
    """Only a syscall errno that means the peer reset is called a reset; anything else is a splice error."""
    policy = SplicePolicy(**SPLICE_POLICY_KW)
    policy.acquire()
    p = Pair(splice=policy)
    p.relay._pump_done(error, side)
    assert p.relay.aborted == label
    assert (p.client.aborts, p.upstream.aborts) == (1, 1)
    assert policy.spliced_now == 0


def test_clean_pump_end_hands_back_with_connection_done_not_lose_connection():
    """After the pump shut both write sides, the transports end as ConnectionDone directly, never via the reactor."""
    policy = SplicePolicy(**SPLICE_POLICY_KW)
    policy.acquire()
    p = Pair(splice=policy)
    lost = {CLIENT: [], UPSTREAM: []}
    for side, transport in ((CLIENT, p.client), (UPSTREAM, p.upstream)):
        leg = p.relay.client_leg if side == CLIENT else p.relay.upstream_leg

        def connection_lost(reason, leg=leg, side=side):
            lost[side].append(reason)
            leg.connectionLost(reason)

        transport.connectionLost = connection_lost
    p.relay._spliced_eof(CLIENT)
    p.relay._spliced_eof(UPSTREAM)
    p.relay._pump_done(None, None)
    assert [f.type for f in lost[CLIENT] + lost[UPSTREAM]] == [ConnectionDone, ConnectionDone]
    assert (p.client.closes, p.upstream.closes, p.client.aborts, p.upstream.aborts) == (0, 0, 0, 0)
    assert p.relay.aborted is None
    assert p.finished == [p.relay]
