# -*- test-case-name: tests.unit.test_relay -*-
"""Optional ``splice(2)`` fast path for the relay: the kernel moves the bytes, Python only steers.

The plain Twisted relay copies every byte through userspace and is CPU-bound
near 1 GB/s; splicing socket → pipe → socket cuts the CPU per byte about
three times. Pipes are not free, though: each spliced connection holds two
pipes (four more fds) and the kernel limits the pipe memory of each user
(``fs.pipe-user-pages-soft``; past it new pipes silently shrink to 8 KiB and
throughput collapses). So :class:`SplicePolicy` decides *when* a connection
may switch (only after it has relayed ``min_bytes``, so idle and small
connections never hold pipes) and keeps the process inside a pipe-page budget
(a connection that does not fit stays on the plain relay). :class:`SplicePump`
owns the two sockets while spliced and hands them back to Twisted to close.
"""

import errno
import fcntl
import os
import socket
import sys

from twisted.internet.interfaces import IReadWriteDescriptor
from twisted.logger import Logger
from zope.interface import implementer

CLIENT, UPSTREAM = 0, 1
SIDE_NAMES = ("client", "upstream")

PAGE_SIZE = 4096
DEFAULT_SOFT_PAGES = 16384  # kernel default of fs.pipe-user-pages-soft (64 MiB per user)
MIN_PIPE_SIZE = 65536  # one Twisted read (bufferSize) must fit an empty pipe
CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24

_SOFT_PATH = "/proc/sys/fs/pipe-user-pages-soft"
_MAX_SIZE_PATH = "/proc/sys/fs/pipe-max-size"
_STATUS_PATH = "/proc/self/status"


def splice_supported():
    """True on Linux when this Python has ``os.splice`` and ``fcntl.F_SETPIPE_SZ``."""
    return (
        sys.platform.startswith("linux")
        and hasattr(os, "splice")
        and hasattr(fcntl, "F_SETPIPE_SZ")
        and hasattr(fcntl, "F_GETPIPE_SZ")
    )


def _read_int(path, default):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return default


def read_soft_pages(path=_SOFT_PATH):
    """``fs.pipe-user-pages-soft`` (0 means unlimited); the kernel default when unreadable."""
    return _read_int(path, DEFAULT_SOFT_PAGES)


def read_pipe_max_size(path=_MAX_SIZE_PATH):
    """``fs.pipe-max-size``: the largest pipe an unprivileged process may ask for."""
    return _read_int(path, 1 << 20)


def cap_eff_from_status(text):
    """The effective capability mask from ``/proc/<pid>/status`` text; 0 when absent or malformed."""
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            try:
                return int(line.split(":", 1)[1].strip(), 16)
            except ValueError:
                return 0
    return 0


def read_cap_eff(path=_STATUS_PATH):
    """This process's effective capabilities (0, i.e. unprivileged, when unreadable)."""
    try:
        with open(path) as f:
            return cap_eff_from_status(f.read())
    except OSError:
        return 0


def pipe_privileged(cap_eff):
    """True when the kernel exempts us from the per-user pipe limit (CAP_SYS_RESOURCE or CAP_SYS_ADMIN)."""
    return bool(cap_eff & ((1 << CAP_SYS_RESOURCE) | (1 << CAP_SYS_ADMIN)))


def pages_for(size, page_size=PAGE_SIZE):
    """Pages the kernel charges for a pipe of ``size`` bytes (rounded up to a power of two)."""
    pages = max(1, -(-size // page_size))
    return 1 << (pages - 1).bit_length()


class SplicePolicy:
    """When a relay may switch to splice, with what pipe size, and whether the pipe budget allows it.

    One instance is shared by every relay of the process; it keeps the counters.

    :param pipe_size: bytes per pipe; None picks 1 MiB when privileged, else 64 KiB.
        Unprivileged sizes are capped at ``fs.pipe-max-size``; never below 64 KiB.
    :param min_bytes: a connection switches only after relaying this many bytes in plain mode.
    :param max_pipes: cap on pipes held at once (two per spliced connection); None for no cap.
    :param privileged_budget: pipe bytes all spliced connections may hold at once when the
        process is exempt from the per-user limit (a slow reader can pin a full pipe).
    :param available: override the platform check (tests).
    :param soft_pages: override ``fs.pipe-user-pages-soft`` (tests); 0 means the kernel has no limit.
    :param cap_eff: override the effective capability mask (tests).
    :param pipe_max_size: override ``fs.pipe-max-size`` (tests).
    """

    _log = Logger()

    def __init__(
        self,
        pipe_size=None,
        min_bytes=64 * 1024,
        max_pipes=None,
        *,
        privileged_budget=256 << 20,
        available=None,
        soft_pages=None,
        cap_eff=None,
        pipe_max_size=None,
        page_size=PAGE_SIZE,
    ):
        self.available = splice_supported() if available is None else bool(available)
        self.soft_pages = read_soft_pages() if soft_pages is None else soft_pages
        self.privileged = pipe_privileged(read_cap_eff() if cap_eff is None else cap_eff)
        max_size = read_pipe_max_size() if pipe_max_size is None else pipe_max_size
        if pipe_size is None:
            pipe_size = (1 << 20) if self.privileged else 64 * 1024
        if not self.privileged:
            pipe_size = min(pipe_size, max_size)
        self.pipe_size = max(MIN_PIPE_SIZE, pipe_size)
        self.pages_per_pipe = pages_for(self.pipe_size, page_size)
        self.min_bytes = min_bytes
        self.max_pipes = max_pipes
        if self.privileged:
            self.budget_pages = pages_for(privileged_budget, page_size) if privileged_budget else None
        elif not self.soft_pages:
            self.budget_pages = None
        else:
            self.budget_pages = self.soft_pages // 2
        self.pages_in_use = 0
        self.spliced_now = 0
        self.spliced_total = 0
        self.refused_budget = 0
        self.setup_failed = 0

    @property
    def pages_per_connection(self):
        """Pipe pages one spliced connection holds (one pipe per direction)."""
        return 2 * self.pages_per_pipe

    def wants(self, relayed_bytes):
        """True when a connection that has relayed ``relayed_bytes`` should try to switch."""
        return self.available and relayed_bytes >= self.min_bytes

    def acquire(self):
        """Reserve the pipes of one connection; False (and counted) when the budget or cap is exhausted."""
        need = self.pages_per_connection
        if self.budget_pages is not None and self.pages_in_use + need > self.budget_pages:
            self.refused_budget += 1
            return False
        if self.max_pipes is not None and 2 * (self.spliced_now + 1) > self.max_pipes:
            self.refused_budget += 1
            return False
        self.pages_in_use += need
        self.spliced_now += 1
        self.spliced_total += 1
        return True

    def release(self, failed=False):
        """Return a reservation; ``failed`` when the pipes could not be set up (undoes the total)."""
        self.pages_in_use -= self.pages_per_connection
        self.spliced_now -= 1
        if failed:
            self.spliced_total -= 1
            self.setup_failed += 1

    def stats(self):
        """The counters, for metrics."""
        return {
            "spliced_now": self.spliced_now,
            "spliced_total": self.spliced_total,
            "refused_budget": self.refused_budget,
            "setup_failed": self.setup_failed,
            "pages_in_use": self.pages_in_use,
            "budget_pages": self.budget_pages,
            "pipe_size": self.pipe_size,
        }


def make_pipe(size):
    """A non-blocking close-on-exec pipe of exactly ``size`` bytes or more; OSError otherwise.

    A user over the soft limit gets 2-page pipes and F_SETPIPE_SZ fails with
    EPERM: that is reported as an error, never accepted as a small pipe.
    """
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
        actual = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        if actual < size:
            raise OSError(errno.EPERM, "pipe is %d bytes, wanted %d" % (actual, size))
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    return r, w, actual


READS_PER_WAKEUP = 4  # bounded, so one busy connection cannot starve the others


class _Direction:
    """One way of the pump: source socket → pipe → destination socket."""

    __slots__ = ("src", "dst", "pipe_r", "pipe_w", "size", "in_pipe", "eof", "done")

    def __init__(self, src, dst):
        self.src = src
        self.dst = dst
        self.pipe_r = self.pipe_w = -1
        self.size = 0
        self.in_pipe = 0
        self.eof = False
        self.done = False


@implementer(IReadWriteDescriptor)
class _SocketEnd:
    """The one selectable the reactor knows for a spliced socket fd (epoll maps an fd to one object)."""

    def __init__(self, pump, side, sock):
        self._pump = pump
        self._side = side
        self._sock = sock

    def fileno(self):
        """IReadDescriptor.fileno; -1 once the socket has been closed."""
        return self._sock.fileno()

    def doRead(self):
        """IReadDescriptor.doRead: this socket has data (or EOF) for the other side."""
        self._pump._readable(self._side)

    def doWrite(self):
        """IWriteDescriptor.doWrite: this socket can take more of the other side's pipe."""
        self._pump._writable(self._side)

    def connectionLost(self, reason):
        """IFileDescriptor.connectionLost: the reactor dropped the fd after a HUP/ERR (or the fd is gone).

        The reactor's reason is a guess, not the kernel's word (see :meth:`SplicePump._lost`).
        """
        self._pump._lost(self._side, reason)

    def logPrefix(self):
        """ILoggingContext.logPrefix."""
        return "SplicePump(%s)" % SIDE_NAMES[self._side]


class SplicePump:
    """Moves bytes between two connected sockets with splice(2) while the Twisted transports stand still.

    The caller has stopped reading and writing on both transports (and left no
    bytes in their write buffers). Per direction: splice socket → pipe, then at
    once pipe → peer; when the peer is full, stop reading the source and wait
    for the peer to become writable. EOF (splice returns 0) shuts the peer's
    write side once the pipe is empty. Any socket error fails the pump. When
    both directions are done, or on failure, the descriptors are removed and
    the pipes closed *before* ``on_done(error)`` is called, so the caller can
    give the sockets back to Twisted to close.

    :param reactor: an IReactorFDSet.
    :param sockets: ``(client_socket, upstream_socket)``.
    :param on_bytes: ``on_bytes(src_side, n)`` for bytes delivered to the other socket.
    :param on_eof: ``on_eof(src_side)`` after the source's EOF was passed on (peer shut down for writing).
    :param on_done: ``on_done(error, side)``: ``(None, None)`` for a clean end, else the exception and
        the side whose socket (or that socket's pipe) failed.
    """

    _log = Logger()

    def __init__(self, reactor, sockets, pipe_size, *, on_bytes, on_eof, on_done):
        self._reactor = reactor
        self._socks = tuple(sockets)
        self._pipe_size = pipe_size
        self._on_bytes = on_bytes
        self._on_eof = on_eof
        self._on_done = on_done
        self._dirs = (_Direction(CLIENT, UPSTREAM), _Direction(UPSTREAM, CLIENT))
        self._ends = tuple(_SocketEnd(self, side, sock) for side, sock in enumerate(self._socks))
        self._reading = [False, False]
        self._writing = [False, False]
        self.active = False
        self.finished = False
        self.stalls = 0
        self.error = None

    def open(self):
        """Create both pipes; raises OSError (with nothing left open) when that fails."""
        try:
            for d in self._dirs:
                d.pipe_r, d.pipe_w, d.size = make_pipe(self._pipe_size)
        except BaseException:
            self._close_pipes()
            raise

    def in_pipe(self, src_side):
        """Bytes from ``src_side`` sitting in its pipe (tracked: EAGAIN alone cannot tell)."""
        return self._dirs[src_side].in_pipe

    def start(self, pending=None):
        """Take over the sockets; ``pending`` is ``{src_side: bytes}`` already read but not yet delivered.

        Each pending chunk must fit an empty pipe (at most the pipe size).
        """
        self.active = True
        for side, data in (pending or {}).items():
            d = self._dirs[side]
            view = memoryview(data)
            while view:
                n = os.write(d.pipe_w, view)
                view = view[n:]
                d.in_pipe += n
        for d in self._dirs:
            if not self.active:
                return
            if d.in_pipe:
                self._flush(d)
            else:
                self._set_reading(d.src, True)

    def stop(self):
        """Tear down without calling ``on_done`` (the caller is aborting). Idempotent."""
        if not self.finished:
            self.finished = True
            self._teardown()

    # -- reactor events

    def _readable(self, side):
        d = self._dirs[side]
        if not self.active or d.eof or d.in_pipe:
            # Spurious (the reactor may call us once more after a swap); the writer side drives now.
            self._set_reading(side, False)
            return
        src = self._socks[side].fileno()
        for _ in range(READS_PER_WAKEUP):
            try:
                n = os.splice(src, d.pipe_w, d.size, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                return
            except OSError as e:
                self._fail(e, side)
                return
            if n == 0:
                d.eof = True
                self._set_reading(side, False)
            else:
                d.in_pipe += n
            self._flush(d)
            # Go round again only while the socket filled the pipe and the pipe drained:
            # more is probably waiting, and another epoll wait would cost a wakeup.
            if n < d.size or d.in_pipe or d.eof or not self.active:
                return

    def _writable(self, side):
        d = self._dirs[1 - side]
        if not self.active or d.done:
            self._set_writing(side, False)
            return
        self._flush(d)

    def _lost(self, side, reason):
        """The reactor dropped ``side``'s end: ask the socket what happened instead of trusting the reason.

        Twisted turns an EPOLLHUP without EPOLLIN into ConnectionLost when the fd is only
        registered for writing (epoll masks EPOLLIN then) and into ConnectionDone when it is
        registered for reading, without looking at the socket. A hang-up is a state, not an
        error: a FIN is read as EOF (splice returns 0) and only an RST leaves an error. So a
        pending socket error fails the pump with that errno; without one, the I/O pending on
        this socket is resumed at once and splice() itself reports the EOF, the data or the
        errno. (A hung-up socket never answers EAGAIN, so this cannot spin.)
        """
        if not self.active:
            return
        end = self._ends[side]
        self._reading[side] = self._writing[side] = False
        self._reactor.removeReader(end)  # the reactor did so already; a no-op then
        self._reactor.removeWriter(end)
        sock = self._socks[side]
        if sock.fileno() == -1:
            self._fail(OSError(errno.EBADF, "socket closed under the splice pump (%s)" % reason.value), side)
            return
        try:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as e:
            self._fail(e, side)
            return
        if err:
            self._fail(OSError(err, os.strerror(err)), side)
            return
        self._log.debug(
            "splice pump: {side} hung up ({reason}) without a socket error; resuming its I/O",
            side=SIDE_NAMES[side],
            reason=reason.value,
        )
        outbound = self._dirs[1 - side]  # the other side's bytes waiting to go to this socket
        if outbound.in_pipe and not outbound.done:
            self._flush(outbound)
        inbound = self._dirs[side]  # this socket's bytes (or EOF) for the other side
        if self.active and not inbound.eof and not inbound.in_pipe:
            self._set_reading(side, True)
            self._readable(side)

    # -- the pump

    def _flush(self, d):
        dst = self._socks[d.dst]
        while d.in_pipe:
            try:
                n = os.splice(d.pipe_r, dst.fileno(), d.in_pipe, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                break
            except OSError as e:
                self._fail(e, d.dst)
                return
            if n <= 0:
                break
            d.in_pipe -= n
            self._on_bytes(d.src, n)
        if d.in_pipe:
            if not self._writing[d.dst]:
                self.stalls += 1
            self._set_reading(d.src, False)
            self._set_writing(d.dst, True)
            return
        self._set_writing(d.dst, False)
        if not d.eof:
            self._set_reading(d.src, True)
            return
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError as e:
            self._fail(e, d.dst)
            return
        d.done = True
        self._on_eof(d.src)
        if all(x.done for x in self._dirs) and self.active:
            self.active = False
            self.finished = True
            self._teardown()
            self._on_done(None, None)

    def _fail(self, error, side):
        if self.finished:
            return
        self._log.debug("splice pump failed on {side}: {error!r}", side=SIDE_NAMES[side], error=error)
        self.error = error
        self.active = False
        self.finished = True
        self._teardown()
        self._on_done(error, side)

    def _set_reading(self, side, on):
        if self._reading[side] != on:
            self._reading[side] = on
            if on:
                self._reactor.addReader(self._ends[side])
            else:
                self._reactor.removeReader(self._ends[side])

    def _set_writing(self, side, on):
        if self._writing[side] != on:
            self._writing[side] = on
            if on:
                self._reactor.addWriter(self._ends[side])
            else:
                self._reactor.removeWriter(self._ends[side])

    def _teardown(self):
        self.active = False
        for side in (CLIENT, UPSTREAM):
            # Unconditional: the reactor may already have dropped an end; removal is then a no-op.
            self._reading[side] = self._writing[side] = False
            self._reactor.removeReader(self._ends[side])
            self._reactor.removeWriter(self._ends[side])
        self._close_pipes()

    def _close_pipes(self):
        for d in self._dirs:
            for fd in (d.pipe_r, d.pipe_w):
                if fd >= 0:
                    os.close(fd)
            d.pipe_r = d.pipe_w = -1
            d.in_pipe = 0
