"""A fast, trivial HTTP CONNECT "device proxy" for ``make bench-proxy``.

The relays under test (pocketproxy, redsocks) dial it and send ``CONNECT
host:port``; socat and the direct baseline get the CONNECT line from the load
generator itself. It answers ``200`` at once and then plays the origin server.
What it plays depends on the last octet of the CONNECT target (so one sink
serves every measurement and the relay in between cannot tell):

* ``x.x.x.1`` **count**: count every byte until EOF, then reply ``<count>\\n``
  and close -- the generator checks the count (delivery and half-close).
* ``x.x.x.2`` **echo**: echo what arrives; close on EOF.
* ``x.x.x.3`` **banner**: send a server-first banner right after the ``200``
  (a separate ``send``), then echo; close on EOF.
* ``x.x.x.4`` **whoami**: answer each HTTP request with ``200`` and an address as the body
  (``203.0.113.<port % 250>``: each listening port is a phone with its own exit address),
  HTTP/1.1 keep-alive: the device health probe's kind of target.

One process, one thread, level-triggered epoll (``selectors``), ``recv_into``
a 1 MiB buffer, so the sink costs far less per byte than any relay. It listens
on several ports (one per relay, so TIME_WAIT tuples of one relay never collide
with the next one's) and keeps per-port/per-target counters. Control is a line
protocol on stdin/stdout: ``stats`` (one JSON line back), ``reset``; EOF on
stdin stops the sink, so it never outlives the benchmark.
"""

import argparse
import json
import os
import selectors
import socket
import sys

REPLY_200 = b"HTTP/1.1 200 Connection established\r\n\r\n"
BANNER = b"220 pocketproxy-bench sink ready\r\n"
MAX_HEADER = 8192
MODES = {"1": "count", "2": "echo", "3": "banner", "4": "whoami"}


class _Conn:
    __slots__ = ("sock", "port", "mode", "header", "count", "key")

    def __init__(self, sock, port):
        self.sock = sock
        self.port = port
        self.mode = None
        self.header = bytearray()
        self.count = 0
        self.key = None


class Sink:
    """The epoll loop: listeners, connections and the stdin control channel."""

    def __init__(self, host, ports, backlog=8192):
        self.sel = selectors.DefaultSelector()
        self.buf = bytearray(1 << 20)
        self.view = memoryview(self.buf)
        self.listeners = {}
        self.open = 0
        self.open_by_port = dict.fromkeys(ports, 0)
        self.stats = {}
        self.errors = {}
        for port in ports:
            ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind((host, port))
            ls.listen(backlog)
            ls.setblocking(False)
            self.listeners[ls.fileno()] = (ls, port)
            self.sel.register(ls, selectors.EVENT_READ, None)
        self.control = sys.stdin.buffer.raw if hasattr(sys.stdin.buffer, "raw") else sys.stdin.buffer
        os.set_blocking(self.control.fileno(), False)
        self.sel.register(self.control.fileno(), selectors.EVENT_READ, "control")
        self.control_buf = b""
        self.running = True

    # ------------------------------------------------------------------ loop

    def run(self):
        while self.running:
            for key, _ in self.sel.select():
                data = key.data
                if data is None:
                    self._accept(key.fileobj)
                elif data == "control":
                    self._control()
                else:
                    self._read(data)

    def _accept(self, ls):
        port = self.listeners[ls.fileno()][1]
        for _ in range(256):
            try:
                sock, _ = ls.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: count, try again on the next event
                self._error("accept %s" % e.__class__.__name__)
                return
            sock.setblocking(False)
            self.open += 1
            self.open_by_port[port] += 1
            self.sel.register(sock, selectors.EVENT_READ, _Conn(sock, port))

    def _close(self, conn):
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        self.open -= 1
        self.open_by_port[conn.port] -= 1

    def _error(self, what):
        self.errors[what] = self.errors.get(what, 0) + 1

    def _send(self, conn, data):
        """Small replies only (count, 200, banner, 1-byte echoes): they always fit the send buffer."""
        try:
            conn.sock.send(data)
            return True
        except OSError as e:
            self._error("send %s" % e.__class__.__name__)
            self._close(conn)
            return False

    def _read(self, conn):
        try:
            if conn.mode == "count":
                n = conn.sock.recv_into(self.buf)
                if n:
                    conn.count += n
                    return
                self._finish(conn)
                return
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._error("recv %s" % e.__class__.__name__)
            self._close(conn)
            return
        if conn.mode is None:
            self._header(conn, data)
        elif conn.mode == "whoami":
            self._whoami(conn, data)
        elif not data:
            self._finish(conn)
        else:
            conn.count += len(data)
            self._send(conn, data)

    def _header(self, conn, data):
        if not data:
            self._error("eof before CONNECT")
            self._close(conn)
            return
        conn.header += data
        end = conn.header.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.header) > MAX_HEADER:
                self._error("oversized header")
                self._close(conn)
            return
        first = bytes(conn.header[: conn.header.find(b"\r\n")]).split()
        rest = bytes(conn.header[end + 4 :])
        conn.header = None
        if len(first) < 3 or first[0] != b"CONNECT":
            self._error("not a CONNECT")
            self._send(conn, b"HTTP/1.1 400 Bad Request\r\n\r\n")
            self._close(conn)
            return
        target = first[1].decode("ascii", "replace")
        host = target.rsplit(":", 1)[0]
        conn.mode = MODES.get(host.rsplit(".", 1)[-1], "echo")
        conn.key = "%d %s" % (conn.port, target)
        entry = self.stats.setdefault(conn.key, [0, 0])
        entry[0] += 1
        if not self._send(conn, REPLY_200):
            return
        if conn.mode == "banner" and not self._send(conn, BANNER):
            return
        if conn.mode == "whoami":
            conn.header = bytearray()
            if rest:
                self._whoami(conn, rest)
            return
        if rest:
            conn.count += len(rest)
            if conn.mode != "count":
                self._send(conn, rest)

    def _whoami(self, conn, data):
        if not data:
            self._finish(conn)
            return
        conn.header += data
        if b"\r\n\r\n" not in conn.header and len(conn.header) <= MAX_HEADER:
            return
        body = b"203.0.113.%d\n" % (conn.port % 250)
        # HTTP/1.1 keep-alive, as the public what-is-my-address services answer: the same
        # tunnel may carry the next request.
        conn.header = conn.header[conn.header.find(b"\r\n\r\n") + 4:]
        self._send(conn, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    def _finish(self, conn):
        """EOF from the client side: count mode answers with the byte count, then close."""
        if conn.key is not None:
            self.stats[conn.key][1] += conn.count
        if conn.mode == "count":
            self._send(conn, b"%d\n" % conn.count)
        if conn.sock.fileno() >= 0:
            self._close(conn)

    # ------------------------------------------------------------------ control

    def _control(self):
        try:
            chunk = os.read(self.control.fileno(), 4096)
        except BlockingIOError:
            return
        if not chunk:
            self.running = False
            return
        self.control_buf += chunk
        while b"\n" in self.control_buf:
            line, self.control_buf = self.control_buf.split(b"\n", 1)
            cmd = line.strip().decode()
            if cmd == "stats":
                out = {
                    "open": self.open,
                    "open_by_port": {str(p): n for p, n in self.open_by_port.items()},
                    "connects": self.stats,
                    "errors": self.errors,
                }
            elif cmd == "reset":
                self.stats, self.errors = {}, {}
                out = {"ok": True}
            else:
                out = {"error": "unknown command %r" % cmd}
            sys.stdout.write(json.dumps(out) + "\n")
            sys.stdout.flush()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m tests.bench.sink", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--ports", required=True, help="comma-separated listen ports")
    args = parser.parse_args(argv)
    sink = Sink(args.host, [int(p) for p in args.ports.split(",")])
    sys.stdout.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    try:
        sink.run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
