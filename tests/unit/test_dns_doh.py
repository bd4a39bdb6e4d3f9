"""proxy.dnsdoh / proxy.dohurl / proxy.tunnelendpoint: DNS-over-HTTPS through a device proxy.

Real loopback sockets: a CONNECT proxy (the "device") and a TLS DoH server with a throwaway CA
(tests/unit/doh_peers.py), so TLS verification, HTTP keep-alive and the tunnel run for real.
"""

import ipaddress

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.names import dns

from proxy import dnsmessage
from proxy.dnsdoh import DoHResolver, load_ca_file, tls_options
from proxy.dnsserver import DNSRoute, DNSServer, DNSSettings, DNSStats
from proxy.dnserrors import DNSTimeout, DNSUnavailable, Overloaded
from proxy.dohurl import is_doh, parse_doh_url
from proxy.upstream import Upstream
from tests.unit.doh_peers import ConnectProxy, DoHServer, make_ca
from tests.unit.dns_wire import make_query

URL = "https://doh.test/dns-query"


@pytest.fixture
def pki(tmp_path):
    ca, issue = make_ca(str(tmp_path))
    return ca, issue, str(tmp_path)


@pytest.fixture
def peers(pki):
    ca, issue, _ = pki
    server = DoHServer(*issue(["doh.test"]))
    proxy = ConnectProxy(server.address)
    yield server, proxy
    pytest_twisted.blockon(defer.gatherResults([proxy.stop(), server.stop()]))


@pytest.fixture
def events():
    seen = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def resolver(proxy, ca, stats=None, url=URL, host="doh.test", **kw):
    upstream = Upstream.parse("http://%s:%d" % proxy.address)
    kw.setdefault("query_timeout", 3.0)
    return DoHResolver(reactor, upstream, parse_doh_url(url), tls_options(host, ca), stats=stats, **kw)


def answer_address(reply):
    m = dns.Message()
    m.fromStr(reply)
    return m.answers[0].payload.dottedQuad()


def wait_until(predicate, timeout=3.0):
    """Poll the real reactor until ``predicate()`` (connection teardown happens a tick later)."""
    deadline = reactor.seconds() + timeout

    @defer.inlineCallbacks
    def poll():
        while not predicate():
            if reactor.seconds() > deadline:
                raise AssertionError("condition not reached within %gs" % timeout)
            yield task.deferLater(reactor, 0.01, lambda: None)

    return poll()


# --- URLs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, host, port, query",
    [
        ("https://dns.example/dns-query", "dns.example", 443, b"https://dns.example/dns-query?dns=AB"),
        ("https://DNS.Example.:8443/q", "dns.example", 8443, b"https://DNS.Example.:8443/q?dns=AB"),
        ("https://192.0.2.1/dns-query", "192.0.2.1", 443, b"https://192.0.2.1/dns-query?dns=AB"),
        ("https://[2001:db8::1]:444/dq", "2001:db8::1", 444, b"https://[2001:db8::1]:444/dq?dns=AB"),
        ("https://dns.example/resolve?ct=x", "dns.example", 443, b"https://dns.example/resolve?ct=x&dns=AB"),
    ],
)
def test_doh_url_parses(text, host, port, query):
    url = parse_doh_url(text)
    assert (url.host, url.port, url.query_url("AB")) == (host, port, query)
    assert is_doh(text) and str(url) == text


@pytest.mark.parametrize(
    "text, problem",
    [
        ("http://dns.example/dns-query", "https://"),
        ("https://user:secret@dns.example/dns-query", "credentials"),
        ("https://dns.example/dns-query#x", "fragment"),
        ("https://dns.example:0/dns-query", "port"),
        ("https://dns.example:99999/dns-query", "port"),
        ("https://dns_example/dns-query", "host"),
        ("https:///dns-query", "host"),
        ("https://dns.example", "path"),
        ("https://dns.example/", "path"),
        ("https://dns.exa mple/q", "spaces"),
    ],
)
def test_bad_doh_urls_say_what_is_wrong(text, problem):
    with pytest.raises(ValueError) as e:
        parse_doh_url(text)
    assert problem in str(e.value)
    assert "secret" not in str(e.value)


def test_ca_file_errors_name_the_file(tmp_path, pki):
    missing = tmp_path / "missing.pem"
    with pytest.raises(ValueError, match="cannot read .*missing.pem"):
        load_ca_file(str(missing))
    empty = tmp_path / "empty.pem"
    empty.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="empty.pem holds no PEM certificate"):
        load_ca_file(str(empty))
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match="certificate 1 in .*broken.pem"):
        load_ca_file(str(broken))
    ca = pki[0]
    both = tmp_path / "both.pem"
    both.write_bytes(open(ca, "rb").read() * 2)
    assert len(load_ca_file(str(both))) == 2


# --- the resolver over real sockets -------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_queries_go_through_the_device_as_rfc8484_gets_on_one_kept_alive_tunnel(peers, pki):
    server, proxy = peers
    stats = DNSStats()
    r = resolver(proxy, pki[0], stats)
    replies = []
    for qid in (0x1111, 0x2222, 0x3333):
        replies.append((yield r.query(make_query(qid=qid))))
    assert [answer_address(x) for x in replies] == ["192.0.2.7"] * 3
    assert [dnsmessage.reply_id(x) for x in replies] == [0, 0, 0], "DoH carries ID 0; the server restores the client's"
    assert proxy.targets == ["doh.test:443"], "one CONNECT, to the URL's host, kept alive"
    assert server.connections == 1
    assert server.resource.requests == [(b"GET", "/dns-query", "application/dns-message", 0)] * 3
    assert stats.upstream_opened == 1 and r.connected
    yield r.close()
    yield wait_until(lambda: not r.connected)
    assert stats.upstream_closed["closed"] == 1


@pytest_twisted.inlineCallbacks
def test_concurrent_queries_are_spread_over_at_most_max_connections_tunnels(peers, pki):
    server, proxy = peers
    r = resolver(proxy, pki[0], max_connections=3)
    replies = yield defer.gatherResults([r.query(make_query(qid=i)) for i in range(12)])
    assert len(replies) == 12 and all(answer_address(x) == "192.0.2.7" for x in replies)
    assert len(proxy.targets) == 3 and server.connections == 3
    assert r.pending() == 0
    yield r.close()


@pytest_twisted.inlineCallbacks
def test_a_kept_alive_tunnel_dropped_by_the_device_is_replaced_without_failing_the_query(peers, pki):
    server, proxy = peers
    stats = DNSStats()
    r = resolver(proxy, pki[0], stats)
    yield r.query(make_query())
    proxy.drop_all()  # cellular NAT forgot the connection; we only learn it on the next write
    yield wait_until(lambda: not r.connected)
    reply = yield r.query(make_query(qid=9))
    assert answer_address(reply) == "192.0.2.7"
    assert len(proxy.targets) == 2 and stats.upstream_closed["dropped"] == 1
    yield r.close()


@pytest_twisted.inlineCallbacks
def test_an_idle_tunnel_to_a_silent_phone_is_aborted_after_the_close_grace(peers, pki):
    """The idle close is a TLS close_notify that waits for the resolver's; when the phone has
    gone silent it never comes, so the tunnel is reset close_grace seconds later."""
    server, proxy = peers
    stats = DNSStats()
    r = resolver(proxy, pki[0], stats, idle_timeout=0.2, close_grace=0.3)
    yield r.query(make_query())
    proxy.black_hole()
    started = reactor.seconds()
    yield wait_until(lambda: not r.connected, timeout=3.0)
    assert 0.4 <= reactor.seconds() - started < 2.0, "idle 0.2 s + grace 0.3 s"
    yield wait_until(lambda: not proxy.tunnels)
    assert stats.upstream_closed["dropped"] == 1
    yield r.close()


@pytest_twisted.inlineCallbacks
def test_close_resets_tunnels_to_a_silent_phone_at_once(peers, pki):
    server, proxy = peers
    stats = DNSStats()
    r = resolver(proxy, pki[0], stats)  # close_grace 5 s: only an abort can be this quick
    yield r.query(make_query())
    proxy.black_hole()
    r.close("forgotten")
    yield wait_until(lambda: not r.connected and not proxy.tunnels, timeout=1.0)
    assert stats.upstream_closed["forgotten"] == 1


@pytest_twisted.inlineCallbacks
def test_server_closing_after_each_reply_still_answers_every_query(peers, pki):
    server, proxy = peers
    server.resource.mode = "close"
    r = resolver(proxy, pki[0])
    for qid in range(3):
        reply = yield r.query(make_query(qid=qid))
        assert answer_address(reply) == "192.0.2.7"
    assert len(proxy.targets) == 3
    yield r.close()


@pytest_twisted.inlineCallbacks
def test_an_untrusted_certificate_is_a_servfail_named_as_a_tls_failure(peers, tmp_path, events):
    server, proxy = peers
    other_ca, _ = make_ca(str(tmp_path), cn="some-other-ca")
    stats = DNSStats()
    r = resolver(proxy, other_ca, stats)
    with pytest.raises(DNSUnavailable, match="failed: tls"):
        yield r.query(make_query())
    assert stats.upstream_failed["tls"] == 1
    warned = [e for e in events if e.get("event") == "dns-upstream-failed"]
    assert len(warned) == 1 and warned[0]["kind"] == "tls"
    assert "certificate verify failed" in warned[0]["reason"]
    assert server.resource.requests == [], "no query was sent to an unverified server"
    yield r.close()


@pytest_twisted.inlineCallbacks
def test_a_certificate_for_another_name_is_refused(pki, events):
    ca, issue, _ = pki
    server = DoHServer(*issue(["elsewhere.test"]))
    proxy = ConnectProxy(server.address)
    stats = DNSStats()
    try:
        r = resolver(proxy, ca, stats)
        with pytest.raises(DNSUnavailable, match="tls"):
            yield r.query(make_query())
        assert stats.upstream_failed["tls"] == 1 and server.resource.requests == []
        reason = [e for e in events if e.get("event") == "dns-upstream-failed"][0]["reason"]
        assert "doh.test" in reason
        yield r.close()
    finally:
        yield defer.gatherResults([proxy.stop(), server.stop()])


@pytest.mark.parametrize(
    "names",
    [
        ["evil.test", "192.0.2.1"],  # current Twisted let this through: service-identity raised CertificateError
        ["doh.test", "192.0.2.1"],  # a certificate service-identity cannot parse is never trusted
        ["evil.test"],
    ],
)
@pytest_twisted.inlineCallbacks
def test_identity_check_fails_closed_on_every_twisted(pki, events, names):
    ca, issue, _ = pki
    server = DoHServer(*issue(names))
    proxy = ConnectProxy(server.address)
    try:
        r = resolver(proxy, ca)
        with pytest.raises(DNSUnavailable, match="tls"):
            yield r.query(make_query())
        assert server.resource.requests == [], "a query went to a server whose certificate is not for doh.test"
        reason = [e for e in events if e.get("event") == "dns-upstream-failed"][0]["reason"]
        assert "certificate is not valid for doh.test" in reason
        yield r.close()
    finally:
        yield defer.gatherResults([proxy.stop(), server.stop()])


@pytest_twisted.inlineCallbacks
def test_an_ip_address_url_is_verified_against_the_certificate(pki):
    ca, issue, _ = pki
    server = DoHServer(*issue(["doh.test"]))  # no IP SAN: an IP URL must not verify
    proxy = ConnectProxy(server.address)
    try:
        r = resolver(proxy, ca, url="https://127.0.0.1/dns-query", host="127.0.0.1")
        with pytest.raises(DNSUnavailable, match="tls"):
            yield r.query(make_query())
        assert proxy.targets == ["127.0.0.1:443"]
        yield r.close()
    finally:
        yield defer.gatherResults([proxy.stop(), server.stop()])
    server = DoHServer(*issue(["doh.test"], ips=["127.0.0.1"]))  # with an IP SAN it verifies
    proxy = ConnectProxy(server.address)
    try:
        r = resolver(proxy, ca, url="https://127.0.0.1/dns-query", host="127.0.0.1")
        reply = yield r.query(make_query())
        assert answer_address(reply) == "192.0.2.7"
        yield r.close()
    finally:
        yield defer.gatherResults([proxy.stop(), server.stop()])


@pytest.mark.parametrize(
    "mode, problem",
    [
        ("status", "HTTP 503"),
        ("html", "content type 'text/html'"),
        ("huge", "announced a 70000-byte reply"),
        ("huge-chunked", "exceeded 65535 bytes"),
        ("empty", "0-byte reply is not a DNS message"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_unusable_http_replies_are_servfails_saying_why(peers, pki, events, mode, problem):
    server, proxy = peers
    server.resource.mode = mode
    r = resolver(proxy, pki[0])
    with pytest.raises(DNSUnavailable) as e:
        yield r.query(make_query())
    assert problem in str(e.value)
    server.resource.mode = "ok"
    reply = yield r.query(make_query())  # the resolver recovers at once
    assert answer_address(reply) == "192.0.2.7"
    yield r.close()


@pytest_twisted.inlineCallbacks
def test_a_silent_resolver_times_out_and_its_tunnel_is_aborted(peers, pki):
    server, proxy = peers
    server.resource.mode = "hang"
    r = resolver(proxy, pki[0], query_timeout=0.3)
    started = reactor.seconds()
    with pytest.raises(DNSTimeout):
        yield r.query(make_query())
    assert reactor.seconds() - started < 1.0
    yield wait_until(lambda: not proxy.tunnels)
    assert r.pending() == 0
    yield r.close()


@pytest_twisted.inlineCallbacks
def test_device_refusing_or_down_fails_fast_and_is_counted(peers, pki):
    server, proxy = peers
    proxy.refuse = True
    stats = DNSStats()
    r = resolver(proxy, pki[0], stats)
    with pytest.raises(DNSUnavailable):
        yield r.query(make_query())
    assert stats.upstream_failed["forbidden"] == 1
    yield r.close()
    yield proxy.stop()
    down = resolver(proxy, pki[0], stats)
    started = reactor.seconds()
    with pytest.raises(DNSUnavailable):
        yield down.query(make_query())
    assert reactor.seconds() - started < 1.0 and stats.upstream_failed["unreachable"] == 1
    yield down.close()


@pytest_twisted.inlineCallbacks
def test_close_fails_waiting_queries_and_later_ones(peers, pki):
    server, proxy = peers
    server.resource.mode = "hang"
    r = resolver(proxy, pki[0], max_connections=1, query_timeout=5)
    first, second = r.query(make_query(qid=1)), r.query(make_query(qid=2))
    yield wait_until(lambda: server.resource.requests)
    r.close("forgotten")
    for d in (first, second):
        with pytest.raises(DNSUnavailable, match="forgotten"):
            yield d
    with pytest.raises(DNSUnavailable, match="closed"):
        yield r.query(make_query())
    yield wait_until(lambda: not proxy.tunnels)


def test_queries_beyond_the_queue_are_refused_as_overloaded(pki):
    upstream = Upstream.parse("http://127.0.0.1:9")
    clock = task.Clock()
    dials = []

    def dial(reactor, upstream, connect_timeout, handshake_timeout):
        d = defer.Deferred()
        dials.append(d)
        return d

    r = DoHResolver(clock, upstream, parse_doh_url(URL), tls_options("doh.test", pki[0]),
                    max_connections=2, max_queued=3, dial=dial)
    waiting = [r.query(make_query(qid=i)) for i in range(5)]
    assert len(dials) == 2 and r.pending() == 5
    failed = []
    r.query(make_query()).addErrback(failed.append)
    assert failed and failed[0].check(Overloaded)
    clock.advance(5.0)  # query_timeout: the dials are cancelled with their queries
    errors = []
    for d in waiting:
        d.addErrback(errors.append)
    assert [f.check(DNSTimeout) for f in errors] == [DNSTimeout] * 5
    assert r.pending() == 0


# --- through the DNS server ---------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_dns_server_resolves_through_doh_restores_the_id_and_caches(peers, pki):
    server, proxy = peers
    upstream = Upstream.parse("http://%s:%d" % proxy.address)
    settings = DNSSettings(listen_host="127.0.0.1", resolver=parse_doh_url(URL), ca_file=pki[0])
    route = DNSRoute(key="phone-a", upstream=upstream)
    dns_server = DNSServer(reactor, settings, lambda ip: route)
    client = ipaddress.ip_address("10.8.0.2")
    reply = yield dns_server.answer(make_query(qid=0xBEEF), client, udp=True)
    assert dnsmessage.reply_id(reply) == 0xBEEF and answer_address(reply) == "192.0.2.7"
    again = yield dns_server.answer(make_query(qid=0xCAFE), client, udp=True)
    assert dnsmessage.reply_id(again) == 0xCAFE
    assert len(server.resource.requests) == 1, "the second answer came from the device's cache"
    assert dns_server.stats.resolved["device"] == 1 and dns_server.stats.cache_hits == 1
    yield dns_server.stop()
