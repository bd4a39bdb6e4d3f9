"""The lab's DNS origin zone (tests/lab/dns_origin.py) answers what the lab and bench-dns rely on.

Mostly pure: :meth:`Zone.respond` on wire bytes from the bench's own stdlib encoder, decoded by the
bench's stdlib parser, so both halves are checked against each other; the DNS-over-HTTPS site
driven on a ``StringTransport`` with a ``Clock``. One test starts the real server with DoH on
127.0.0.1 through :class:`tests.lab.world.DNSOrigin` and talks TLS to it. No root.
"""

import base64
import http.client
import io
import shutil
import signal
import socket
import ssl
import subprocess
import types

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.names import dns
from twisted.python.failure import Failure

from tests.bench.dns_load import check_reply, encode_query, parse_reply
from tests.lab.dns_origin import BIG_COUNT, ORIGIN_IP, Zone, bench_address, big_addresses, decode_dns_param, doh_site
from tests.lab.netns import stop_process, wait_for
from tests.lab.world import DNSOrigin, make_origin_pki


def _ask(zone, qname, qtype=dns.A, udp=True, edns=None, qid=4242):
    if edns is None:
        raw = encode_query(qid, qname, qtype)
    else:
        raw = dns._EDNSMessage(id=qid, queries=[dns.Query(qname, qtype)], maxSize=edns).toStr()
    query = dns.Message()
    query.fromStr(raw)
    action, data = zone.respond(query, udp)
    return action, (parse_reply(data) if data is not None else None), data


def test_origin_name_and_ttl():
    """origin.test is A 203.0.113.10 with the configured TTL, authoritative, no recursion offered."""
    _, reply, data = _ask(Zone(ttl=123), "origin.test")
    assert reply["rcode"] == 0 and not reply["tc"]
    assert reply["answers"] == [(1, 123, ORIGIN_IP)]
    flags = int.from_bytes(data[2:4], "big")
    assert flags & 0x0400 and not flags & 0x0080  # AA set, RA clear


def test_ttl_names():
    """<N>.ttl.test carries TTL N, for cache expiry tests."""
    _, reply, _ = _ask(Zone(), "7.ttl.test")
    assert reply["answers"] == [(1, 7, ORIGIN_IP)]


def test_big_answer_truncated_over_plain_udp_whole_over_tcp_and_edns():
    """big.test does not fit 512 bytes: TC over plain UDP, all 40 records over TCP or with EDNS 1232."""
    _, reply, data = _ask(Zone(), "big.test", udp=True)
    assert reply["tc"] and reply["answers"] == [] and len(data) <= 512
    _, reply, data = _ask(Zone(), "big.test", udp=False)
    assert not reply["tc"] and len(data) > 512
    assert [value for _, _, value in reply["answers"]] == big_addresses() and len(big_addresses()) == BIG_COUNT
    _, reply, data = _ask(Zone(), "big.test", udp=True, edns=1232)
    assert not reply["tc"] and len(reply["answers"]) == BIG_COUNT


def test_long_txt():
    """txt.test is one TXT record of over 512 bytes (TC over plain UDP)."""
    _, reply, _ = _ask(Zone(), "txt.test", dns.TXT, udp=False)
    assert len(reply["answers"]) == 1 and len(reply["answers"][0][2]) > 512
    _, reply, _ = _ask(Zone(), "txt.test", dns.TXT, udp=True)
    assert reply["tc"]


def test_nxdomain_and_nodata_carry_the_soa():
    """A missing name is NXDOMAIN, a missing type NODATA; both with the SOA (negative TTL)."""
    for qname, qtype, rcode in (("missing.test", dns.A, 3), ("big.test", dns.AAAA, 0)):
        _, _, data = _ask(Zone(negative_ttl=11), qname, qtype)
        message = dns.Message()
        message.fromStr(data)
        assert message.rCode == rcode and message.answers == []
        assert [(r.type, r.ttl, r.payload.minimum) for r in message.authority] == [(dns.SOA, 11, 11)]


def test_origin_is_dual_stack():
    """origin.test has an AAAA record too, so the lab's dual-stack clients try IPv6 first."""
    _, _, data = _ask(Zone(), "origin.test", dns.AAAA)
    message = dns.Message()
    message.fromStr(data)
    assert [(r.type, r.payload.dottedQuad() if r.type == dns.A else socket.inet_ntop(socket.AF_INET6, r.payload.address))
            for r in message.answers] == [(dns.AAAA, "2001:db8:113::10")]


def test_outside_zone_refused_and_drop_unanswered():
    """Names outside test. are REFUSED; drop.test gets no reply; <M>.delay.test is delayed."""
    assert _ask(Zone(), "example.com")[1]["rcode"] == 5
    assert _ask(Zone(), "drop.test")[2] is None
    action, reply, _ = _ask(Zone(), "250.delay.test")
    assert action == ("delay", 0.25) and reply["answers"] == [(1, 300, ORIGIN_IP)]


def test_bench_wildcard_matches_the_checker():
    """*.bench.test answers bench_address(name), whatever the case; the bench's checker accepts it."""
    _, reply, _ = _ask(Zone(), "U1-17.Bench.Test", qid=9)
    assert reply["answers"] == [(1, 300, bench_address("u1-17.bench.test"))]
    assert check_reply(reply, 9, "u1-17.bench.test") is None
    assert bench_address("a.bench.test") != bench_address("b.bench.test")


# --- DNS over HTTPS (RFC 8484): the HTTP handling on a StringTransport, then once over real TLS.

DEVICE = "203.0.113.2"


def _doh_query(qname, qtype=dns.A, qid=0):
    message = dns.Message(id=qid, recDes=1)
    message.queries = [dns.Query(qname, qtype)]
    return message.toStr()


def _b64(wire):
    return base64.urlsafe_b64encode(wire).rstrip(b"=")


def _get(wire=None, param=None, path=b"/dns-query"):
    query = b"?dns=" + _b64(wire) if wire is not None else (param or b"")
    return b"GET %s%s HTTP/1.1\r\nHost: origin.test\r\nAccept: application/dns-message\r\n\r\n" % (path, query)


def _post(body, ctype=b"application/dns-message"):
    return b"POST /dns-query HTTP/1.1\r\nHost: origin.test\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        ctype, len(body), body)


def _responses(data):
    """Split what the server wrote into ``(status, headers, body)`` responses (Content-Length framed)."""
    out = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, "incomplete response head %r" % head
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers["content-length"])
        assert len(data) >= length, "short body"
        out.append((int(status_line.split()[1]), headers, data[:length]))
        data = data[length:]
    return out


class _Conn:
    """One accepted DoH connection: a Site channel on a StringTransport, with a Clock."""

    def __init__(self, zone=None, clock=None, log=None, peer=DEVICE):
        self.clock = clock or Clock()
        self.log = log if log is not None else io.StringIO()
        site = doh_site(zone or Zone(), self.log, reactor=self.clock)
        address = IPv4Address("TCP", peer, 40000)
        self.channel = site.buildProtocol(address)
        self.transport = StringTransport(peerAddress=address)
        self.channel.makeConnection(self.transport)

    def send(self, raw):
        """Feed request bytes; returns the responses written since the last call."""
        self.channel.dataReceived(raw)
        return self.take()

    def take(self):
        data = self.transport.value()
        self.transport.clear()
        return _responses(data)

    def lines(self):
        return self.log.getvalue().splitlines()


def test_doh_get_answers_from_the_zone_and_logs_the_query():
    """GET ?dns=<base64url, no padding>: 200, application/dns-message with Content-Length, the
    zone's TCP answer with ID 0; the log has the connection and `<src> doh <qname> <qtype>`."""
    conn = _Conn()
    ((status, headers, body),) = conn.send(_get(_doh_query("Origin.Test")))
    assert status == 200, body
    assert headers["content-type"] == "application/dns-message"
    assert int(headers["content-length"]) == len(body)
    reply = parse_reply(body)
    assert reply["id"] == 0 and reply["rcode"] == 0 and reply["answers"] == [(1, 300, ORIGIN_IP)]
    assert conn.lines() == ["%s doh-connect" % DEVICE, "%s doh origin.test A" % DEVICE]
    assert not conn.transport.disconnecting  # HTTP/1.1: the connection stays open


def test_doh_keepalive_get_post_and_big_answers_on_one_connection():
    """Several queries (GET and POST, pipelined too) on one connection, one connection logged;
    big.test comes back whole (no truncation over HTTPS)."""
    conn = _Conn()
    got = conn.send(_get(_doh_query("a.bench.test")) + _post(_doh_query("big.test", qid=77)))
    got += conn.send(_get(_doh_query("txt.test", dns.TXT)))
    assert [status for status, _, _ in got] == [200, 200, 200]
    assert parse_reply(got[0][2])["answers"] == [(1, 300, bench_address("a.bench.test"))]
    big = parse_reply(got[1][2])
    assert big["id"] == 77 and not big["tc"] and [v for _, _, v in big["answers"]] == big_addresses()
    assert len(parse_reply(got[2][2])["answers"]) == 1 and len(got[2][2]) > 512
    assert conn.lines() == ["%s doh-connect" % DEVICE] + [
        "%s doh %s" % (DEVICE, q) for q in ("a.bench.test A", "big.test A", "txt.test TXT")
    ]
    assert not conn.transport.disconnecting


def test_doh_bad_requests_get_400_and_are_not_logged():
    """Missing or repeated dns parameter, not base64url, shorter than a DNS header, a response
    instead of a query, a POST of another content type or with no body: HTTP 400 each, no query
    logged, the connection still usable. Other paths are 404, other methods 405."""
    conn = _Conn()
    response = _doh_query("origin.test")
    response = response[:2] + bytes([response[2] | 0x80]) + response[3:]  # QR=1
    bad = [
        _get(param=b""),
        _get(param=b"?other=1"),
        _get(param=b"?dns=" + _b64(_doh_query("origin.test")) + b"&dns=" + _b64(_doh_query("origin.test"))),
        _get(param=b"?dns=%21%21%21"),
        _get(param=b"?dns=" + base64.b64encode(b"\xfb\xff" * 8)),  # standard alphabet (+ and /), not url-safe
        _get(param=b"?dns=A"),  # one base64 character: no byte at all
        _get(b"\x00" * 5),
        _get(response),
        _post(_doh_query("origin.test"), ctype=b"text/plain"),
        _post(b""),
    ]
    for raw in bad:
        ((status, headers, body),) = conn.send(raw)
        assert status == 400, (raw, status, body)
        assert headers["content-type"] != "application/dns-message"
    assert conn.lines() == ["%s doh-connect" % DEVICE]
    assert [s for s, _, _ in conn.send(_get(_doh_query("origin.test"), path=b"/other"))] == [404]
    assert [s for s, _, _ in conn.send(b"PUT /dns-query HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")] == [405]
    assert conn.lines() == ["%s doh-connect" % DEVICE]
    # Padding is optional, and a POST's content type may carry parameters.
    padded = base64.urlsafe_b64encode(_doh_query("padded.bench.test"))
    assert [s for s, _, _ in conn.send(_get(param=b"?dns=" + padded))] == [200]
    assert [s for s, _, _ in conn.send(_post(_doh_query("p.bench.test"), b"Application/DNS-Message; x=1"))] == [200]
    assert conn.lines()[1:] == ["%s doh padded.bench.test A" % DEVICE, "%s doh p.bench.test A" % DEVICE]


def test_doh_delay_and_drop():
    """<M>.delay.test is answered M ms later (on the clock); drop.test never; a client that goes
    away while its answer is delayed cancels it."""
    conn = _Conn()
    assert conn.send(_get(_doh_query("250.delay.test"))) == []
    conn.clock.advance(0.2)
    assert conn.take() == []
    conn.clock.advance(0.05)
    ((status, _, body),) = conn.take()
    assert status == 200 and parse_reply(body)["answers"] == [(1, 300, ORIGIN_IP)]

    assert conn.send(_get(_doh_query("drop.test"))) == []
    conn.clock.advance(60)
    assert conn.take() == []
    assert conn.lines()[-1] == "%s doh drop.test A" % DEVICE

    gone = _Conn(clock=conn.clock)
    assert gone.send(_get(_doh_query("1000.delay.test"))) == []
    before = len(conn.clock.getDelayedCalls())
    gone.channel.connectionLost(Failure(ConnectionDone()))
    assert len(conn.clock.getDelayedCalls()) < before  # the delayed answer was cancelled
    conn.clock.advance(2)
    assert gone.take() == []


def test_decode_dns_param():
    """base64url with or without padding; nothing else."""
    wire = _doh_query("origin.test")
    assert decode_dns_param(_b64(wire)) == decode_dns_param(base64.urlsafe_b64encode(wire)) == wire
    for value in (b"", b"a+b/", b"abc$", b"A", b"====", b"QQ==="):
        with pytest.raises(ValueError):
            decode_dns_param(value)


def _free_port():
    """A port free for both TCP and UDP on 127.0.0.1 (best effort: nothing holds it afterwards)."""
    for _ in range(20):
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise AssertionError("no free port")


class _Here:
    """Stands in for the origin namespace: runs DNSOrigin's process right here (no root)."""

    def popen(self, argv, **kwargs):
        return subprocess.Popen(argv, **kwargs)

    def stop(self, proc, sig=signal.SIGTERM, timeout=10):
        return stop_process(proc, sig, timeout)


def test_doh_over_real_tls_via_the_lab_class(tmp_path):
    """DNSOrigin starts the real server with DoH (here on 127.0.0.1, unprivileged ports): a
    client trusting ``ca_cert`` and checking the name origin.test asks GET and POST on one
    keep-alive connection; a client trusting another CA fails the handshake. The log parses into
    two doh queries and two connections."""
    pytest.importorskip("OpenSSL", reason="DoH needs pyOpenSSL (Twisted[tls])")
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl program for the lab PKI")
    ca_cert, cert, key = make_origin_pki(str(tmp_path / "pki"))
    other_ca = make_origin_pki(str(tmp_path / "other"))[0]
    origin = types.SimpleNamespace(directory=str(tmp_path), ns=_Here(), ca_cert=ca_cert, cert=cert, key=key)
    server = DNSOrigin(origin, port=_free_port(), doh_port=_free_port())
    server.address = "127.0.0.1"
    assert server.doh_url == "https://origin.test:%d/dns-query" % server.doh_port and server.ca_cert == ca_cert
    assert DNSOrigin(origin).doh_url is None
    server.start(timeout=20)
    try:
        def connect(cafile):
            context = ssl.create_default_context(cafile=cafile)
            conn = http.client.HTTPSConnection("origin.test", server.doh_port, context=context, timeout=5)
            conn._create_connection = lambda address, *args: socket.create_connection(("127.0.0.1", address[1]), *args)
            return conn

        conn = connect(ca_cert)
        conn.request("GET", "/dns-query?dns=" + _b64(_doh_query("origin.test")).decode(),
                     headers={"Accept": "application/dns-message"})
        got = conn.getresponse()
        body = got.read()
        assert got.status == 200 and got.getheader("content-type") == "application/dns-message"
        assert parse_reply(body)["answers"] == [(1, 300, ORIGIN_IP)]
        conn.request("POST", "/dns-query", body=_doh_query("tls.bench.test"),
                     headers={"Content-Type": "application/dns-message"})
        got = conn.getresponse()
        assert got.status == 200 and parse_reply(got.read())["answers"] == [(1, 300, bench_address("tls.bench.test"))]
        assert conn.sock.version() and conn.sock.selected_alpn_protocol() in (None, "http/1.1")
        conn.close()

        with pytest.raises(ssl.SSLCertVerificationError):
            connect(other_ca).request("GET", "/dns-query?dns=" + _b64(_doh_query("never.test")).decode())
        wait_for(lambda: len(server.doh_connections()) == 2, 5, what="two DoH connections logged")
        assert server.doh_connections() == ["127.0.0.1", "127.0.0.1"]
        assert server.queries() == [
            DNSOrigin.Query("127.0.0.1", "doh", "origin.test", "A"),
            DNSOrigin.Query("127.0.0.1", "doh", "tls.bench.test", "A"),
        ]
        assert server.wait_query("tls.bench.test", timeout=1).proto == "doh"
        assert server.query_sources() == {"127.0.0.1"}
    finally:
        server.stop()
    assert not server.running
