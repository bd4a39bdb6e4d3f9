"""The load generator of ``make bench-proxy``: plain blocking sockets and threads.

Every function takes a :class:`Target` -- how the generator reaches one relay
(the REDIRECTed destination port, and whether the client has to send the
``CONNECT`` line itself, as it does for socat and the direct baseline) -- and
checks what comes back byte for byte, raising :class:`LoadError` on any
mismatch, short count, reset or timeout. The sink decides what to play from the
CONNECT target's last octet (see :mod:`tests.bench.sink`), so the generator
picks the behaviour by picking the destination address.
"""

import errno
import selectors
import socket
import threading
import time

from tests.bench.namespace_run import percentile  # also pl.percentile for bench-proxy
from tests.bench.sink import BANNER, REPLY_200

COUNT_IP = "198.51.100.1"
ECHO_IP = "198.51.100.2"
BANNER_IP = "198.51.100.3"
CHUNK = 1 << 20


class LoadError(Exception):
    """The relay delivered something other than what the sink/generator expected."""


class Target:
    """How to reach one relay: destination port (REDIRECTed to it) and who sends CONNECT."""

    def __init__(self, name, dport, client_connect):
        self.name = name
        self.dport = dport
        self.client_connect = client_connect

    def addr(self, ip):
        return (ip, self.dport)

    def connect_line(self, ip):
        """The CONNECT request the client sends itself (socat, direct), else b""."""
        if not self.client_connect:
            return b""
        return b"CONNECT %s:%d HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (ip.encode(), self.dport, ip.encode(), self.dport)

    def reply_prefix(self):
        """What the client reads before the origin's bytes: the sink's 200 when it sent CONNECT itself."""
        return REPLY_200 if self.client_connect else b""


IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def bind_source(sock, address):
    """Bind ``sock`` to local ``address``; the port is chosen at ``connect()`` (per destination)."""
    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.bind((address, 0))


def _read_exact(sock, n, what):
    out = bytearray()
    while len(out) < n:
        data = sock.recv(n - len(out))
        if not data:
            raise LoadError("%s: EOF after %d of %d bytes (%r)" % (what, len(out), n, bytes(out[:80])))
        out += data
    return bytes(out)


def _read_to_eof(sock, limit, what):
    out = bytearray()
    while True:
        data = sock.recv(4096)
        if not data:
            return bytes(out)
        out += data
        if len(out) > limit:
            raise LoadError("%s: more than %d bytes before EOF" % (what, limit))


def _expect(sock, expected, what):
    got = _read_exact(sock, len(expected), what)
    if got != expected:
        raise LoadError("%s: expected %r, got %r" % (what, expected[:80], got[:80]))


def open_stream(target, ip, timeout, nodelay=False):
    """Connect (through the REDIRECT) and, when the client speaks CONNECT, finish that exchange."""
    sock = socket.create_connection(target.addr(ip), timeout=timeout)
    if nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    line = target.connect_line(ip)
    if line:
        sock.sendall(line)
        _expect(sock, REPLY_200, "%s CONNECT reply" % target.name)
    return sock


# --------------------------------------------------------------------------- throughput


def _upload(target, nbytes, timeout, barrier, out, index):
    payload = memoryview(bytes(CHUNK))
    sock = None
    try:
        sock = open_stream(target, COUNT_IP, timeout)
        if barrier is not None:
            barrier.wait(timeout)
        t0 = time.perf_counter()
        left = nbytes
        while left:
            n = min(left, CHUNK)
            sock.sendall(payload[:n])
            left -= n
        sock.shutdown(socket.SHUT_WR)
        reply = _read_to_eof(sock, 64, "%s count reply" % target.name)
        t1 = time.perf_counter()
        if reply != b"%d\n" % nbytes:
            raise LoadError("%s: sent %d bytes then FIN, sink counted %r" % (target.name, nbytes, reply))
        out[index] = (t0, t1)
    except Exception as e:  # reported by the caller (KeyboardInterrupt etc. propagate)
        out[index] = e
        if barrier is not None:
            barrier.abort()
    finally:
        if sock is not None:
            sock.close()


def upload(target, streams, per_stream, timeout):
    """``streams`` parallel uploads of ``per_stream`` bytes each, 1 MiB sends, SHUT_WR, count verified.

    :returns: dict with bytes, seconds (first start to last verified reply) and MB/s (10^6 B/s).
    """
    out = [None] * streams
    if streams == 1:
        _upload(target, per_stream, timeout, None, out, 0)
    else:
        barrier = threading.Barrier(streams)
        threads = [
            threading.Thread(target=_upload, args=(target, per_stream, timeout, barrier, out, i), daemon=True)
            for i in range(streams)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout * 2)
        if any(t.is_alive() for t in threads):
            raise LoadError("%s: upload threads still running after %.0f s" % (target.name, timeout * 2))
    errors = [r for r in out if not isinstance(r, tuple)]
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if errors:
        first = (real or errors)[0]
        raise LoadError(
            "%s: %d of %d streams failed, first: %s: %s"
            % (target.name, len(errors), streams, type(first).__name__, first)
        )
    start = min(r[0] for r in out)
    end = max(r[1] for r in out)
    total = streams * per_stream
    return {"bytes": total, "seconds": end - start, "mb_s": total / (end - start) / 1e6}


# --------------------------------------------------------------------------- connection setup


def setup_rate(target, count, concurrency, timeout, sources=None):
    """``count`` connections, ``concurrency`` at a time: connect, 1-byte echo, close.

    :param sources: optional list of local addresses; connection ``i`` binds ``sources[i % len]``.
    :returns: dict with connections/s, per-connection latency p50/p99 (ms) and errors.
    """
    line = target.connect_line(ECHO_IP)
    expected = target.reply_prefix() + b"x"
    lock = threading.Lock()
    state = {"next": 0}
    lat = []
    errors = []

    def worker():
        while True:
            with lock:
                if state["next"] >= count or len(errors) > 20:
                    return
                index = state["next"]
                state["next"] += 1
            t0 = time.perf_counter()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if sources:
                    bind_source(sock, sources[index % len(sources)])
                sock.connect(target.addr(ECHO_IP))
                sock.sendall(line + b"x")
                _expect(sock, expected, "%s echo" % target.name)
                ms = (time.perf_counter() - t0) * 1000
                with lock:
                    lat.append(ms)
            except Exception as e:
                with lock:
                    errors.append("%s: %s" % (type(e).__name__, e))
            finally:
                sock.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * 4)
    seconds = time.perf_counter() - t0
    if any(t.is_alive() for t in threads):
        errors.append("workers still running after %.0f s" % (timeout * 4))
    return {
        "count": len(lat),
        "concurrency": concurrency,
        "seconds": seconds,
        "conns_s": len(lat) / seconds if seconds > 0 else float("nan"),
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "errors": errors[:10],
        "error_count": len(errors),
    }


# --------------------------------------------------------------------------- time to first byte


def ttfb(target, samples, warmup, timeout):
    """Server-first protocol: ``connect()`` → first banner byte, sequential, one connection each.

    For the client-CONNECT relays the clock also covers the CONNECT exchange,
    which the transparent relays do on the client's behalf.
    :returns: dict with p50/p99/max (ms) and the samples.
    """
    line = target.connect_line(BANNER_IP)
    expected = target.reply_prefix() + BANNER
    lat = []
    for i in range(warmup + samples):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t0 = time.perf_counter()
            sock.connect(target.addr(BANNER_IP))
            if line:
                sock.sendall(line)
            first = _read_exact(sock, len(target.reply_prefix()) + 1, "%s banner" % target.name)
            t1 = time.perf_counter()
            rest = _read_exact(sock, len(expected) - len(first), "%s banner" % target.name)
            if first + rest != expected:
                raise LoadError("%s: expected banner %r, got %r" % (target.name, expected, first + rest))
        finally:
            sock.close()
        if i >= warmup:
            lat.append((t1 - t0) * 1000)
    return {
        "n": len(lat),
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat),
        "samples_ms": [round(v, 4) for v in lat],
    }


# --------------------------------------------------------------------------- idle connections


def hold_idle(target, n, batch, timeout, while_held, progress=None, sources=None):
    """Open ``n`` proxied connections in batches, each proven end to end by a 1-byte echo;
    call ``progress(held)`` after each batch, ``while_held()`` while all are open, then close them all.

    :param sources: optional list of local addresses; connection ``i`` binds ``sources[i % len]``.

    :returns: (seconds to open all, while_held's result).
    """
    line = target.connect_line(ECHO_IP)
    expected = target.reply_prefix() + b"i"
    held = []
    sel = selectors.DefaultSelector()
    t_start = time.perf_counter()
    try:
        while len(held) < n:
            pending = {}
            for i in range(min(batch, n - len(held))):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                if sources:
                    bind_source(sock, sources[(len(held) + i) % len(sources)])
                rc = sock.connect_ex(target.addr(ECHO_IP))
                if rc not in (0, errno.EINPROGRESS):
                    sock.close()
                    raise LoadError(
                        "%s: connect #%d failed: %s" % (target.name, len(held), errno.errorcode.get(rc, rc))
                    )
                pending[sock] = bytearray()
                sel.register(sock, selectors.EVENT_WRITE)
            deadline = time.monotonic() + timeout
            while pending:
                if time.monotonic() > deadline:
                    raise LoadError(
                        "%s: %d of a batch not echoed within %.0f s (%d held)"
                        % (target.name, len(pending), timeout, len(held))
                    )
                for key, events in sel.select(1.0):
                    sock = key.fileobj
                    if events & selectors.EVENT_WRITE:
                        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            raise LoadError(
                                "%s: connect #%d failed: %s" % (target.name, len(held), errno.errorcode.get(err, err))
                            )
                        sock.send(line + b"i")
                        sel.modify(sock, selectors.EVENT_READ)
                        continue
                    data = sock.recv(4096)
                    if not data:
                        raise LoadError("%s: idle connection #%d closed before its echo" % (target.name, len(held)))
                    got = pending[sock]
                    got += data
                    if len(got) >= len(expected):
                        if bytes(got) != expected:
                            raise LoadError("%s: idle echo expected %r, got %r" % (target.name, expected, bytes(got)))
                        sel.unregister(sock)
                        del pending[sock]
                        held.append(sock)
            if progress is not None:
                progress(len(held))
        opened = time.perf_counter() - t_start
        return opened, while_held()
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        sel.close()
        for sock in held:
            sock.close()
