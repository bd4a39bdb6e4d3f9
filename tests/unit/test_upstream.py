"""Device-proxy handshakes: exact request bytes, every refusal mapped to its type, no leaked secrets or timers."""

import base64
import socket

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IHalfCloseableProtocol, IHostnameResolver, IHostResolution
from twisted.internet.interfaces import IReactorPluggableNameResolver
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer

try:
    from twisted.internet.testing import MemoryReactorClock, StringTransport
except ImportError:  # Twisted 22.4
    from twisted.test.proto_helpers import MemoryReactorClock, StringTransport

from proxy.httpconnect import MAX_HEAD, MAX_HEADERS, MAX_STATUS_LINE
from proxy.upstream import HTTPConnectClient, Socks5Client, Upstream, dial
from proxy.upstreamerrors import (
    AuthRefused,
    Forbidden,
    HandshakeTimeout,
    MalformedReply,
    Unreachable,
    UpstreamClosed,
    UpstreamError,
)
from tests.unit.deferreds import failure_of, result_of

PASSWORD = "s3cret-Pa55"
HTTP_AUTH = "http://alice:%s@192.0.2.10:8080" % PASSWORD
TOKEN = base64.b64encode(("alice:" + PASSWORD).encode()).decode()
OK = b"HTTP/1.1 200 Connection established\r\n\r\n"


class Transport(StringTransport):
    """A StringTransport that counts writes and aborts."""

    def __init__(self):
        super().__init__()
        self.writes = 0
        self.aborts = 0

    def write(self, data):
        self.writes += 1
        super().write(data)

    def abortConnection(self):
        self.aborts += 1
        super().abortConnection()


class Leg:
    """A relay leg that records every event it gets."""

    def __init__(self):
        self.events = []

    def _record(self, *event):
        self.events.append(event)

    def dataReceived(self, data):
        self._record("data", data)

    def readConnectionLost(self):
        self._record("read-eof")

    def writeConnectionLost(self):
        self._record("write-eof")

    def connectionLost(self, reason):
        self._record("lost", reason.type)


def connected(url=HTTP_AUTH, timeout=30):
    """A client of the right class for ``url`` on a fresh Transport and Clock."""
    upstream = Upstream.parse(url)
    cls = HTTPConnectClient if upstream.scheme == "http" else Socks5Client
    clock = Clock()
    client = cls(clock, upstream, timeout)
    transport = Transport()
    client.makeConnection(transport)
    return client, transport, clock


def settled(client, transport, clock, aborted):
    """Common postconditions: no timer left, RST sent (or not)."""
    assert clock.getDelayedCalls() == []
    assert transport.aborts == (1 if aborted else 0)


def feed(client, data, step=None):
    """Deliver ``data`` in one piece or in chunks of ``step`` bytes."""
    step = step or len(data) or 1
    for i in range(0, len(data), step):
        client.dataReceived(data[i : i + step])


def tunnel_bytes(client, d):
    """``(leftover, leftover + data held for the leg)`` after a successful handshake."""
    leftover = result_of(d)
    leg = Leg()
    client.attach(leg)
    return leftover, leftover + b"".join(e[1] for e in leg.events if e[0] == "data")


def assert_no_secret(exc):
    """Neither the password nor the Basic token appears anywhere in the exception."""
    for text in (str(exc), repr(exc), repr(exc.args)):
        assert PASSWORD not in text and TOKEN not in text


# --- HTTP CONNECT: request bytes ---------------------------------------------------------------


def test_http_request_exact_bytes_with_basic_auth_in_one_write():
    """CONNECT, matching Host and pre-sent Basic credentials go out in exactly one write."""
    client, transport, clock = connected()
    d = client.handshake("example.com", 443)
    assert transport.value() == (
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n"
        b"Proxy-Authorization: Basic YWxpY2U6czNjcmV0LVBhNTU=\r\n\r\n"
    )
    assert transport.writes == 1
    assert TOKEN == "YWxpY2U6czNjcmV0LVBhNTU="
    assert len(clock.getDelayedCalls()) == 1
    d.cancel()


def test_http_request_without_credentials_and_ip_authorities():
    """No credentials → no Proxy-Authorization; IPv6 destinations are bracketed, IPv4 bare."""
    for host, authority in [("2001:db8::1", b"[2001:db8::1]:443"), ("192.0.2.7", b"192.0.2.7:80")]:
        client, transport, clock = connected("http://192.0.2.10:3128")
        client.handshake(host, int(authority.rsplit(b":", 1)[1]))
        assert transport.value() == b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority, authority)


def test_http_basic_credentials_are_utf8_and_may_contain_colons_in_the_password():
    """RFC 7617: user-pass is UTF-8; only the first colon separates user and password."""
    client, transport, clock = connected("http://j%C3%BCrgen:a%3Ab@192.0.2.10:8080")
    client.handshake("example.com", 443)
    token = base64.b64encode("jürgen:a:b".encode("utf-8"))
    assert b"Proxy-Authorization: Basic " + token + b"\r\n" in transport.value()


# --- HTTP CONNECT: replies ---------------------------------------------------------------------


def test_http_2xx_fires_with_the_bytes_after_the_head():
    """A 200 head ends at the blank line; what follows belongs to the tunnel."""
    client, transport, clock = connected()
    d = client.handshake("example.com", 443)
    client.dataReceived(b"HTTP/1.1 200 Connection established\r\nProxy-Agent: x/1\r\n\r\nSSH-2.0-banner\r\n")
    assert result_of(d) == b"SSH-2.0-banner\r\n"
    settled(client, transport, clock, aborted=False)


@pytest.mark.parametrize("step", [1, 2, 7])
def test_http_2xx_split_with_lf_line_ends_and_http10(step):
    """A reply split anywhere, with bare LF, HTTP/1.0, an empty reason and no leftover, still succeeds."""
    client, transport, clock = connected()
    d = client.handshake("example.com", 443)
    feed(client, b"HTTP/1.0 204 \nVia: 1.1 phone\nX-Folded: a\n  b\n\n", step)
    assert result_of(d) == b""
    settled(client, transport, clock, aborted=False)


def test_http_2xx_without_reason_phrase_and_content_length_ignored():
    """RFC 9110: a 2xx CONNECT reply's Content-Length is ignored; a missing reason is tolerated."""
    client, transport, clock = connected()
    d = client.handshake("example.com", 443)
    client.dataReceived(b"HTTP/1.1 200\r\nContent-Length: 5\r\n\r\nabc")
    assert result_of(d) == b"abc"


@pytest.mark.parametrize(
    "status,cls",
    [
        (b"407 Proxy Authentication Required", AuthRefused),
        (b"403 Forbidden", Forbidden),
        (b"404 Not Found", Forbidden),
        (b"400 Bad Request", Forbidden),
        (b"500 Internal Server Error", Unreachable),
        (b"502 Bad Gateway", Unreachable),
        (b"503 Service Unavailable", Unreachable),
        (b"504 Gateway Timeout", Unreachable),
        (b"301 Moved Permanently", MalformedReply),
        (b"100 Continue", MalformedReply),
        (b"600 Odd", MalformedReply),
    ],
)
def test_http_non_2xx_status_maps_to_type_and_resets(status, cls):
    """Each status class maps to its error type at the status line; the body is never read."""
    client, transport, clock = connected()
    d = client.handshake("example.com", 443)
    client.dataReceived(b"HTTP/1.1 " + status + b"\r\nContent-Length: 3\r\n")
    exc = failure_of(d, cls).value
    assert type(exc) is cls
    assert status.decode() + " to CONNECT example.com:443" in str(exc)
    settled(client, transport, clock, aborted=True)
    client.dataReceived(b"\r\nabc")  # ignored: no second firing, no leg
    client.connectionLost(Failure(ConnectionLost()))


def test_http_407_message_is_useful_and_has_no_secrets():
    """The 407 message names proxy, status and destination, and says credentials were sent."""
    client, transport, clock = connected()
    d = client.handshake("example.com", 443)
    client.dataReceived(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
    exc = failure_of(d, AuthRefused).value
    assert str(exc) == (
        "device proxy http://192.0.2.10:8080 answered 407 Proxy Authentication Required"
        " to CONNECT example.com:443 (credentials were sent)"
    )
    assert exc.kind == "auth"
    assert_no_secret(exc)


def test_http_407_without_credentials_says_so():
    """A 407 when no credentials are configured points at the missing configuration."""
    client, transport, clock = connected("http://192.0.2.10:8080")
    d = client.handshake("198.51.100.1", 443)
    client.dataReceived(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
    assert str(failure_of(d, AuthRefused).value).endswith("to CONNECT 198.51.100.1:443 (no credentials configured)")


def test_http_echoed_secrets_are_scrubbed_from_messages():
    """A proxy echoing the password or the Basic token in its reply cannot leak them into a message."""
    for reply in [
        b"HTTP/1.1 403 bad Basic " + TOKEN.encode() + b"\r\n",
        b"HTTP/1.1 407 user alice:" + PASSWORD.encode() + b"\r\n",
        b"Proxy-Authorization: Basic " + TOKEN.encode() + b"\r\n",
        b"HTTP/1.1 200 OK\r\nbad header " + PASSWORD.encode() + b"\r\n",
    ]:
        client, transport, clock = connected()
        d = client.handshake("example.com", 443)
        client.dataReceived(reply)
        exc = failure_of(d, UpstreamError).value
        assert "***" in str(exc)
        assert_no_secret(exc)


@pytest.mark.parametrize(
    "reply",
    [
        b"garbage\r\n",
        b"\r\n",
        b"HTTP/2 200 OK\r\n",
        b"HTTP/1.1 2000 OK\r\n",
        b"HTTP/1.1  200 OK\r\n",
        b"http/1.1 200 OK\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"\x05\x00",  # a SOCKS5 answer followed by a line end
    ],
)
def test_http_malformed_status_line(reply):
    """Anything that is not ``HTTP/1.x SP 3DIGIT [SP reason]`` is a MalformedReply."""
    client, transport, clock = connected()
    d = client.handshake("example.com", 443)
    client.dataReceived(reply + b"\n")
    exc = failure_of(d, MalformedReply).value
    assert "sent a malformed reply to CONNECT example.com:443: status line" in str(exc)
    settled(client, transport, clock, aborted=True)


def test_http_malformed_header_line():
    """A header line without a name and colon after a 200 is a MalformedReply."""
    client, transport, clock = connected()
    d = client.handshake("example.com", 443)
    client.dataReceived(b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n")
    assert "header line 'no colon here'" in str(failure_of(d, MalformedReply).value)


def test_http_status_line_limit():
    """A status line of exactly MAX_STATUS_LINE bytes passes; one byte more fails without waiting for LF."""
    head = b"HTTP/1.1 200 "
    client, transport, clock = connected()
    d = client.handshake("example.com", 443)
    client.dataReceived(head + b"x" * (MAX_STATUS_LINE - len(head) - 2) + b"\r\n\r\n")
    assert result_of(d) == b""

    client, transport, clock = connected()
    d = client.handshake("example.com", 443)
    client.dataReceived(head + b"x" * (MAX_STATUS_LINE - len(head)))
    assert "status line exceeds 4096 bytes" in str(failure_of(d, MalformedReply).value)
    settled(client, transport, clock, aborted=True)

    client, transport, clock = connected()
    d = client.handshake("example.com", 443)
    client.dataReceived(head + b"x" * (MAX_STATUS_LINE - len(head) - 1) + b"\r\n\r\n")  # complete, 4097 bytes
    assert "status line exceeds 4096 bytes" in str(failure_of(d, MalformedReply).value)


def test_http_head_size_limit():
    """A head of exactly MAX_HEAD bytes passes; a longer one fails, split or not, with or without line ends."""
    status = b"HTTP/1.1 200 OK\r\n"
    body = MAX_HEAD - len(status) - 2
    lines = [b"h: " + b"v" * 195 + b"\r\n"] * (body // 200)
    lines.append(b"h: " + b"v" * (body - 200 * len(lines) - 5) + b"\r\n")
    head = status + b"".join(lines) + b"\r\n"
    assert len(head) == MAX_HEAD and len(lines) <= MAX_HEADERS
    client, transport, clock = connected()
    d = client.handshake("example.com", 443)
    feed(client, head + b"tail", 1000)
    assert result_of(d) == b"tail"

    big = head[:-2] + b"h: x\r\n\r\n"  # 6 bytes more than the limit
    for step in (None, 1):
        client, transport, clock = connected()
        d = client.handshake("example.com", 443)
        feed(client, big, step)
        assert "reply head exceeds 16384 bytes" in str(failure_of(d, MalformedReply).value)
        settled(client, transport, clock, aborted=True)

    client, transport, clock = connected()
    d = client.handshake("example.com", 443)
    client.dataReceived(status + b"h: " + b"v" * MAX_HEAD)  # no line end at all
    failure_of(d, MalformedReply)


def test_http_header_count_limit():
    """MAX_HEADERS header lines pass; one more is a MalformedReply."""
    ok = b"HTTP/1.1 200 OK\r\n" + b"a: b\r\n" * MAX_HEADERS + b"\r\n"
    client, transport, clock = connected()
    d = client.handshake("example.com", 443)
    client.dataReceived(ok)
    assert result_of(d) == b""

    client, transport, clock = connected()
    d = client.handshake("example.com", 443)
    client.dataReceived(b"HTTP/1.1 200 OK\r\n" + b"a: b\r\n" * (MAX_HEADERS + 1))
    assert "more than 100 header lines" in str(failure_of(d, MalformedReply).value)
    settled(client, transport, clock, aborted=True)


# --- closes, timeouts, cancellation (shared base class, exercised via HTTP and SOCKS) ----------


def test_premature_fin_during_handshake_is_upstream_closed():
    """A FIN in the middle of the head fails with UpstreamClosed and resets the connection."""
    client, transport, clock = connected()
    d = client.handshake("example.com", 443)
    client.dataReceived(b"HTTP/1.1 200 OK\r\n")
    client.readConnectionLost()
    exc = failure_of(d, UpstreamClosed).value
    assert str(exc) == (
        "device proxy http://192.0.2.10:8080 closed the connection before replying to CONNECT example.com:443"
    )
    assert exc.kind == "closed"
    settled(client, transport, clock, aborted=True)


@pytest.mark.parametrize("reason,how", [(ConnectionDone, "closed"), (ConnectionLost, "reset")])
def test_connection_lost_during_handshake(reason, how):
    """connectionLost mid-handshake fails with UpstreamClosed; no abort of a gone transport."""
    client, transport, clock = connected("socks5://192.0.2.11")
    d = client.handshake("example.com", 443)
    client.dataReceived(b"\x05")
    client.connectionLost(Failure(reason()))
    assert "%s the connection before replying" % how in str(failure_of(d, UpstreamClosed).value)
    settled(client, transport, clock, aborted=False)


def test_handshake_after_connection_lost_fails_at_once():
    """A connection that died before handshake() fails immediately, without writing."""
    client, transport, clock = connected()
    client.connectionLost(Failure(ConnectionLost()))
    d = client.handshake("example.com", 443)
    assert "reset the connection before the handshake" in str(failure_of(d, UpstreamClosed).value)
    assert transport.value() == b""
    settled(client, transport, clock, aborted=False)


def test_fin_before_handshake_resets_and_fails_handshake():
    """A FIN before handshake() resets the half-open connection; handshake() then fails at once."""
    client, transport, clock = connected()
    client.readConnectionLost()
    assert transport.aborts == 1
    d = client.handshake("example.com", 443)
    failure_of(d, UpstreamClosed)
    assert transport.value() == b"" and transport.aborts == 1


def test_unsolicited_bytes_before_handshake_are_malformed():
    """A proxy that talks first is not a CONNECT/SOCKS5 proxy."""
    client, transport, clock = connected()
    client.dataReceived(b"220 smtp ready\r\n")
    d = client.handshake("example.com", 443)
    assert "sent 16 bytes before the request" in str(failure_of(d, MalformedReply).value)
    assert transport.value() == b""
    settled(client, transport, clock, aborted=True)


@pytest.mark.parametrize("url", [HTTP_AUTH, "socks5://bob:%s@192.0.2.11" % PASSWORD])
def test_handshake_timeout(url):
    """No complete reply within the timeout → HandshakeTimeout, RST, no timer left; late bytes ignored."""
    client, transport, clock = connected(url, timeout=30)
    d = client.handshake("example.com", 443)
    client.dataReceived(b"\x05" if "socks" in url else b"HTTP/1.1 200 OK\r\n")
    clock.advance(29.9)
    assert not d.called
    clock.advance(0.1)
    exc = failure_of(d, HandshakeTimeout).value
    assert "sent no complete reply to CONNECT example.com:443 within 30s" in str(exc)
    assert exc.kind == "timeout"
    assert_no_secret(exc)
    settled(client, transport, clock, aborted=True)
    client.dataReceived(b"\x02\r\n\r\n")
    client.connectionLost(Failure(ConnectionLost()))


def test_cancel_and_abort_during_handshake():
    """Cancelling the handshake, or abort(), resets once, stops the timer and fails with CancelledError."""
    for stop in (lambda c, d: d.cancel(), lambda c, d: c.abort()):
        client, transport, clock = connected()
        d = client.handshake("example.com", 443)
        stop(client, d)
        failure_of(d, defer.CancelledError)
        client.abort()
        client.connectionLost(Failure(ConnectionLost()))
        settled(client, transport, clock, aborted=True)


def test_abort_is_idempotent_and_safe_any_time():
    """abort() before connect, before handshake, twice, and after the connection is gone."""
    bare = HTTPConnectClient(Clock(), Upstream.parse(HTTP_AUTH), 30)
    bare.abort()
    client, transport, clock = connected()
    client.abort()
    client.abort()
    assert transport.aborts == 1
    client, transport, clock = connected()
    client.connectionLost(Failure(ConnectionDone()))
    client.abort()
    assert transport.aborts == 0


@pytest.mark.parametrize(
    "host,port,why",
    [
        ("exa mple.com", 443, "neither a hostname nor an IP address"),
        ("evil.com\r\nX-Injected: 1", 443, "neither a hostname nor an IP address"),
        ("example.com", 0, "invalid destination port 0"),
        ("example.com", 65536, "invalid destination port 65536"),
        ("example.com", True, "invalid destination port True"),
        ("", 443, "invalid destination host"),
        ("fe80::1%eth0", 443, "neither a hostname nor an IP address"),
        ("a" * 256, 443, "neither a hostname nor an IP address"),
    ],
)
def test_invalid_destination_is_refused_before_sending(host, port, why):
    """Destinations that cannot be expressed safely fail with a plain UpstreamError and nothing is sent."""
    client, transport, clock = connected()
    d = client.handshake(host, port)
    exc = failure_of(d, UpstreamError).value
    assert type(exc) is UpstreamError and exc.kind == "error"
    assert why in str(exc) and "\r" not in str(exc) and "\n" not in str(exc)
    assert transport.value() == b""
    settled(client, transport, clock, aborted=True)


def test_idna_destination_and_bracketed_ipv6_are_accepted():
    """A U-label is sent as its A-label; a bracketed IPv6 literal is accepted too."""
    client, transport, clock = connected("http://192.0.2.10:8080")
    client.handshake("bücher.example", 443)
    assert transport.value().startswith(b"CONNECT xn--bcher-kva.example:443 HTTP/1.1\r\n")
    client, transport, clock = connected("http://192.0.2.10:8080")
    client.handshake("[2001:DB8::1]", 443)
    assert transport.value().startswith(b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\n")


def test_colon_in_http_username_is_refused():
    """Basic auth cannot carry a username with ':'; nothing is sent and the password stays out."""
    client, transport, clock = connected("http://a%%3Ab:%s@192.0.2.10:8080" % PASSWORD)
    d = client.handshake("example.com", 443)
    exc = failure_of(d, UpstreamError).value
    assert "username contains ':'" in str(exc)
    assert_no_secret(exc)
    assert transport.value() == b""


def test_handshake_twice_is_a_programming_error():
    """handshake() is one-shot per connection."""
    client, transport, clock = connected()
    d = client.handshake("example.com", 443)
    with pytest.raises(RuntimeError):
        client.handshake("example.com", 443)
    d.cancel()
    failure_of(d, defer.CancelledError)


# --- attach ------------------------------------------------------------------------------------


def test_attach_replays_held_events_in_order_then_forwards():
    """Events between success and attach() are replayed in order; later ones go straight to the leg."""
    client, transport, clock = connected()
    assert IHalfCloseableProtocol.providedBy(client)
    d = client.handshake("example.com", 443)
    client.dataReceived(OK + b"first")
    assert result_of(d) == b"first"
    client.dataReceived(b"second")
    client.dataReceived(b"third")
    client.readConnectionLost()
    client.writeConnectionLost()
    client.connectionLost(Failure(ConnectionDone()))
    leg = Leg()
    client.attach(leg)
    assert leg.events == [
        ("data", b"second"),
        ("data", b"third"),
        ("read-eof",),
        ("write-eof",),
        ("lost", ConnectionDone),
    ]
    settled(client, transport, clock, aborted=False)


def test_attach_in_callback_then_live_forwarding_and_abort():
    """Attaching from the success callback forwards later events directly; abort() then RSTs once."""
    client, transport, clock = connected("socks5://192.0.2.11")
    d = client.handshake("example.com", 443)
    leg = Leg()
    d.addCallback(lambda leftover: client.attach(leg) or leftover)
    client.dataReceived(b"\x05\x00")
    client.dataReceived(b"\x05\x00\x00\x01\xc0\x00\x02\x0b\x04\x38" + b"early")
    assert result_of(d) == b"early"
    client.dataReceived(b"late")
    client.readConnectionLost()
    assert leg.events == [("data", b"late"), ("read-eof",)]
    client.abort()
    client.abort()
    client.connectionLost(Failure(ConnectionLost()))
    assert leg.events[-1] == ("lost", ConnectionLost)
    settled(client, transport, clock, aborted=True)


def test_attach_misuse_raises():
    """attach() before success, after failure, or twice is a programming error."""
    client, transport, clock = connected()
    with pytest.raises(RuntimeError):
        client.attach(Leg())
    d = client.handshake("example.com", 443)
    with pytest.raises(RuntimeError):
        client.attach(Leg())
    client.dataReceived(OK)
    result_of(d)
    client.attach(Leg())
    with pytest.raises(RuntimeError):
        client.attach(Leg())
    client, transport, clock = connected()
    d = client.handshake("example.com", 443)
    client.dataReceived(b"HTTP/1.1 403 Forbidden\r\n")
    failure_of(d, Forbidden)
    with pytest.raises(RuntimeError):
        client.attach(Leg())


# --- SOCKS5 ------------------------------------------------------------------------------------

SOCKS_AUTH = "socks5://bob:%s@192.0.2.11:1080" % PASSWORD
DOMAIN_REQUEST = b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"
REPLY_V4 = b"\x05\x00\x00\x01\xc0\x00\x02\x0b\x04\x38"  # BND 192.0.2.11:1080


def test_socks_no_auth_exact_bytes():
    """Without credentials: greeting offers only 0x00, then the ATYP 3 CONNECT request."""
    client, transport, clock = connected("socks5://192.0.2.11")
    d = client.handshake("example.com", 443)
    assert transport.value() == b"\x05\x01\x00"
    transport.clear()
    client.dataReceived(b"\x05\x00")
    assert transport.value() == DOMAIN_REQUEST
    client.dataReceived(REPLY_V4)
    assert result_of(d) == b""
    assert client.bound == ("192.0.2.11", 1080)
    assert transport.writes == 2
    settled(client, transport, clock, aborted=False)


def test_socks_user_pass_exact_bytes():
    """With credentials: greeting offers only 0x02, then RFC 1929 auth, then the request."""
    client, transport, clock = connected(SOCKS_AUTH)
    d = client.handshake("example.com", 443)
    assert transport.value() == b"\x05\x01\x02"
    transport.clear()
    client.dataReceived(b"\x05\x02")
    assert transport.value() == b"\x01\x03bob\x0b" + PASSWORD.encode()
    transport.clear()
    client.dataReceived(b"\x01\x00")
    assert transport.value() == DOMAIN_REQUEST
    client.dataReceived(REPLY_V4 + b"leftover")
    assert result_of(d) == b"leftover"
    settled(client, transport, clock, aborted=False)


@pytest.mark.parametrize(
    "host,port,request_bytes",
    [
        ("192.0.2.44", 80, b"\x05\x01\x00\x01\xc0\x00\x02\x2c\x00\x50"),
        ("2001:db8::5", 8443, b"\x05\x01\x00\x04" + socket.inet_pton(socket.AF_INET6, "2001:db8::5") + b"\x20\xfb"),
        ("a.b", 65535, b"\x05\x01\x00\x03\x03a.b\xff\xff"),
    ],
)
def test_socks_request_address_types(host, port, request_bytes):
    """IPv4 → ATYP 1, IPv6 → ATYP 4, names → ATYP 3, port big-endian."""
    client, transport, clock = connected("socks5://192.0.2.11")
    client.handshake(host, port)
    client.dataReceived(b"\x05\x00")
    assert transport.value() == b"\x05\x01\x00" + request_bytes


REPLIES = [
    (REPLY_V4, ("192.0.2.11", 1080)),
    (b"\x05\x00\x00\x04" + socket.inet_pton(socket.AF_INET6, "2001:db8::9") + b"\x00\x16", ("2001:db8::9", 22)),
    (b"\x05\x00\x00\x03\x0fproxy.example.n\x01\x00", ("proxy.example.n", 256)),
    (b"\x05\x00\x00\x03\x00\x00\x00", ("", 0)),
]


@pytest.mark.parametrize("reply,bound", REPLIES)
@pytest.mark.parametrize("step", [None, 1])
def test_socks_reply_address_types_byte_by_byte(reply, bound, step):
    """BND.ADDR of each ATYP is parsed to its exact length, whole or byte by byte; leftover is kept."""
    client, transport, clock = connected(SOCKS_AUTH)
    d = client.handshake("example.com", 443)
    feed(client, b"\x05\x02\x01\x00" + reply + b"\x00tail\x05", step)
    leftover, tunnel = tunnel_bytes(client, d)
    assert tunnel == b"\x00tail\x05"
    assert leftover == (b"" if step == 1 else b"\x00tail\x05")  # byte by byte, the reply ends a chunk
    assert client.bound == bound
    settled(client, transport, clock, aborted=False)


@given(st.sampled_from(REPLIES), st.lists(st.integers(min_value=1, max_value=40), min_size=1), st.binary(max_size=20))
def test_socks_any_split_gives_same_result(reply_bound, cuts, tail):
    """However the server's bytes are split, the result and BND are the same."""
    reply, bound = reply_bound
    client, transport, clock = connected(SOCKS_AUTH)
    d = client.handshake("example.com", 443)
    data, i = b"\x05\x02\x01\x00" + reply + tail, 0
    for cut in cuts * (len(data) // len(cuts) + 1):
        if i >= len(data):
            break
        client.dataReceived(data[i : i + cut])
        i += cut
    assert tunnel_bytes(client, d)[1] == tail and client.bound == bound


@given(st.lists(st.integers(min_value=1, max_value=50), min_size=1), st.binary(max_size=20))
def test_http_any_split_gives_same_result(cuts, tail):
    """However a 200 head is split, the leftover is exactly what followed it."""
    client, transport, clock = connected()
    d = client.handshake("example.com", 443)
    data, i = b"HTTP/1.1 200 OK\r\nVia: x\nA: b\r\n\r\n" + tail, 0
    for cut in cuts * (len(data) // len(cuts) + 1):
        if i >= len(data):
            break
        client.dataReceived(data[i : i + cut])
        i += cut
    assert tunnel_bytes(client, d)[1] == tail


def test_socks_method_refused():
    """Method 0xFF (no acceptable method) is AuthRefused, for both offers."""
    for url, offered in [(SOCKS_AUTH, "username/password"), ("socks5://192.0.2.11", "no authentication")]:
        client, transport, clock = connected(url)
        d = client.handshake("example.com", 443)
        client.dataReceived(b"\x05\xff")
        exc = failure_of(d, AuthRefused).value
        assert str(exc) == (
            "device proxy socks5://192.0.2.11:1080 accepts none of the offered SOCKS5 methods (offered %s)" % offered
        )
        assert_no_secret(exc)
        settled(client, transport, clock, aborted=True)


def test_socks_method_not_offered_is_malformed():
    """A method we did not offer (0x00 when we offered 0x02, or GSSAPI) is a MalformedReply."""
    for url, method in [(SOCKS_AUTH, b"\x00"), ("socks5://192.0.2.11", b"\x02"), ("socks5://192.0.2.11", b"\x01")]:
        client, transport, clock = connected(url)
        d = client.handshake("example.com", 443)
        client.dataReceived(b"\x05" + method)
        assert "which was not offered" in str(failure_of(d, MalformedReply).value)
        assert transport.value() == b"\x05\x01" + (b"\x02" if "bob" in url else b"\x00")


def test_socks_auth_failure():
    """A nonzero RFC 1929 status is AuthRefused; the message carries neither username bytes nor password."""
    client, transport, clock = connected(SOCKS_AUTH)
    d = client.handshake("example.com", 443)
    client.dataReceived(b"\x05\x02\x01\x01")
    exc = failure_of(d, AuthRefused).value
    assert str(exc) == "device proxy socks5://192.0.2.11:1080 rejected the SOCKS5 username/password (RFC 1929 status 1)"
    assert_no_secret(exc)
    settled(client, transport, clock, aborted=True)


@pytest.mark.parametrize(
    "rep,cls,text",
    [
        (1, Unreachable, "general SOCKS server failure"),
        (2, Forbidden, "connection not allowed by ruleset"),
        (3, Unreachable, "network unreachable"),
        (4, Unreachable, "host unreachable"),
        (5, Unreachable, "connection refused"),
        (6, Unreachable, "TTL expired"),
        (7, MalformedReply, "command not supported"),
        (8, MalformedReply, "address type not supported"),
        (9, MalformedReply, "unknown reply code"),
        (255, MalformedReply, "unknown reply code"),
    ],
)
def test_socks_reply_codes(rep, cls, text):
    """Each REP code maps to its type as soon as it arrives; the rest of the reply is not awaited."""
    client, transport, clock = connected("socks5://192.0.2.11")
    d = client.handshake("example.com", 443)
    client.dataReceived(b"\x05\x00\x05" + bytes([rep]))
    exc = failure_of(d, cls).value
    assert type(exc) is cls
    prefix = "device proxy socks5://192.0.2.11:1080 refused CONNECT example.com:443"
    assert str(exc) == "%s: %s (SOCKS5 reply %d)" % (prefix, text, rep)
    settled(client, transport, clock, aborted=True)


@pytest.mark.parametrize(
    "server,why",
    [
        (b"\x04", "sent SOCKS5 method selection with version 4 (expected 5)"),
        (b"HTTP/1.1 400 Bad Request\r\n", "sent SOCKS5 method selection with version 72 (expected 5)"),
        (b"\x05\x02\x05\x00", "sent SOCKS5 username/password reply with version 5 (expected 1)"),
        (b"\x05\x02\x01\x00\x04\x00", "sent SOCKS5 reply with version 4 (expected 5)"),
        (b"\x05\x02\x01\x00\x05\x00\x00\x02\x00", "sent SOCKS5 reply with unknown address type 2"),
    ],
)
def test_socks_bad_versions_and_atyp(server, why):
    """Wrong version bytes (checked as soon as they arrive) and unknown ATYPs are MalformedReply."""
    client, transport, clock = connected(SOCKS_AUTH)
    d = client.handshake("example.com", 443)
    client.dataReceived(server)
    exc = failure_of(d, MalformedReply).value
    assert str(exc) == "device proxy socks5://192.0.2.11:1080 " + why
    settled(client, transport, clock, aborted=True)


def test_socks_credential_length_limits():
    """255-byte username/password fit RFC 1929; 256 bytes fail locally before anything is sent."""
    client, transport, clock = connected("socks5://%s:%s@192.0.2.11" % ("u" * 255, "p" * 255))
    d = client.handshake("example.com", 443)
    client.dataReceived(b"\x05\x02")
    assert transport.value() == b"\x05\x01\x02" + b"\x01\xff" + b"u" * 255 + b"\xff" + b"p" * 255
    d.cancel()
    for user, password in [("u" * 256, "p"), ("u", "p" * 256), ("ü" * 128, "p")]:
        client, transport, clock = connected("socks5://%s:%s@192.0.2.11" % (user, password))
        d = client.handshake("example.com", 443)
        exc = failure_of(d, UpstreamError).value
        assert type(exc) is UpstreamError and "limited to 255 bytes" in str(exc)
        assert "p" * 256 not in str(exc)
        assert transport.value() == b""
        settled(client, transport, clock, aborted=True)


# --- dial --------------------------------------------------------------------------------------


@implementer(IHostResolution)
class _Resolution:
    """The handle FakeResolver returns."""

    def __init__(self, name):
        self.name = name

    def cancel(self):
        """IHostResolution.cancel"""


@implementer(IHostnameResolver)
class FakeResolver:
    """Resolves every name to ``addresses`` (possibly none) synchronously."""

    def __init__(self, addresses):
        self.addresses = addresses
        self.names = []

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        """IHostnameResolver.resolveHostName"""
        self.names.append(hostName)
        resolution = _Resolution(hostName)
        receiver.resolutionBegan(resolution)
        for address in self.addresses:
            receiver.addressResolved(IPv4Address("TCP", address, portNumber))
        receiver.resolutionComplete()
        return resolution


def resolving_reactor(addresses):
    """A MemoryReactorClock with a pluggable, fake name resolver (22.4's has none)."""
    reactor = MemoryReactorClock()
    if not IReactorPluggableNameResolver.providedBy(reactor):
        alsoProvides(reactor, IReactorPluggableNameResolver)
    reactor.nameResolver = FakeResolver(addresses)
    return reactor


def test_dial_ip_literals_connect_directly_and_fire_with_client():
    """IPv4/IPv6 literals connect directly (connectTCP, no endpoint wrapper) under one connect-timeout
    timer; the right client class comes back."""
    for url, host, cls in [
        ("http://u:p@192.0.2.10:8080", "192.0.2.10", HTTPConnectClient),
        ("socks5://[2001:db8::1]:1080", "2001:db8::1", Socks5Client),
    ]:
        reactor = MemoryReactorClock()
        upstream = Upstream.parse(url)
        d = dial(reactor, upstream, 7, 11)
        assert not d.called
        (entry,) = reactor.tcpClients
        assert (entry[0], entry[1], entry[3]) == (host, upstream.port, None)  # our own timer, not the connector's
        assert [c.getTime() for c in reactor.getDelayedCalls()] == [7]
        protocol = entry[2].buildProtocol(None)
        protocol.makeConnection(Transport())
        client = result_of(d)
        assert type(client) is cls and client.upstream is upstream
        assert reactor.getDelayedCalls() == []


def test_dial_then_handshake_uses_the_reactor_clock():
    """The handshake timeout given to dial runs on the same reactor."""
    reactor = MemoryReactorClock()
    d = dial(reactor, Upstream.parse(HTTP_AUTH), 7, 11)
    transport = Transport()
    reactor.tcpClients[0][2].buildProtocol(None).makeConnection(transport)
    hd = result_of(d).handshake("example.com", 443)
    reactor.advance(11)
    assert "within 11s" in str(failure_of(hd, HandshakeTimeout).value)
    assert reactor.getDelayedCalls() == [] and transport.aborts == 1


def test_dial_connect_failure_is_unreachable():
    """A refused TCP connect (via the factory's clientConnectionFailed) fails with Unreachable."""
    reactor = MemoryReactorClock()
    d = dial(reactor, Upstream.parse(HTTP_AUTH), 7, 11)
    reactor.tcpClients[0][2].clientConnectionFailed(reactor.connectors[0], Failure(ConnectionRefusedError()))
    exc = failure_of(d, Unreachable).value
    assert str(exc).startswith("device proxy http://192.0.2.10:8080 is unreachable: Connection was refused")
    assert exc.kind == "unreachable"
    assert_no_secret(exc)
    assert reactor.getDelayedCalls() == []


def test_dial_connect_timeout_is_unreachable_and_stops_connecting():
    """No connection within connect_timeout → Unreachable, and the connect attempt is stopped."""
    reactor = MemoryReactorClock()
    d = dial(reactor, Upstream.parse(HTTP_AUTH), 7, 11)
    reactor.advance(6.9)
    assert not d.called
    reactor.advance(0.1)
    assert str(failure_of(d, Unreachable).value) == (
        "device proxy http://192.0.2.10:8080 is unreachable: no connection within 7s"
    )
    assert reactor.connectors[0].stoppedConnecting
    assert reactor.getDelayedCalls() == []


def test_dial_cancel_aborts_the_attempt():
    """Cancelling the dial stops connecting and fails with CancelledError, leaving no timer."""
    reactor = MemoryReactorClock()
    d = dial(reactor, Upstream.parse(HTTP_AUTH), 7, 11)
    d.cancel()
    failure_of(d, defer.CancelledError)
    assert reactor.connectors[0].stoppedConnecting
    assert reactor.getDelayedCalls() == []


def test_dial_hostname_resolves_through_the_reactor():
    """A hostname goes through the reactor's resolver (HostnameEndpoint), then connects to the address."""
    reactor = resolving_reactor(["198.51.100.7"])
    d = dial(reactor, Upstream.parse("socks5://phone.example:1080"), 7, 11)
    reactor.advance(0)
    assert reactor.nameResolver.names == ["phone.example"]
    (entry,) = reactor.tcpClients
    assert (entry[0], entry[1]) == ("198.51.100.7", 1080)
    entry[2].buildProtocol(None).makeConnection(Transport())
    assert type(result_of(d)) is Socks5Client
    assert reactor.getDelayedCalls() == []


def test_dial_dns_failure_is_unreachable():
    """A name without addresses fails with Unreachable naming the proxy."""
    reactor = resolving_reactor([])
    d = dial(reactor, Upstream.parse("http://phone.example:8080"), 7, 11)
    reactor.advance(0)
    exc = failure_of(d, Unreachable).value
    assert str(exc).startswith("device proxy http://phone.example:8080 is unreachable: ")
    assert reactor.tcpClients == [] and reactor.getDelayedCalls() == []


def test_dial_unknown_scheme_is_a_value_error():
    """Only http and socks5 can be dialed."""
    with pytest.raises(ValueError):
        dial(MemoryReactorClock(), Upstream("ftp", "192.0.2.1", 21), 7, 11)


# --- real peers on loopback --------------------------------------------------------------------


class FakeConnectServer(Protocol):
    """Reads one CONNECT head, answers 200 plus a banner in one write."""

    def connectionMade(self):
        self.buf = b""
        self.factory.conns.append(self)
        self.gone = defer.Deferred()

    def dataReceived(self, data):
        self.buf += data
        if b"\r\n\r\n" in self.buf and not self.factory.requests:
            self.factory.requests.append(self.buf)
            self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\nBANNER")

    def connectionLost(self, reason):
        self.gone.callback(None)


class FakeSocksServer(Protocol):
    """Walks through greeting, RFC 1929 auth and CONNECT, replies, sends a banner and half-closes."""

    def connectionMade(self):
        self.buf = b""
        self.step = 0
        self.factory.conns.append(self)
        self.gone = defer.Deferred()

    def dataReceived(self, data):
        self.buf += data
        self.factory.requests.append(data)
        if self.step == 0 and self.buf == b"\x05\x01\x02":
            self.step, self.buf = 1, b""
            self.transport.write(b"\x05\x02")
        elif self.step == 1 and self.buf == b"\x01\x03bob\x0b" + PASSWORD.encode():
            self.step, self.buf = 2, b""
            self.transport.write(b"\x01\x00")
        elif self.step == 2 and self.buf == DOMAIN_REQUEST:
            self.step, self.buf = 3, b""
            self.transport.write(b"\x05\x00\x00\x03\x09localhost\x04\x38WELCOME")
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.gone.callback(None)


def _listen(protocol):
    """Listen on 127.0.0.1, port chosen by the kernel; the factory collects connections and requests."""
    from twisted.internet import reactor

    factory = Factory.forProtocol(protocol)
    factory.conns, factory.requests = [], []
    return reactor.listenTCP(0, factory, interface="127.0.0.1"), factory


class WaitingLeg(Leg):
    """A Leg whose ``done`` fires at the first event of kind ``wanted`` (or at connectionLost)."""

    def __init__(self, wanted):
        super().__init__()
        self.wanted = wanted
        self.done = defer.Deferred()

    def _record(self, *event):
        super()._record(*event)
        if event[0] in (self.wanted, "lost") and not self.done.called:
            self.done.callback(None)


@pytest_twisted.inlineCallbacks
def test_real_http_connect_peer_full_handshake():
    """Against a real CONNECT server on loopback (dialed by name): exact request, success, banner delivered."""
    from twisted.internet import reactor

    port, factory = _listen(FakeConnectServer)
    try:
        upstream = Upstream.parse("http://alice:%s@localhost:%d" % (PASSWORD, port.getHost().port))
        client = yield dial(reactor, upstream, 5, 5)
        leftover = yield client.handshake("example.com", 443).addTimeout(5, reactor)
        assert factory.requests == [
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n"
            b"Proxy-Authorization: Basic " + TOKEN.encode() + b"\r\n\r\n"
        ]
        leg = WaitingLeg("data")
        client.attach(leg)
        if leftover != b"BANNER":  # the banner came in a later segment
            yield leg.done.addTimeout(5, reactor)
        assert leftover + b"".join(e[1] for e in leg.events if e[0] == "data") == b"BANNER"
        client.abort()
        yield factory.conns[0].gone.addTimeout(5, reactor)
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_real_socks5_peer_full_handshake_and_half_close():
    """Against a real SOCKS5 server: auth + CONNECT, leftover bytes, and the server's FIN reaches the leg."""
    from twisted.internet import reactor

    port, factory = _listen(FakeSocksServer)
    try:
        upstream = Upstream.parse("socks5://bob:%s@127.0.0.1:%d" % (PASSWORD, port.getHost().port))
        client = yield dial(reactor, upstream, 5, 5)
        leftover = yield client.handshake("example.com", 443).addTimeout(5, reactor)
        assert b"".join(factory.requests) == (
            b"\x05\x01\x02" + b"\x01\x03bob\x0b" + PASSWORD.encode() + DOMAIN_REQUEST
        )
        assert client.bound == ("localhost", 1080)
        leg = WaitingLeg("read-eof")
        client.attach(leg)
        yield leg.done.addTimeout(5, reactor)
        data = leftover + b"".join(e[1] for e in leg.events if e[0] == "data")
        assert data == b"WELCOME"
        assert ("read-eof",) in leg.events
        client.abort()
        yield factory.conns[0].gone.addTimeout(5, reactor)
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_real_refused_port_is_unreachable():
    """Dialing a closed loopback port fails with Unreachable naming the device proxy."""
    from twisted.internet import reactor

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed = probe.getsockname()[1]
    probe.close()
    with pytest.raises(Unreachable) as info:
        yield dial(reactor, Upstream.parse("http://127.0.0.1:%d" % closed), 5, 5)
    assert str(info.value).startswith("device proxy http://127.0.0.1:%d is unreachable: " % closed)
    assert "refused" in str(info.value)
