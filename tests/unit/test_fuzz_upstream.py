"""Hostile device proxies: mutated HTTP CONNECT and SOCKS5 replies in random chunkings.

For every generated reply, fed to a real :class:`HTTPConnectClient`/:class:`Socks5Client`
on a ``StringTransport`` with a ``Clock``:

* ``dataReceived`` never raises;
* the handshake Deferred ends as success (the bytes after the reply) or an
  :class:`UpstreamError` subclass — never another exception type — and a failure resets
  the device connection;
* it never hangs: if the bytes run out mid-reply, the handshake timeout fails it with
  :class:`HandshakeTimeout`, and no timer is left behind;
* the parser's buffer is bounded: an endless status line, endless headers or an endless
  stream after a partial SOCKS5 reply fail by ``MAX_HEAD`` bytes plus one read.
"""

import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.python.failure import Failure

try:
    from twisted.internet.testing import StringTransport
except ImportError:  # Twisted 22.4
    from twisted.test.proto_helpers import StringTransport

from proxy.httpconnect import MAX_HEAD, MAX_STATUS_LINE
from proxy.upstream import HTTPConnectClient, Socks5Client, Upstream
from proxy.upstreamerrors import HandshakeTimeout, MalformedReply, UpstreamError

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TIMEOUT = 30

HTTP_REPLIES = [
    b"HTTP/1.1 200 Connection established\r\n\r\n",
    b"HTTP/1.0 200 OK\nProxy-Agent: tinyproxy/1.11\n\n",
    b"HTTP/1.1 200 OK\r\nVia: 1.1 a\r\n folded\r\nX: y\r\n\r\ntunnel-bytes",
    b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=x\r\n\r\n",
    b"HTTP/1.1 403 Forbidden\r\n\r\n",
    b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
]
_V6 = socket.inet_pton(socket.AF_INET6, "2001:db8::9")
SOCKS_REPLIES = [
    b"\x05\x02" + b"\x01\x00" + b"\x05\x00\x00\x01\xc0\x00\x02\x0b\x04\x38",
    b"\x05\x02" + b"\x01\x00" + b"\x05\x00\x00\x04" + _V6 + b"\x00\x16tail",
    b"\x05\x02" + b"\x01\x00" + b"\x05\x00\x00\x03\x0fproxy.example.n\x01\x00",
    b"\x05\x02" + b"\x01\x00" + b"\x05\x00\x00\x03\xff",
    b"\x05\x02" + b"\x01\x01",
    b"\x05\xff",
    b"\x05\x02" + b"\x01\x00" + b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00",
    b"\x05\x02" + b"\x01\x00" + b"\x05\x09\x00\x01",
]
URLS = {"http": "http://alice:s3cret@192.0.2.10:8080", "socks5": "socks5://bob:pw@192.0.2.11:1080"}


def _mutate(draw, data):
    data = bytearray(data)
    for _ in range(draw(st.integers(0, 5))):
        op = draw(st.sampled_from(["set", "insert", "delete", "dup", "truncate"]))
        pos = draw(st.integers(0, len(data)))
        if op == "set" and pos < len(data):
            data[pos] = draw(st.sampled_from([0, 1, 3, 4, 5, 0x0A, 0x0D, 0x20, 0x3A, 0x7F, 0xFF, draw(st.integers(0, 255))]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=6))
        elif op == "delete" and pos < len(data):
            del data[pos : pos + draw(st.integers(1, 6))]
        elif op == "dup":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 40))] * draw(st.integers(1, 5))
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


@st.composite
def replies(draw, scheme):
    base = draw(st.sampled_from(HTTP_REPLIES if scheme == "http" else SOCKS_REPLIES))
    return _mutate(draw, base) + draw(st.binary(max_size=20))


def _chunked(data, cuts):
    points = sorted({c % (len(data) + 1) for c in cuts}) if data else []
    out, last = [], 0
    for p in points + [len(data)]:
        if p > last:
            out.append(data[last:p])
            last = p
    return out


class _Transport(StringTransport):
    aborts = 0

    def abortConnection(self):
        self.aborts += 1
        super().abortConnection()


def _client(scheme):
    upstream = Upstream.parse(URLS[scheme])
    cls = HTTPConnectClient if scheme == "http" else Socks5Client
    clock = Clock()
    client = cls(clock, upstream, TIMEOUT)
    transport = _Transport()
    client.makeConnection(transport)
    return client, transport, clock


def _outcome(d):
    box = []
    d.addBoth(box.append)
    return box


def _buffered(client):
    parser = client._parser
    return len(parser._buf) if parser is not None else 0


def _run(scheme, data, cuts, host="example.com"):
    client, transport, clock = _client(scheme)
    box = _outcome(client.handshake(host, 443))
    for chunk in _chunked(data, cuts):
        client.dataReceived(chunk)
        assert _buffered(client) <= MAX_HEAD + len(chunk)
    if not box:
        clock.advance(TIMEOUT + 1)  # out of bytes mid-reply: the timeout must end it
        assert box and isinstance(box[0], Failure) and box[0].check(HandshakeTimeout), box
    assert len(box) == 1
    result = box[0]
    if isinstance(result, Failure):
        assert result.check(UpstreamError), result
        assert transport.aborts == 1
    else:
        assert isinstance(result, bytes)
        assert transport.aborts == 0
    assert clock.getDelayedCalls() == []
    return result


@FUZZ
@given(replies("http"), st.lists(st.integers(0, 400), max_size=30), st.sampled_from(["example.com", "192.0.2.99", "2001:db8::1"]))
def test_http_connect_mutated_replies(data, cuts, host):
    """Any mutated CONNECT reply in any chunking: bytes or a typed UpstreamError, never a hang."""
    _run("http", data, cuts, host)


@FUZZ
@given(replies("socks5"), st.lists(st.integers(0, 400), max_size=30), st.sampled_from(["example.com", "192.0.2.99", "2001:db8::1"]))
def test_socks5_mutated_replies(data, cuts, host):
    """Any mutated SOCKS5 exchange in any chunking: bytes or a typed UpstreamError, never a hang."""
    _run("socks5", data, cuts, host)


@FUZZ
@given(st.sampled_from(["http", "socks5"]), st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=20))
def test_random_bytes_as_replies(scheme, data, cuts):
    """Pure noise from the device proxy is handled like any malformed reply."""
    _run(scheme, data, cuts)


@FUZZ
@given(
    st.sampled_from(
        [
            b"HTTP/1.1 200 OK" + b"x" * 64,  # endless status line
            b"HTTP/1.1 200 OK\r\nX: " + b"y" * 64,  # endless header
            b"HTTP/1.1 200 OK\r\n" + b"H: v\r\n",  # endless stream of header lines (>MAX_HEADERS)
            b"HTTP/1.1 200 OK\r\n" + b" \r\n",  # endless obs-fold lines
        ]
    ),
    st.integers(1, 9000),
)
def test_http_endless_heads_fail_with_bounded_buffer(pattern, read_size):
    """A device that never ends its reply head fails as malformed after at most MAX_HEAD bytes + one read."""
    client, transport, clock = _client("http")
    box = _outcome(client.handshake("example.com", 443))
    head, unit = pattern[:17], pattern[17:]
    stream = head + unit * ((MAX_HEAD * 2) // len(unit) + 2)
    fed = 0
    while not box and fed < len(stream):
        client.dataReceived(stream[fed : fed + read_size])
        fed += read_size
        assert _buffered(client) <= MAX_HEAD + read_size
    assert box and box[0].check(MalformedReply), box
    assert fed <= MAX_HEAD + read_size + max(MAX_STATUS_LINE, 600)
    assert transport.aborts == 1 and clock.getDelayedCalls() == []


def test_socks5_domain_reply_longer_than_declared_is_leftover_not_buffered():
    """A SOCKS5 domain reply is taken by its length byte; 1 MiB after it is tunnel data, not parser state."""
    client, transport, clock = _client("socks5")
    box = _outcome(client.handshake("example.com", 443))
    client.dataReceived(b"\x05\x02\x01\x00\x05\x00\x00\x03\x03abc\x00\x50" + b"z" * (1 << 20))
    assert box == [b"z" * (1 << 20)]
    assert client._parser._buf == bytearray()
    assert clock.getDelayedCalls() == []


def test_silent_device_is_cut_by_the_handshake_timeout():
    """A device that accepts and then says nothing (slowloris upstream) fails with HandshakeTimeout."""
    for scheme in ("http", "socks5"):
        client, transport, clock = _client(scheme)
        box = _outcome(client.handshake("example.com", 443))
        clock.advance(TIMEOUT - 0.5)
        client.dataReceived(b"H" if scheme == "http" else b"\x05")
        assert not box
        clock.advance(1)
        assert box[0].check(HandshakeTimeout) and transport.aborts == 1
        assert clock.getDelayedCalls() == []
