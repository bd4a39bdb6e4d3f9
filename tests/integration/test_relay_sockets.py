"""Relay over real loopback sockets and the real reactor: bytes, half-close, resets, endings, splice, backpressure.

The client and the backend are plain blocking sockets in threads (so the
reactor only runs the relay under test); a tiny front server accepts the
client, pauses it, dials the backend and joins both with a Relay, as the
proxy server does. No root needed; every wait is bounded.
"""

import errno
import hashlib
import os
import random
import select
import socket
import struct
import threading
import time

import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, protocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from proxy.relay import Relay, write_buffer_len
from proxy.splice import SplicePolicy, splice_supported

MIB = 1 << 20
TIMEOUT = 20  # seconds, for any one test's whole exchange
MODES = ["plain", pytest.param("splice", marks=pytest.mark.skipif(not splice_supported(), reason="no os.splice"))]


def _reactor():
    from twisted.internet import reactor

    return reactor


def in_thread(fn, *args):
    """Run blocking ``fn(*args)`` in a daemon thread; a Deferred fires with its result in the reactor."""
    reactor = _reactor()
    d = defer.Deferred()

    def deliver(method, value):
        if not d.called:
            method(value)

    def run():
        try:
            result = fn(*args)
        except BaseException:
            reactor.callFromThread(deliver, d.errback, Failure())
        else:
            reactor.callFromThread(deliver, d.callback, result)

    threading.Thread(target=run, daemon=True).start()
    return d


def payload(n, seed):
    """n deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(n)


def recv_all(sock, pace=None):
    """Read until EOF; returns (sha256 hex, byte count). ``pace`` = (every, seconds) sleeps to read slowly."""
    h = hashlib.sha256()
    n = since = 0
    while True:
        data = sock.recv(MIB if pace is None else 65536)
        if not data:
            return h.hexdigest(), n
        h.update(data)
        n += len(data)
        if pace is not None:
            since += len(data)
            if since >= pace[0]:
                since = 0
                time.sleep(pace[1])


def duplex(sock, data):
    """Send ``data`` then SHUT_WR while reading until EOF; returns what recv_all returns."""
    sender = threading.Thread(target=lambda: (sock.sendall(data), sock.shutdown(socket.SHUT_WR)), daemon=True)
    sender.start()
    try:
        return recv_all(sock)
    finally:
        sender.join(TIMEOUT)


def reset(sock):
    """Close with SO_LINGER {1, 0}: the kernel sends RST."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def fd_count():
    """Open fds of this process."""
    return len(os.listdir("/proc/self/fd"))


@implementer(IHalfCloseableProtocol)
class _Side(protocol.Protocol):
    """One socket of the front; forwards every event to its relay leg (as the proxy's protocols do)."""

    leg = None

    def dataReceived(self, data):
        self.leg.dataReceived(data)

    def readConnectionLost(self):
        self.leg.readConnectionLost()

    def writeConnectionLost(self):
        self.leg.writeConnectionLost()

    def connectionLost(self, reason):
        if self.leg is not None:
            self.leg.connectionLost(reason)


class _ClientSide(_Side):
    def connectionMade(self):
        self.transport.pauseProducing()
        self.factory.harness._accepted(self)


class Harness:
    """Front listener → Relay → backend; a blocking backend socket server with one behaviour per test."""

    def __init__(self, policy=None, on_relay=None):
        self.reactor = _reactor()
        self.policy = policy
        self.on_relay = on_relay
        self.relay = None
        self.finish_calls = 0
        self.finished = defer.Deferred()
        self.backend = socket.create_server(("127.0.0.1", 0))
        self.backend.settimeout(TIMEOUT)
        self.backend_port = self.backend.getsockname()[1]
        factory = protocol.ServerFactory.forProtocol(_ClientSide)
        factory.harness = self
        self.port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.front_port = self.port.getHost().port

    def _accepted(self, client):
        endpoint = endpoints.TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.backend_port)
        d = endpoint.connect(protocol.Factory.forProtocol(_Side))

        def connected(upstream):
            self.relay = Relay(
                self.reactor, client.transport, upstream.transport, on_finished=self._done, splice=self.policy
            )
            client.leg = self.relay.client_leg
            upstream.leg = self.relay.upstream_leg
            if self.on_relay is not None:
                self.on_relay(self.relay, client.transport, upstream.transport)
            self.relay.start()

        d.addCallbacks(connected, lambda f: client.transport.abortConnection())

    def _done(self, relay):
        self.finish_calls += 1
        if not self.finished.called:
            self.finished.callback(relay)

    def serve(self, behaviour, *args):
        """Accept one backend connection in a thread and run ``behaviour(sock, *args)`` on it."""

        def run():
            conn, _ = self.backend.accept()
            conn.settimeout(TIMEOUT)
            try:
                return behaviour(conn, *args)
            finally:
                conn.close()

        return in_thread(run)

    def client(self, behaviour, *args):
        """Connect a client to the front in a thread and run ``behaviour(sock, *args)``."""

        def run():
            sock = socket.create_connection(("127.0.0.1", self.front_port), timeout=TIMEOUT)
            try:
                return behaviour(sock, *args)
            finally:
                sock.close()

        return in_thread(run)

    async def run(self, *deferreds):
        """Wait for the endpoint threads and the relay's on_finished, all within TIMEOUT."""
        done = defer.gatherResults(list(deferreds) + [self.finished], consumeErrors=True)
        done.addTimeout(TIMEOUT, self.reactor)
        try:
            results = await done
        except defer.FirstError as e:
            e.subFailure.raiseException()
        assert self.finish_calls == 1
        return results

    async def close(self):
        self.backend.close()
        await self.port.stopListening()


def make_policy(mode, min_bytes=0):
    """None for the plain relay, else a SplicePolicy switching after ``min_bytes``."""
    return None if mode == "plain" else SplicePolicy(min_bytes=min_bytes)


@pytest.mark.parametrize("mode", MODES)
@pytest_twisted.ensureDeferred
async def test_64mib_each_way_arrive_intact_without_fd_leak(mode):
    """64 MiB each way at once: sha256 matches both ways, counters exact, splice engaged, no fd left behind."""
    policy = make_policy(mode, min_bytes=64 * 1024)
    h = Harness(policy)
    up, down = payload(64 * MIB, 1), payload(64 * MIB, 2)
    fds = fd_count()
    try:
        started = time.monotonic()
        got_down, got_up, relay = await h.run(h.client(duplex, up), h.serve(duplex, down))
        elapsed = time.monotonic() - started
    finally:
        await h.close()
    assert got_up == (hashlib.sha256(up).hexdigest(), 64 * MIB)
    assert got_down == (hashlib.sha256(down).hexdigest(), 64 * MIB)
    assert (relay.bytes_up, relay.bytes_down) == (64 * MIB, 64 * MIB)
    assert relay.aborted is None
    assert relay.spliced is (mode == "splice")
    if policy is not None:
        assert (policy.spliced_now, policy.spliced_total, policy.pages_in_use) == (0, 1, 0)
    assert fd_count() == fds - 2  # only the two listening sockets of the harness went away
    print("%s relay: %.0f MB/s (128 MiB total)" % (mode, 128 * MIB / elapsed / 1e6))


def _request_then_reply_client(sock, request):
    sock.sendall(request)
    sock.shutdown(socket.SHUT_WR)
    return recv_all(sock)


def _read_all_then_reply_backend(sock, reply):
    got = recv_all(sock)
    sock.sendall(reply + b"%d\n" % got[1])
    return got


@pytest.mark.parametrize("mode", MODES)
@pytest_twisted.ensureDeferred
async def test_client_half_close_still_receives_the_full_reply(mode):
    """Client sends, then shutdown(SHUT_WR); the backend sees EOF, replies 2 MiB; the client gets all of it."""
    h = Harness(make_policy(mode))
    request, reply = payload(3 * MIB, 3), payload(2 * MIB, 4)
    fds = fd_count()
    try:
        got_reply, got_request, relay = await h.run(
            h.client(_request_then_reply_client, request), h.serve(_read_all_then_reply_backend, reply)
        )
    finally:
        await h.close()
    assert got_request == (hashlib.sha256(request).hexdigest(), 3 * MIB)
    full = reply + b"%d\n" % (3 * MIB)
    assert got_reply == (hashlib.sha256(full).hexdigest(), len(full))
    assert relay.spliced is (mode == "splice")
    assert relay.aborted is None
    assert relay.half_closed_since is not None
    assert fd_count() == fds - 2


def _banner_then_read_backend(sock, banner):
    sock.sendall(banner)
    sock.shutdown(socket.SHUT_WR)
    return recv_all(sock)


def _read_banner_then_upload_client(sock, upload):
    banner = recv_all(sock)
    sock.sendall(upload)
    sock.shutdown(socket.SHUT_WR)
    assert sock.recv(1) == b""
    return banner


@pytest.mark.parametrize("mode", MODES)
@pytest_twisted.ensureDeferred
async def test_upstream_half_close_still_receives_the_full_upload(mode):
    """Backend sends, then shutdown(SHUT_WR); the client reads to EOF, then uploads 3 MiB the backend gets whole."""
    h = Harness(make_policy(mode))
    banner, upload = payload(2 * MIB, 5), payload(3 * MIB, 6)
    try:
        got_banner, got_upload, relay = await h.run(
            h.client(_read_banner_then_upload_client, upload), h.serve(_banner_then_read_backend, banner)
        )
    finally:
        await h.close()
    assert got_banner == (hashlib.sha256(banner).hexdigest(), 2 * MIB)
    assert got_upload == (hashlib.sha256(upload).hexdigest(), 3 * MIB)
    assert relay.spliced is (mode == "splice")
    assert relay.aborted is None


def _expect_reset(sock):
    """Read until an error; returns the errno (ECONNRESET expected), or None on a clean EOF."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError as e:
        return e.errno
    return None


def _hello_then_expect_reset(sock):
    sock.sendall(b"hello")
    return _expect_reset(sock)


def _read_hello_then_reset(sock):
    assert sock.recv(5) == b"hello"
    reset(sock)
    return "reset sent"


def _hello_wait_ack_then_reset(sock):
    sock.sendall(b"hello")
    assert sock.recv(3) == b"ack"
    reset(sock)
    return "reset sent"


def _read_hello_ack_then_expect_reset(sock):
    assert sock.recv(5) == b"hello"
    sock.sendall(b"ack")
    return _expect_reset(sock)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("who", ["upstream", "client"])
@pytest_twisted.ensureDeferred
async def test_reset_arrives_as_reset_on_the_other_side(mode, who):
    """An RST from one side reaches the other side as an RST (ECONNRESET), never as a clean EOF."""
    h = Harness(make_policy(mode))
    fds = fd_count()
    try:
        if who == "upstream":
            client_result, backend_result, relay = await h.run(
                h.client(_hello_then_expect_reset), h.serve(_read_hello_then_reset)
            )
            assert client_result == errno.ECONNRESET
        else:
            client_result, backend_result, relay = await h.run(
                h.client(_hello_wait_ack_then_reset), h.serve(_read_hello_ack_then_expect_reset)
            )
            assert backend_result == errno.ECONNRESET
    finally:
        await h.close()
    assert relay.aborted == "%s reset" % who
    assert relay.spliced is (mode == "splice")
    assert fd_count() == fds - 2


def _blast_backend(sock, data):
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    return len(data)


def _slow_reader_client(sock):
    return recv_all(sock, pace=(256 * 1024, 0.002))


@pytest.mark.parametrize("mode", MODES)
@pytest_twisted.ensureDeferred
async def test_fast_sender_to_slow_reader_keeps_relay_memory_bounded(mode):
    """50 MiB into a slow reader: the relay pauses the sender instead of buffering (userspace < 1 MiB)."""
    seen = {"max_buffer": 0, "pauses": 0}

    def instrument(relay, client_transport, upstream_transport):
        write, pause = client_transport.write, upstream_transport.pauseProducing

        def recording_write(data):
            write(data)
            seen["max_buffer"] = max(seen["max_buffer"], write_buffer_len(client_transport))

        def recording_pause():
            seen["pauses"] += 1
            pause()

        client_transport.write = recording_write
        upstream_transport.pauseProducing = recording_pause

    policy = make_policy(mode)
    h = Harness(policy, on_relay=instrument)
    data = payload(50 * MIB, 7)
    try:
        got, sent, relay = await h.run(h.client(_slow_reader_client), h.serve(_blast_backend, data))
    finally:
        await h.close()
    assert sent == 50 * MIB
    assert got == (hashlib.sha256(data).hexdigest(), 50 * MIB)
    assert relay.bytes_down == 50 * MIB
    if mode == "plain":
        assert seen["pauses"] > 0, "the reader was never slow enough to exercise backpressure"
        assert 0 < seen["max_buffer"] < MIB
    else:
        assert relay.spliced is True
        assert seen["max_buffer"] == 0  # Twisted never buffered a byte: the kernel pipe did
        assert relay.pump.stalls > 0  # the destination filled up and the pump waited for it


def _hello_then_signal_then_expect_reset(sock, got_hello):
    assert sock.recv(5) == b"hello"
    got_hello()
    return _expect_reset(sock)


@pytest.mark.parametrize("mode", MODES)
@pytest_twisted.ensureDeferred
async def test_abort_resets_both_sides_and_releases_the_pipes(mode):
    """relay.abort() (as the timeout sweeper does) RSTs client and backend, also mid-splice, leaking nothing."""
    policy = make_policy(mode)
    h = Harness(policy)
    reactor = h.reactor
    hello = defer.Deferred()
    fds = fd_count()
    try:
        client = h.client(_hello_then_expect_reset)
        backend = h.serve(_hello_then_signal_then_expect_reset, lambda: reactor.callFromThread(hello.callback, None))
        await hello.addTimeout(TIMEOUT, reactor)
        assert h.relay.spliced is (mode == "splice")
        assert h.relay.check_timeouts(h.relay.last_activity + 1, 1, 60) == "idle"
        client_result, backend_result, relay = await h.run(client, backend)
    finally:
        await h.close()
    assert (client_result, backend_result) == (errno.ECONNRESET, errno.ECONNRESET)
    assert relay.aborted == "idle"
    if policy is not None:
        assert (policy.spliced_now, policy.spliced_total, policy.pages_in_use) == (0, 1, 0)
    assert fd_count() == fds - 2


@pytest.mark.skipif(not splice_supported(), reason="no os.splice")
@pytest_twisted.ensureDeferred
async def test_exhausted_pipe_budget_keeps_the_connection_on_the_plain_relay():
    """An unprivileged policy whose budget cannot fit one connection relays plainly and counts the refusal."""
    policy = SplicePolicy(min_bytes=0, soft_pages=32, cap_eff=0)  # budget 16 pages < 32 a connection needs
    h = Harness(policy)
    request, reply = payload(MIB, 8), payload(MIB, 9)
    try:
        got_reply, got_request, relay = await h.run(
            h.client(_request_then_reply_client, request), h.serve(_read_all_then_reply_backend, reply)
        )
    finally:
        await h.close()
    assert got_request == (hashlib.sha256(request).hexdigest(), MIB)
    assert got_reply[1] == MIB + len(b"%d\n" % MIB)
    assert relay.spliced is False
    assert (policy.spliced_total, policy.refused_budget) == (0, 1)


# -- how an HTTP download ends: clean endings must never be reported as resets

GET = b"GET /blob/209715200 HTTP/1.1\r\nHost: 203.0.113.10\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
DOWNLOAD = 8 * MIB  # far past the 64 KiB after which the relay switches to splice
ROUNDS = 5  # the endings race (whose FIN first, which epoll batch): repeat each one


def _recv_exactly(sock, n):
    """Read exactly ``n`` bytes (fewer only at EOF); returns (sha256 hex, byte count)."""
    h = hashlib.sha256()
    got = 0
    while got < n:
        data = sock.recv(min(MIB, n - got))
        if not data:
            break
        h.update(data)
        got += len(data)
    return h.hexdigest(), got


def _get_then_close(sock, size):
    """An HTTP/1.1 client: small request (no SHUT_WR), read exactly the body; the harness then close()s."""
    sock.sendall(GET)
    return _recv_exactly(sock, size)


def _how_it_ended(sock):
    """What the device side sees next: "eof" (FIN), "reset" (RST) or "data"."""
    try:
        return "eof" if sock.recv(65536) == b"" else "data"
    except ConnectionResetError:
        return "reset"


def _reply_keep_alive(sock, body):
    """(a) A keep-alive device: answer, keep the connection open, report how the relay ended it."""
    request = _recv_exactly(sock, len(GET))
    sock.sendall(body)
    return request[1], _how_it_ended(sock)


def _reply_then_fin(sock, body):
    """(b) A device that ends the response with FIN (shutdown(SHUT_WR)), then reports the relay's ending."""
    request = _recv_exactly(sock, len(GET))
    sock.sendall(body)
    sock.shutdown(socket.SHUT_WR)
    return request[1], _how_it_ended(sock)


def _reply_then_close(sock, body):
    """(b') A device that close()s right after the response, as tinyproxy does once the origin is done."""
    request = _recv_exactly(sock, len(GET))
    sock.sendall(body)
    return request[1], "closed"


CLEAN_ENDINGS = {
    "keep-alive": (_reply_keep_alive, "eof"),
    "fin": (_reply_then_fin, "eof"),
    "close": (_reply_then_close, "closed"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ending", sorted(CLEAN_ENDINGS))
@pytest_twisted.ensureDeferred
async def test_download_read_exactly_then_closed_by_the_client_is_not_a_reset(mode, ending):
    """Client reads exactly the body then close()s: no abort, the device gets a FIN, on_finished once."""
    behaviour, device_sees = CLEAN_ENDINGS[ending]
    body = payload(DOWNLOAD, 10)
    digest = hashlib.sha256(body).hexdigest()
    for _ in range(ROUNDS):
        policy = make_policy(mode, min_bytes=64 * 1024)
        h = Harness(policy)
        fds = fd_count()
        try:
            got, device, relay = await h.run(h.client(_get_then_close, DOWNLOAD), h.serve(behaviour, body))
        finally:
            await h.close()
        assert got == (digest, DOWNLOAD)
        assert device == (len(GET), device_sees)
        assert relay.aborted is None
        assert (relay.bytes_up, relay.bytes_down) == (len(GET), DOWNLOAD)
        assert relay.spliced is (mode == "splice")
        assert h.finish_calls == 1
        if policy is not None:
            assert (policy.spliced_now, policy.spliced_total, policy.pages_in_use) == (0, 1, 0)
        assert fd_count() == fds - 2


def _read_some_then_close(sock, size, device_saw_eof):
    """(c) A client that gives up: request, read ``size`` bytes of a longer body, close() with data in flight."""
    sock.sendall(GET)
    return _recv_exactly(sock, size)[1]


def _read_some_half_close_then_close(sock, size, device_saw_eof):
    """(c') Like (c), but shutdown(SHUT_WR) first and close() only once the device has seen that FIN."""
    sock.sendall(GET)
    got = _recv_exactly(sock, size)[1]
    sock.shutdown(socket.SHUT_WR)
    assert device_saw_eof.wait(TIMEOUT), "the relay never passed the client's FIN on"
    sock.close()  # unread data: RST
    return got


def _stream_until_refused(sock, chunk, device_saw_eof):
    """A device that keeps sending until the relay refuses; notes the relay's FIN; returns the errno it got."""
    _recv_exactly(sock, len(GET))
    sock.setblocking(False)
    view = memoryview(chunk)
    try:
        while True:
            readable, writable, _ = select.select([] if device_saw_eof.is_set() else [sock], [sock], [], TIMEOUT)
            if not (readable or writable):
                raise TimeoutError("the relay neither took data nor ended the connection")
            if readable and sock.recv(65536) == b"":
                device_saw_eof.set()
            if writable:
                view = view[sock.send(view) :] or memoryview(chunk)
    except (ConnectionResetError, BrokenPipeError) as e:
        return e.errno


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "client", [_read_some_then_close, _read_some_half_close_then_close], ids=["close", "fin-close"]
)
@pytest_twisted.ensureDeferred
async def test_client_closing_with_data_in_flight_is_a_client_reset(mode, client):
    """A close() with unread data makes the client's kernel send RST: a genuine "client reset", in both modes.

    Decision: this one is a reset. The client's kernel answers unread (or still arriving)
    data with an RST, not a FIN (RFC 1122 4.2.2.13, Linux TCPAbortOnClose / TCPAbortOnData),
    so the bytes in flight are lost; the relay must say so and reset the device, which would
    otherwise keep sending into a dead connection. Also when the client half-closed first
    and the relay had already passed that FIN on (the device's write side then only ends
    by the relay's decision, never by Twisted stopping a producer behind its back).
    """
    for _ in range(ROUNDS):
        policy = make_policy(mode, min_bytes=64 * 1024)
        h = Harness(policy)
        device_saw_eof = threading.Event()
        fds = fd_count()
        try:
            got, device_errno, relay = await h.run(
                h.client(client, MIB, device_saw_eof),
                h.serve(_stream_until_refused, payload(MIB, 11), device_saw_eof),
            )
        finally:
            await h.close()
        assert got == MIB
        assert relay.aborted == "client reset"
        assert device_errno in (errno.ECONNRESET, errno.EPIPE)
        if client is _read_some_half_close_then_close:
            assert device_saw_eof.is_set()  # (c) may or may not have sent a FIN before its RST
        assert relay.spliced is (mode == "splice")
        assert h.finish_calls == 1
        if policy is not None:
            assert (policy.spliced_now, policy.spliced_total, policy.pages_in_use) == (0, 1, 0)
        assert fd_count() == fds - 2
