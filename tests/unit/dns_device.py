"""A scripted device proxy for the DNS unit tests: :class:`Device` stands in for
``proxy.upstream.dial`` and each dial is a :class:`Link` the test drives (TCP up, tunnel
granted with the exact CONNECT or SOCKS5 bytes checked, 2-byte framed queries read, answers
written, the link dropped). The client side is the real HTTPConnectClient/Socks5Client.

Shared by ``test_dns_upstream.py`` and ``test_dns_server.py``. Helpers, not tests.
"""

import struct

from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from proxy.upstream import HTTPConnectClient, Socks5Client, Upstream
from tests.unit.dns_wire import make_reply
from tests.unit.proxy_world import Transport  # records aborts (RST)

HTTP_DEVICE = Upstream.parse("http://dev:s3cret@192.0.2.10:8080")
SOCKS_DEVICE = Upstream.parse("socks5://192.0.2.11:1080")


class Link:
    """One dial to the scripted device proxy, driven by the test."""

    def __init__(self, reactor, upstream, handshake_timeout):
        self.reactor = reactor
        self.upstream = upstream
        self.handshake_timeout = handshake_timeout
        self.d = defer.Deferred()
        self.client = None
        self.transport = Transport()

    def connect(self):
        """The TCP connection to the device proxy is up."""
        cls = HTTPConnectClient if self.upstream.scheme == "http" else Socks5Client
        self.client = cls(self.reactor, self.upstream, self.handshake_timeout)
        self.client.makeConnection(self.transport)
        self.d.callback(self.client)
        return self

    def accept(self):
        """The proxy grants the tunnel to 1.1.1.1:53 (checking the exact request bytes)."""
        if self.upstream.scheme == "http":
            assert self.transport.value().startswith(b"CONNECT 1.1.1.1:53 HTTP/1.1\r\nHost: 1.1.1.1:53\r\n")
            self.transport.clear()
            self.client.dataReceived(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            assert self.transport.value() == b"\x05\x01\x00"
            self.transport.clear()
            self.client.dataReceived(b"\x05\x00")
            assert self.transport.value() == b"\x05\x01\x00\x01\x01\x01\x01\x01\x00\x35"
            self.transport.clear()
            self.client.dataReceived(b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00")
        return self

    def up(self):
        return self.connect().accept()

    def queries(self):
        """Frames written since the last call, as (our ID, bytes)."""
        data, out = self.transport.value(), []
        self.transport.clear()
        while data:
            (size,) = struct.unpack_from("!H", data)
            frame, data = data[2 : 2 + size], data[2 + size :]
            assert len(frame) == size, "partial frame"
            out.append((struct.unpack_from("!H", frame)[0], frame))
        return out

    def answer(self, frame, **kw):
        """The resolver replies to ``frame`` (same ID and question)."""
        reply = make_reply(frame, **kw)
        self.client.dataReceived(struct.pack("!H", len(reply)) + reply)

    def drop(self):
        self.client.connectionLost(Failure(ConnectionLost("cellular went away")))


class Device:
    """A scripted ``proxy.upstream.dial``: each call makes a :class:`Link` the test drives."""

    def __init__(self):
        self.links = []

    def dial(self, reactor, upstream, connect_timeout, handshake_timeout):
        link = Link(reactor, upstream, handshake_timeout)
        self.links.append(link)
        return link.d
