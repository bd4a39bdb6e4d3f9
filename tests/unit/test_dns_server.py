"""proxy.dnsserver: routing, REFUSED, malformed drops, cache, truncation, timeouts, policies, no leak.

UDP and TCP protocols are driven directly (fake datagram transport, StringTransport); the
device is the scripted proxy of test_dns_upstream; time is a MemoryReactorClock. One test binds
real loopback sockets to check listen() and IP_FREEBIND.
"""

import ipaddress
import json
import socket
import struct

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger
from twisted.names import dns

from proxy.dnsserver import (
    IP_FREEBIND,
    DNSRoute,
    DNSServer,
    DNSService,
    DNSSettings,
    _bound_socket,
    _TCPFactory,
    _UDPProtocol,
)
from proxy.dnserrors import DNSUnavailable
from proxy.upstream import Upstream
from proxy.upstreamerrors import Unreachable
from tests.unit.deferreds import result_of
from tests.unit.dns_device import HTTP_DEVICE, Device
from tests.unit.dns_wire import decode, make_query, make_reply, soa_record

CLIENT = "10.9.0.5"
OTHER = "10.9.0.6"
STRANGER = "10.9.0.99"


class FakeHost:
    """The host policy's resolver: records queries, answers from a script."""

    def __init__(self):
        self.queries = []
        self.pending = []

    def query(self, query):
        self.queries.append(query)
        d = defer.Deferred()
        self.pending.append((query, d))
        return d


class UDPTransport:
    """Collects datagrams written by the UDP protocol."""

    def __init__(self):
        self.sent = []

    def write(self, data, addr):
        self.sent.append((data, addr))


class World:
    def __init__(self, routes=None, **settings):
        self.reactor = MemoryReactorClock()
        self.device = Device()
        self.host = FakeHost()
        self.routes = routes if routes is not None else {
            CLIENT: DNSRoute("phone1", HTTP_DEVICE, log_fields={"user": "alice", "device": "phone1"}),
            OTHER: DNSRoute("phone1", HTTP_DEVICE, log_fields={"user": "bob"}),
        }
        self.events = []
        self.server = DNSServer(
            self.reactor,
            DNSSettings("10.9.0.1", **settings),
            lambda ip: self.routes.get(str(ip)),
            dial=self.device.dial,
            host_resolver=self.host,
        )
        self.server._log = Logger(observer=self.events.append)
        self.udp = _UDPProtocol(self.server)
        self.udp.transport = UDPTransport()

    def ask_udp(self, wire, source=CLIENT):
        self.udp.datagramReceived(wire, (source, 40000))

    def udp_replies(self):
        out = [data for data, _ in self.udp.transport.sent]
        self.udp.transport.sent = []
        return out

    def tcp(self, source=CLIENT):
        proto = _TCPFactory(self.server).buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", source, 40001))
        proto.makeConnection(transport)
        return proto, transport

    def link(self, index=-1):
        return self.device.links[index]


def framed(wire):
    return struct.pack("!H", len(wire)) + wire


def unframe(data):
    out = []
    while data:
        (size,) = struct.unpack_from("!H", data)
        out.append(data[2 : 2 + size])
        data = data[2 + size :]
    return out


# --- routing, refusal, malformed ---------------------------------------------------------------------


def test_unmapped_source_is_refused_without_touching_any_resolver():
    """No route: REFUSED with the client's ID, counted, logged with the client IP; nothing dialled."""
    w = World()
    w.ask_udp(make_query(qid=0x4242), source=STRANGER)
    (reply,) = w.udp_replies()
    m = decode(reply)
    assert (m.id, m.rCode, m.answer) == (0x4242, dns.EREFUSED, 1)
    assert w.device.links == [] and w.host.queries == []
    assert w.server.stats.queries == {"refused": 1}
    assert [e.get("client") for e in w.events] == [STRANGER]


@pytest.mark.parametrize(
    "packet",
    [b"\x00\x01garbage", make_query()[:2] + b"\x81\x80" + make_query()[4:], make_query()[:12] + b"\x07trunc"],
)
def test_malformed_udp_is_dropped_and_counted(packet):
    """Unparseable packets and replies (QR=1) get no answer at all."""
    w = World()
    w.ask_udp(packet)
    assert w.udp_replies() == []
    assert w.server.stats.queries == {"malformed": 1}
    assert w.device.links == []


def test_malformed_tcp_closes_the_connection():
    """On TCP a bad frame ends the connection (framing can no longer be trusted)."""
    w = World()
    proto, transport = w.tcp()
    proto.dataReceived(framed(b"\x00\x01\x02"))
    assert transport.disconnecting and transport.value() == b""
    assert w.server.stats.queries == {"malformed": 1}


# --- through the device ------------------------------------------------------------------------------


def test_pipelined_tcp_clients_with_colliding_ids_get_their_own_answers():
    """Two clients, same ID, one device tunnel: rewritten IDs upstream, client IDs restored, any order."""
    w = World()
    proto, transport = w.tcp(CLIENT)
    proto.dataReceived(framed(make_query(name=b"a.example", qid=7)) + framed(make_query(name=b"b.example", qid=8)))
    w.ask_udp(make_query(name=b"c.example", qid=7), source=OTHER)
    assert len(w.device.links) == 1
    link = w.link().up()
    sent = link.queries()
    assert len({i for i, _ in sent}) == 3
    for _, frame in reversed(sent):
        link.answer(frame)
    tcp_replies = [decode(r) for r in unframe(transport.value())]
    assert [(m.id, m.queries[0].name.name) for m in tcp_replies] == [(8, b"b.example"), (7, b"a.example")]
    (udp_reply,) = w.udp_replies()
    assert (decode(udp_reply).id, decode(udp_reply).queries[0].name.name) == (7, b"c.example")
    assert w.server.stats.queries == {"ok": 3}
    assert w.server.stats.resolved == {"device": 3}
    assert w.host.queries == []


def test_timeout_is_servfail_within_the_configured_time():
    """No reply within query_timeout: SERVFAIL at exactly that time, counted as timeout."""
    w = World(query_timeout=3.0)
    w.ask_udp(make_query(qid=9))
    link = w.link().up()
    link.queries()
    w.reactor.advance(2.9)
    assert w.udp_replies() == []
    w.reactor.advance(0.1)
    (reply,) = w.udp_replies()
    assert (decode(reply).id, decode(reply).rCode) == (9, dns.ESERVER)
    assert w.server.stats.queries == {"timeout": 1}
    latency = w.server.stats.latency()
    assert latency["count"] == 1 and latency["buckets"]["2.5"] == 0 and latency["buckets"]["5"] == 1


def test_device_failure_is_servfail_and_never_falls_back_to_the_host():
    """An unreachable device answers SERVFAIL; the host resolver is never asked (no leak)."""
    w = World()
    w.ask_udp(make_query(qid=3))
    w.link().d.errback(Unreachable("device proxy http://192.0.2.10:8080 is unreachable"))
    (reply,) = w.udp_replies()
    assert decode(reply).rCode == dns.ESERVER
    assert w.host.queries == []
    assert w.server.stats.queries == {"servfail": 1}
    assert w.server.stats.upstream_failed == {"unreachable": 1}
    event = w.events[-1]
    assert (event["upstream"], event["device"], event["user"]) == (str(HTTP_DEVICE), "phone1", "alice")


def test_via_device_without_upstream_is_servfail_not_host():
    """A misconfigured route (no device) is a SERVFAIL, not a silent host lookup."""
    w = World(routes={CLIENT: DNSRoute("phone1", None)})
    w.ask_udp(make_query())
    (reply,) = w.udp_replies()
    assert decode(reply).rCode == dns.ESERVER
    assert w.host.queries == [] and w.device.links == []


def test_host_policy_goes_to_the_host_resolver_and_never_through_the_device():
    """policy host: the injected host resolver answers; nothing is dialled."""
    w = World(routes={CLIENT: DNSRoute("phone1", HTTP_DEVICE, policy="host")})
    w.ask_udp(make_query(name=b"Printer.LAN", qid=11))
    assert w.device.links == []
    ((query, d),) = w.host.pending
    assert query.name == b"Printer.LAN"
    d.callback(make_reply(make_query(name=b"Printer.LAN", qid=999)))
    (reply,) = w.udp_replies()
    assert (decode(reply).id, decode(reply).rCode) == (11, dns.OK)
    assert w.server.stats.resolved == {"host": 1}


def test_host_policy_failure_is_servfail():
    """The host path fails like the device path."""
    w = World(routes={CLIENT: DNSRoute("phone1", None, policy="host")})
    w.ask_udp(make_query())
    w.host.pending[0][1].errback(DNSUnavailable("host resolver failed"))
    (reply,) = w.udp_replies()
    assert decode(reply).rCode == dns.ESERVER


def test_reply_for_another_question_is_servfail_and_not_cached():
    """A resolver answering a different name is not trusted."""
    w = World()
    w.ask_udp(make_query(name=b"a.example", qid=1))
    link = w.link().up()
    ((our_id, _),) = link.queries()
    wrong = make_reply(make_query(name=b"evil.example", qid=our_id))
    link.client.dataReceived(framed(wrong))
    (reply,) = w.udp_replies()
    assert decode(reply).rCode == dns.ESERVER
    assert w.server.cache.size() == 0


# --- cache -------------------------------------------------------------------------------------------


def _resolve_once(w, wire, **reply):
    w.ask_udp(wire)
    link = w.link() if w.device.links else None
    if link is None or link.client is None:
        link = w.link().up()
    ((_, frame),) = link.queries()
    link.answer(frame, **reply)
    return w.udp_replies()


def test_cache_hit_ages_ttl_keeps_client_id_and_casing_then_expires():
    """Second ask is served from cache with TTL minus age; at expiry the device is asked again."""
    w = World()
    _resolve_once(w, make_query(name=b"www.example.com", qid=1), ttl=300)
    w.reactor.advance(100)
    w.ask_udp(make_query(name=b"WWW.Example.com", qid=2), source=OTHER)  # same device, other client
    (reply,) = w.udp_replies()
    m = decode(reply)
    assert (m.id, m.queries[0].name.name, [r.ttl for r in m.answers]) == (2, b"WWW.Example.com", [200])
    assert w.link().queries() == [], "served without asking the device"
    assert (w.server.stats.cache_hits, w.server.stats.cache_misses) == (1, 1)
    w.reactor.advance(199)
    w.ask_udp(make_query(name=b"www.example.com", qid=3))
    assert len(w.device.links) == 1 and len(w.udp_replies()) == 1, "still cached (the idle tunnel closed at 60 s)"
    w.reactor.advance(1)
    w.ask_udp(make_query(name=b"www.example.com", qid=3))
    assert len(w.device.links) == 2, "expired: the device is asked again"


def test_cache_is_per_route_key():
    """Another device's client never sees this device's cached answer."""
    phone2 = Upstream.parse("http://192.0.2.20:8080")
    routes = {CLIENT: DNSRoute("phone1", HTTP_DEVICE), OTHER: DNSRoute("phone2", phone2)}
    w = World(routes=routes)
    _resolve_once(w, make_query(name=b"x.example"))
    w.ask_udp(make_query(name=b"x.example"), source=OTHER)
    assert w.udp_replies() == []
    assert len(w.device.links) == 2 and w.link().upstream.host == "192.0.2.20"


def test_identical_queries_in_flight_share_one_upstream_query():
    """Three clients of one device ask the same name at once: one query goes to the device,
    each client gets the answer with its own ID and casing; another type is not merged."""
    w = World()
    w.ask_udp(make_query(name=b"same.example", qid=1))
    w.ask_udp(make_query(name=b"SAME.example", qid=2), source=OTHER)
    proto, transport = w.tcp()
    proto.dataReceived(framed(make_query(name=b"same.Example", qid=3)))
    w.ask_udp(make_query(name=b"same.example", qtype=dns.AAAA, qid=4))
    link = w.link().up()
    frames = link.queries()
    assert len(frames) == 2, "A once, AAAA once"
    a_frame = [f for _, f in frames if decode(f).queries[0].type == dns.A][0]
    link.answer(a_frame, ttl=0)  # TTL 0: not cached, so only merging can explain one query
    replies = [decode(r) for r in w.udp_replies()]
    replies += [decode(r) for r in unframe(transport.value())]
    got = sorted((m.id, m.queries[0].name.name, len(m.answers), m.rCode) for m in replies)
    assert got == [(1, b"same.example", 1, 0), (2, b"SAME.example", 1, 0), (3, b"same.Example", 1, 0)]
    assert (w.server.stats.coalesced, w.server.stats.cache_misses, w.server.stats.queries["ok"]) == (2, 2, 3)
    assert w.server.cache.size() == 0


def test_joined_queries_get_edns_only_as_they_asked():
    """The leader asked with EDNS and the resolver's reply carries its OPT: a joined EDNS
    client gets exactly one OPT (ours), a joined plain client none (RFC 6891)."""
    w = World()
    w.ask_udp(make_query(name=b"opt.example", qid=1, edns=1232))
    w.ask_udp(make_query(name=b"opt.example", qid=2, edns=4096), source=OTHER)
    w.ask_udp(make_query(name=b"opt.example", qid=3))
    link = w.link().up()
    ((_, frame),) = link.queries()
    link.answer(frame, edns=4096)
    opts = {m.id: [r for r in m.additional if r.type == dns.OPT] for m in map(decode, w.udp_replies())}
    assert sorted(opts) == [1, 2, 3]
    assert (len(opts[1]), len(opts[2]), len(opts[3])) == (1, 1, 0)


def test_a_resolver_raising_instead_of_failing_strands_nobody():
    """A resolver that raises (fd exhaustion, a CA file gone since start-up) gives the asker
    and everyone who joined it a SERVFAIL, and the next identical query is asked anew."""
    w = World(routes={CLIENT: DNSRoute("phone1", HTTP_DEVICE, policy="host")})
    calls = []

    def raising(query):
        calls.append(query)
        if len(calls) == 1:
            w.ask_udp(make_query(name=b"boom.example", qid=2))  # joins while the first is "in flight"
        raise OSError("too many open files")

    w.host.query = raising
    w.ask_udp(make_query(name=b"boom.example", qid=1))
    replies = [decode(r) for r in w.udp_replies()]
    assert sorted((m.id, m.rCode) for m in replies) == [(1, dns.ESERVER), (2, dns.ESERVER)]
    assert w.server._flights == {}
    w.ask_udp(make_query(name=b"boom.example", qid=3))
    assert len(calls) == 2 and decode(w.udp_replies()[0]).rCode == dns.ESERVER


def test_a_failed_query_fails_everyone_who_joined_it():
    """The device is down: the leader and the joined client both get SERVFAIL, one dial only."""
    w = World()
    w.ask_udp(make_query(name=b"down.example", qid=1))
    w.ask_udp(make_query(name=b"down.example", qid=2), source=OTHER)
    w.link().d.errback(Unreachable("phone is off"))
    replies = [decode(r) for r in w.udp_replies()]
    assert sorted((m.id, m.rCode) for m in replies) == [(1, dns.ESERVER), (2, dns.ESERVER)]
    assert len(w.device.links) == 1 and w.server.stats.queries["servfail"] == 2
    w.ask_udp(make_query(name=b"down.example", qid=3))
    assert len(w.device.links) == 2, "the flight ended: a later query asks again"


def test_negative_answers_are_cached_for_the_soa_minimum():
    """NXDOMAIN with SOA minimum 60 is served from cache for 60 s, then asked again."""
    w = World()
    (first,) = _resolve_once(w, make_query(name=b"nope.example"), rcode=dns.ENAME, authority=[soa_record(minimum=60)])
    assert decode(first).rCode == dns.ENAME
    w.reactor.advance(59)
    w.ask_udp(make_query(name=b"nope.example"))
    (reply,) = w.udp_replies()
    assert decode(reply).rCode == dns.ENAME
    assert w.link().queries() == []
    w.reactor.advance(1)
    w.ask_udp(make_query(name=b"nope.example"))
    assert w.udp_replies() == []
    assert len(w.device.links) == 2, "expired: asked again (on a new tunnel, the old one idled out at 60 s)"
    assert w.server.stats.queries["nxdomain"] == 2


def test_servfail_is_not_cached():
    """A resolver SERVFAIL is relayed and the next ask goes upstream again."""
    w = World()
    (first,) = _resolve_once(w, make_query(), rcode=dns.ESERVER)
    assert decode(first).rCode == dns.ESERVER
    w.ask_udp(make_query())
    assert len(w.link().queries()) == 1
    assert w.server.stats.cache_hits == 0


def test_forget_closes_the_tunnel_and_drops_the_cache():
    """forget(key): the device's tunnel is reset and its answers are gone."""
    w = World()
    _resolve_once(w, make_query())
    link = w.link()
    w.server.forget("phone1")
    assert link.transport.aborted
    assert w.server.cache.size() == 0
    w.ask_udp(make_query())
    assert len(w.device.links) == 2


def test_changed_upstream_for_the_same_key_redials_the_new_device():
    """A route whose proxy changed never reuses the old tunnel."""
    w = World()
    _resolve_once(w, make_query(name=b"a.example"))
    old = w.link()
    w.routes[CLIENT] = DNSRoute("phone1", Upstream.parse("socks5://192.0.2.30:1080"))
    w.ask_udp(make_query(name=b"a.example"))
    assert old.transport.aborted
    assert w.link().upstream.scheme == "socks5"


def test_forget_upstream_closes_every_key_served_through_it():
    """forget_upstream: what no client maps to any more is closed now, not at stop; others stay."""
    w = World()
    _resolve_once(w, make_query())
    link = w.link()
    w.server.forget_upstream(Upstream.parse("socks5://192.0.2.30:1080"))
    assert not link.transport.aborted and w.server.cache.size() == 1
    w.server.forget_upstream(HTTP_DEVICE)
    assert link.transport.aborted and w.server.cache.size() == 0


# --- truncation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("edns, limit", [(None, 512), (4096, 1232)])
def test_large_udp_answer_is_truncated_but_tcp_gets_it_whole(edns, limit):
    """Over the client's UDP limit: TC=1, question kept, no records (OPT kept with EDNS); TCP is complete."""
    w = World()
    (reply,) = _resolve_once(w, make_query(qid=5, edns=edns), count=100)
    m = decode(reply)
    assert len(reply) <= limit
    assert (m.id, m.trunc, m.answers, m.authority) == (5, 1, [], [])
    assert m.queries[0].name.name == b"WwW.Example.COM"
    assert [r.type for r in m.additional] == ([] if edns is None else [dns.OPT])
    assert w.server.stats.queries == {"truncated": 1}
    proto, transport = w.tcp()
    proto.dataReceived(framed(make_query(qid=6, edns=edns)))
    (full,) = unframe(transport.value())
    assert (decode(full).id, len(decode(full).answers), decode(full).trunc) == (6, 100, 0)


def test_edns_client_gets_a_midsize_answer_whole_over_udp():
    """Between 512 and the EDNS limit: no truncation for an EDNS client, truncation without EDNS."""
    w = World()
    (reply,) = _resolve_once(w, make_query(edns=1232), count=40)
    assert 512 < len(reply) <= 1232 and decode(reply).trunc == 0
    w.ask_udp(make_query())  # cached now, no EDNS
    (small,) = w.udp_replies()
    assert decode(small).trunc == 1


# --- TCP listener limits -----------------------------------------------------------------------------


def test_tcp_client_limit_and_idle_timeout():
    """Connections beyond max_tcp_clients are reset; idle ones are closed after tcp_idle_timeout."""
    w = World(max_tcp_clients=1, tcp_idle_timeout=10.0)
    proto, transport = w.tcp()
    _, second = w.tcp()
    assert second.disconnecting and w.server.stats.tcp_refused == 1
    w.reactor.advance(9)
    assert not transport.disconnecting
    w.reactor.advance(1)
    assert transport.disconnecting
    proto.connectionLost(None)
    assert w.server.stats.tcp_clients == 0


def test_sockets_held_counts_tcp_clients_and_a_tunnel_per_device():
    """What the proxy's fd-derived cap leaves room for (ProxyFactory.sockets_elsewhere)."""
    w = World()
    assert w.server.sockets_held() == 0
    w.tcp()
    w.tcp()
    w.ask_udp(make_query())  # phone1's resolver (one tunnel) now exists
    assert w.server.sockets_held() == 3


def test_tcp_connection_with_a_query_in_flight_is_not_idle():
    """The idle timer never closes a connection that still waits for an answer."""
    w = World(tcp_idle_timeout=2.0, query_timeout=5.0)
    proto, transport = w.tcp()
    proto.dataReceived(framed(make_query()))
    w.reactor.advance(2.5)
    assert not transport.disconnecting
    w.reactor.advance(2.5)  # timeout -> SERVFAIL written
    assert decode(unframe(transport.value())[0]).rCode == dns.ESERVER
    w.reactor.advance(2)
    assert transport.disconnecting


# --- logs and stats ----------------------------------------------------------------------------------


@pytest.mark.parametrize("log_names", [False, True])
def test_query_names_are_logged_only_when_asked(log_names):
    """Privacy: failure lines carry client and device, the name only with log_names."""
    w = World(log_names=log_names)
    w.ask_udp(make_query(name=b"secret-name.example"))
    w.link().d.errback(Unreachable("device proxy unreachable"))
    text = json.dumps([{k: str(v) for k, v in e.items()} for e in w.events])
    assert CLIENT in text
    assert ("secret-name" in text) is log_names


def test_snapshot_is_json_and_histogram_is_cumulative():
    """snapshot() round-trips through JSON; bucket counts never decrease and end at count."""
    w = World()
    w.ask_udp(make_query(), source=STRANGER)
    _resolve_once(w, make_query())
    snap = json.loads(json.dumps(w.server.stats.snapshot()))
    counts = list(snap["latency"]["buckets"].values())
    assert counts == sorted(counts) and counts[-1] == snap["latency"]["count"] == 2
    assert snap["queries"] == {"refused": 1, "ok": 1}
    assert snap["cache"] == {"hits": 0, "misses": 1} and snap["upstream"]["opened"] == 1


def test_stop_closes_tunnels_and_tcp_clients():
    """stop() fires, resets device tunnels and closes client connections."""
    w = World()
    proto, transport = w.tcp()
    _resolve_once(w, make_query())
    link = w.link()
    result_of(w.server.stop())
    assert link.transport.aborted and transport.disconnecting


# --- sockets -----------------------------------------------------------------------------------------


def test_bound_sockets_use_freebind_and_reuseaddr():
    """Both sockets carry IP_FREEBIND; TCP also SO_REUSEADDR and is listening."""
    try:
        udp = _bound_socket("127.0.0.1", 0, socket.SOCK_DGRAM)
        tcp = _bound_socket("127.0.0.1", 0, socket.SOCK_STREAM)
    except Exception as e:  # pragma: no cover - sandboxes without loopback
        pytest.skip("cannot bind loopback here: %s" % e)
    try:
        assert udp.getsockopt(socket.SOL_IP, IP_FREEBIND) == 1
        assert tcp.getsockopt(socket.SOL_IP, IP_FREEBIND) == 1
        assert tcp.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert tcp.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    finally:
        udp.close()
        tcp.close()


def test_bind_failure_names_address_and_port():
    """A port already taken raises CannotListenError naming address:port."""
    from twisted.internet.error import CannotListenError

    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        taken.bind(("127.0.0.1", 0))
    except OSError as e:  # pragma: no cover
        pytest.skip("cannot bind loopback here: %s" % e)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(CannotListenError, match="127.0.0.1:%d" % port):
            _bound_socket("127.0.0.1", port, socket.SOCK_DGRAM)
    finally:
        taken.close()


class _UDPClient(DatagramProtocol):
    def __init__(self):
        self.d = defer.Deferred()

    def datagramReceived(self, data, addr):
        self.d.callback(data)


class _TCPClient(Protocol):
    def __init__(self):
        self.d = defer.Deferred()
        self.buf = b""

    def dataReceived(self, data):
        self.buf += data
        if len(self.buf) >= 2 and len(self.buf) >= 2 + struct.unpack_from("!H", self.buf)[0]:
            self.d.callback(self.buf[2:])


@pytest_twisted.inlineCallbacks
def test_service_listens_on_udp_and_tcp_for_real():
    """DNSService binds 127.0.0.1 port 0 for both protocols; both answer (REFUSED: no route)."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    server = DNSServer(reactor, DNSSettings("127.0.0.1", 0), lambda ip: None, host_resolver=FakeHost())
    svc = DNSService(server)
    try:
        svc.privilegedStartService()
        svc.startService()
    except Exception as e:  # pragma: no cover
        pytest.skip("cannot listen on loopback here: %s" % e)
    client_port = None
    try:
        udp_client = _UDPClient()
        client_port = reactor.listenUDP(0, udp_client, interface="127.0.0.1")
        client_port.write(make_query(qid=21), ("127.0.0.1", server.udp_port.getHost().port))
        udp_reply = yield udp_client.d.addTimeout(5, reactor)
        assert (decode(udp_reply).id, decode(udp_reply).rCode) == (21, dns.EREFUSED)
        tcp_client = _TCPClient()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.tcp_port.getHost().port)
        proto = yield connectProtocol(endpoint, tcp_client)
        proto.transport.write(framed(make_query(qid=22)))
        tcp_reply = yield tcp_client.d.addTimeout(5, reactor)
        assert (decode(tcp_reply).id, decode(tcp_reply).rCode) == (22, dns.EREFUSED)
        proto.transport.loseConnection()
        assert ipaddress.ip_address(server.udp_port.getHost().host).is_loopback
    finally:
        if client_port is not None:
            yield client_port.stopListening()
        yield svc.stopService()


# --- fairness between customers (issue 14) -----------------------------------------------------


def test_tcp_connections_are_capped_per_client_and_others_still_connect():
    """One client holding its max_tcp_per_client connections is refused more (reset, counted,
    logged once); another client connects; a closed connection frees its slot."""
    w = World(max_tcp_per_client=2)
    held = [w.tcp(CLIENT) for _ in range(2)]
    refused = [w.tcp(CLIENT)[1] for _ in range(3)]
    assert all(t.disconnecting for t in refused) and not any(t.disconnecting for _, t in held)
    proto, other = w.tcp(OTHER)
    assert not other.disconnecting
    proto.dataReceived(framed(make_query(qid=5)))
    assert len(w.device.links) == 1, "bob's TCP query goes to the device"
    stats = w.server.stats.snapshot()["tcp"]
    assert stats == {"clients": 3, "refused": 3, "refused_by": {"per_client": 3}}
    lines = [e for e in w.events if e.get("event") == "dns-tcp-refused"]
    assert len(lines) == 1 and lines[0]["client"] == CLIENT and lines[0]["why"] == "per_client"
    held[0][0].connectionLost(None)
    _, again = w.tcp(CLIENT)
    assert not again.disconnecting


def test_the_global_tcp_cap_still_protects_the_process_with_one_line_for_all():
    """Past max_tcp_clients every source is refused; the log has one line for all of them."""
    w = World(max_tcp_clients=2, max_tcp_per_client=2)
    w.tcp(CLIENT)
    w.tcp(OTHER)
    refused = [w.tcp(source)[1] for source in (STRANGER, CLIENT, OTHER)]
    assert all(t.disconnecting for t in refused)
    assert w.server.stats.tcp_refused_by == {"full": 3}
    assert len([e for e in w.events if e.get("event") == "dns-tcp-refused"]) == 1


def test_defaults_leave_room_for_many_greedy_clients():
    """The shipped defaults: 16 per client, 4096 in all (256 greedy clients to fill it)."""
    s = DNSSettings("10.9.0.1")
    assert (s.max_tcp_per_client, s.max_tcp_clients) == (16, 4096)
    assert s.max_tcp_clients // s.max_tcp_per_client >= 256


def test_a_client_flooding_slow_names_gets_servfail_beyond_its_share_and_a_co_tenant_is_answered():
    """alice sends 200 distinct uncached names to the shared phone (none answered): beyond her
    share (320 // 2 = 160) she gets SERVFAIL at once, counted as over_share; bob, on the same
    phone, is sent at once and answered."""
    w = World()
    for i in range(200):
        w.ask_udp(make_query(name=b"slow%d.example" % i, qid=i))
    link = w.link().up()
    assert len(link.queries()) == 48, "alice alone: the in-flight window minus its reserve"
    quick = [decode(r) for r in w.udp_replies()]
    assert len(quick) == 40 and {m.rCode for m in quick} == {dns.ESERVER}
    assert w.server.stats.queries == {"over_share": 40}
    lines = [e for e in w.events if e.get("event") == "dns-over_share"]
    assert len(lines) == 1 and lines[0]["client"] == CLIENT, "one line for 40 refusals"
    w.ask_udp(make_query(name=b"bob.example", qid=7), source=OTHER)
    ((_, frame),) = link.queries()
    assert decode(frame).queries[0].name.name == b"bob.example"
    link.answer(frame)
    (reply,) = w.udp_replies()
    assert (decode(reply).id, decode(reply).rCode, len(decode(reply).answers)) == (7, dns.OK, 1)


def test_host_policy_has_the_same_per_client_share():
    """The host policy's resolver has no queue: alice may still hold only her share of it."""
    routes = {c: DNSRoute("phone1", None, policy="host") for c in (CLIENT, OTHER)}
    w = World(routes=routes, max_in_flight=4, max_queued=36)
    for i in range(25):
        w.ask_udp(make_query(name=b"h%d.example" % i, qid=i))
    assert len(w.host.queries) == 20
    assert len(w.udp_replies()) == 5 and w.server.stats.queries == {"over_share": 5}
    w.ask_udp(make_query(name=b"bob.example", qid=99), source=OTHER)
    assert w.host.queries[-1].name == b"bob.example"
    w.ask_udp(make_query(name=b"h-more.example", qid=100))
    assert w.host.queries[-1].name == b"bob.example", "with bob active her share is 40 // 3 = 13"
    for query, d in w.host.pending[:10] + w.host.pending[-1:]:
        d.callback(make_reply(make_query(name=query.name, qid=1)))
    w.ask_udp(make_query(name=b"h-again.example", qid=101))
    assert w.host.queries[-1].name == b"h-again.example", "answered queries free her share"


def test_failure_lines_are_throttled_and_say_how_many_were_suppressed():
    """Five refusals for one client: one line; ten seconds later the next line carries
    ``suppressed`` = 4 and says so in its text. Another client has its own line."""
    from twisted.logger import formatEvent

    w = World()
    for _ in range(5):
        w.ask_udp(make_query(), source=STRANGER)
    w.ask_udp(make_query(), source="10.9.0.98")
    assert [(e["client"], e["suppressed"]) for e in w.events] == [(STRANGER, 0), ("10.9.0.98", 0)]
    w.reactor.advance(10)
    w.ask_udp(make_query(), source=STRANGER)
    assert (w.events[-1]["client"], w.events[-1]["suppressed"]) == (STRANGER, 4)
    assert "(4 similar lines held back)" in formatEvent(w.events[-1])
    assert w.server.stats.queries == {"refused": 7}
