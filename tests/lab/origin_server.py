"""The lab's "internet": origin services the devices reach, run inside the origin namespace.

Stdlib only (threads), so it runs on any interpreter without the checkout on the path::

    python3 origin_server.py --address 203.0.113.10 [--address 2001:db8:113::10] --cert c.pem --key k.pem --ready FILE

Services (each reports what it saw, so a test can tell which path the bytes took):

- HTTP :80  ``GET /whoami``   -> the peer address (``203.0.113.2\\n``): who connected to the origin.
            ``GET /`` with ``Host: api.ipify.org`` -> the peer address without a newline, as
            https://www.ipify.org answers: the stand-in for the default device health target
            (the phones' /etc/hosts send ``api.ipify.org`` here).
            ``GET /blob/<N>`` -> N bytes of :func:`blob_chunks` (streamed, Content-Length set);
            the test computes :func:`blob_sha256` the same way and compares.
- TLS :443  reads one HTTP request, answers HTTP/1.0 with the body
            ``sni=<server_name or -> peer=<address>\\n`` and closes;
            so ``curl --resolve origin.test:443:203.0.113.10 https://origin.test/`` works too.
- :22       server-first: ``SSH-2.0-origin\\r\\n`` at once on accept, then echoes until EOF.

``--ready FILE`` is written after every socket listens. The server exits on SIGTERM.
"""

import argparse
import hashlib
import http.server
import os
import signal
import socket
import socketserver
import ssl
import struct
import sys
import threading

BLOB_CHUNK = 65536
BLOB_SEED = 20240601
BANNER = b"SSH-2.0-origin\r\n"
IPIFY_NAME = "api.ipify.org"  # pocketproxy's default health target; tests.lab.world points phones here
_BASE = None


def _base_block():
    """One fixed pseudo-random 64 KiB block (a sha256 counter stream, same on every interpreter)."""
    global _BASE
    if _BASE is None:
        out = bytearray()
        counter = 0
        while len(out) < BLOB_CHUNK:
            out += hashlib.sha256(b"pocketproxy-blob %d %d" % (BLOB_SEED, counter)).digest()
            counter += 1
        _BASE = bytes(out[:BLOB_CHUNK])
    return _BASE


def blob_chunks(size):
    """Yield the ``size`` bytes of blob N: chunk i is its 8-byte index followed by the base block,
    so a dropped, repeated or reordered chunk changes the hash."""
    base = _base_block()
    index = 0
    left = size
    while left > 0:
        chunk = struct.pack(">Q", index) + base[8:]
        yield chunk[:left]
        left -= len(chunk)
        index += 1


def blob_sha256(size):
    """The sha256 hex digest of blob ``size`` (what a correct download must hash to)."""
    digest = hashlib.sha256()
    for chunk in blob_chunks(size):
        digest.update(chunk)
    return digest.hexdigest()


class _HTTPHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pocketproxy-origin"

    def log_message(self, fmt, *args):  # one line per request on stderr, with the peer
        sys.stderr.write("http %s %s\n" % (self.client_address[0], fmt % args))

    def _send(self, code, body, content_type="text/plain"):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].lower()
        if host == IPIFY_NAME and self.path.split("?")[0] == "/":
            self._send(200, self.client_address[0].encode())
        elif self.path == "/whoami":
            self._send(200, (self.client_address[0] + "\n").encode())
        elif self.path.startswith("/blob/") and self.path[6:].isdigit():
            size = int(self.path[6:])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            for chunk in blob_chunks(size):
                self.wfile.write(chunk)
        else:
            self._send(404, b"not found\n")


class _ThreadingHTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _TLSHandler(socketserver.BaseRequestHandler):
    def handle(self):
        seen = {}

        def sni(sslobj, name, context):
            seen["sni"] = name

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.server.cert, self.server.key)
        context.sni_callback = sni
        self.request.settimeout(30)
        try:
            tls = context.wrap_socket(self.request, server_side=True)
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 65536:
                data = tls.recv(4096)
                if not data:
                    break
                request += data
            body = ("sni=%s peer=%s\n" % (seen.get("sni") or "-", self.client_address[0])).encode()
            head = "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(body)
            tls.sendall(head.encode() + body)
            tls.close()
        except (OSError, ssl.SSLError) as e:
            sys.stderr.write("tls %s error %s\n" % (self.client_address[0], e))
            return
        sys.stderr.write("tls %s sni %s\n" % (self.client_address[0], seen.get("sni")))


class _BannerHandler(socketserver.BaseRequestHandler):
    def handle(self):
        sys.stderr.write("banner %s accepted\n" % self.client_address[0])
        self.request.settimeout(60)
        try:
            self.request.sendall(BANNER)
            while True:
                data = self.request.recv(65536)
                if not data:
                    break
                self.request.sendall(data)
        except OSError:
            pass


class _ThreadingTCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def _family(cls, address):
    """``cls`` itself for IPv4, a subclass listening with AF_INET6 for an IPv6 address."""
    if ":" not in address:
        return cls
    return type(cls.__name__ + "6", (cls,), {"address_family": socket.AF_INET6})


def serve(addresses, cert, key, ready=None, http_port=80, tls_port=443, banner_port=22):
    """Start all services on every address; write ``ready`` once listening; block until SIGTERM."""
    servers = []
    for address in addresses:
        servers.append(_family(_ThreadingHTTPServer, address)((address, http_port), _HTTPHandler))
        tls = _family(_ThreadingTCPServer, address)((address, tls_port), _TLSHandler)
        tls.cert, tls.key = cert, key
        servers.append(tls)
        servers.append(_family(_ThreadingTCPServer, address)((address, banner_port), _BannerHandler))
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    _base_block()
    if ready:
        with open(ready + ".tmp", "w") as f:
            f.write("%d\n" % os.getpid())
        os.rename(ready + ".tmp", ready)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    while not stop.wait(3600):
        pass
    for server in servers:
        server.shutdown()
        server.server_close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, action="append", help="listen here (repeatable; IPv4 or IPv6)")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ready")
    args = parser.parse_args(argv)
    socket.setdefaulttimeout(None)
    serve(args.address, args.cert, args.key, args.ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
