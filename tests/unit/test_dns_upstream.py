"""proxy.dnsupstream: DNS over TCP through a scripted device proxy, and the host policy's resolver.

The device side is a real HTTPConnectClient/Socks5Client on a StringTransport, so the CONNECT
and SOCKS5 bytes, the 2-byte framing and the ID rewriting are all checked on the wire (the
scripted device is ``tests/unit/dns_device.py``). Time is a MemoryReactorClock.
"""

import struct

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns

from proxy.dnsserver import DNSStats
from proxy.dnserrors import DNSTimeout, DNSUnavailable, Overloaded
from proxy.dnshost import HostResolver, read_resolv_conf
from proxy.dnsupstream import DeviceResolver
from proxy.upstreamerrors import Unreachable
from tests.unit.deferreds import failure_of, result_of
from tests.unit.dns_device import HTTP_DEVICE, SOCKS_DEVICE, Device
from tests.unit.dns_wire import decode, make_query, make_reply


def resolver(upstream=HTTP_DEVICE, **kw):
    # The controller's sessions give these fields (ovpnmgr.controller.Session.log_fields): a
    # "device" key among them must not clash with the resolver's own log fields.
    kw.setdefault("log_fields", {"user": "alice", "device": "phone", "vpn_ip": "10.9.0.2"})
    reactor, device, stats = MemoryReactorClock(), Device(), DNSStats()
    r = DeviceResolver(reactor, upstream, ("1.1.1.1", 53), stats=stats, dial=device.dial, **kw)
    return reactor, device, stats, r


def question(frame):
    return decode(frame).queries[0].name.name


@pytest.mark.parametrize("upstream", [HTTP_DEVICE, SOCKS_DEVICE])
def test_pipelined_queries_share_one_tunnel_and_answers_may_come_out_of_order(upstream):
    """Three queries queue during the dial, go out together with distinct IDs, and each gets its own answer."""
    reactor, device, stats, r = resolver(upstream)
    names = [b"a.example", b"b.example", b"c.example"]
    ds = [r.query(make_query(name=n, qid=0x1111)) for n in names]  # colliding client IDs
    assert len(device.links) == 1, "one dial for all three"
    link = device.links[0].up()
    sent = link.queries()
    assert [question(f) for _, f in sent] == names
    assert len({i for i, _ in sent}) == 3, "IDs are unique on the connection"
    for d in ds:
        assert not d.called
    for _, frame in reversed(sent):
        link.answer(frame)
    for (our_id, frame), d, name in zip(sent, ds, names):
        reply = result_of(d)
        assert reply[:2] == struct.pack("!H", our_id)
        assert question(reply) == name
    assert stats.upstream_opened == 1
    another = r.query(make_query(name=b"d.example"))
    assert len(device.links) == 1, "the open tunnel is reused"
    (_, frame), = link.queries()
    link.answer(frame)
    assert question(result_of(another)) == b"d.example"


def test_handshake_leftover_and_split_frames_are_reassembled():
    """A reply arriving byte by byte is reassembled by the 2-byte framing."""
    reactor, device, stats, r = resolver()
    d = r.query(make_query())
    link = device.links[0].up()
    (_, frame), = link.queries()
    reply = make_reply(frame)
    data = struct.pack("!H", len(reply)) + reply
    for i in range(len(data)):
        link.client.dataReceived(data[i : i + 1])
    assert result_of(d) == reply


def test_drop_retries_in_flight_once_then_servfail_and_next_query_reconnects():
    """A lost tunnel re-sends in-flight queries on a new one; lost again, they fail; later queries redial."""
    reactor, device, stats, r = resolver()
    d1, d2 = r.query(make_query(name=b"a.example")), r.query(make_query(name=b"b.example"))
    first = device.links[0].up()
    assert len(first.queries()) == 2
    first.drop()
    assert not d1.called and not d2.called
    assert len(device.links) == 2, "a fresh tunnel is dialled at once for the retries"
    second = device.links[1].up()
    resent = second.queries()
    assert [question(f) for _, f in resent] == [b"a.example", b"b.example"]
    second.answer(resent[0][1])
    assert question(result_of(d1)) == b"a.example"
    second.drop()
    failure_of(d2, DNSUnavailable)
    assert len(device.links) == 2, "no redial without pending queries"
    assert stats.upstream_closed["dropped"] == 2
    d3 = r.query(make_query(name=b"c.example"))
    assert len(device.links) == 3
    third = device.links[2].up()
    (_, frame), = third.queries()
    third.answer(frame)
    assert question(result_of(d3)) == b"c.example"


def test_dial_failure_fails_queued_queries_and_is_counted():
    """An unreachable device fails what waits, once; the next query dials again."""
    reactor, device, stats, r = resolver()
    ds = [r.query(make_query()) for _ in range(3)]
    device.links[0].d.errback(Unreachable("device proxy http://192.0.2.10:8080 is unreachable"))
    for d in ds:
        failure_of(d, DNSUnavailable)
    assert stats.upstream_failed == {"unreachable": 1}
    r.query(make_query())
    assert len(device.links) == 2


def test_query_timeout_then_a_silent_tunnel_is_dropped():
    """No reply within the timeout: DNSTimeout at exactly 5 s; a tunnel that heard nothing is abandoned."""
    reactor, device, stats, r = resolver(query_timeout=5.0)
    d = r.query(make_query())
    link = device.links[0].up()
    (_, frame), = link.queries()
    reactor.advance(4.99)
    assert not d.called
    reactor.advance(0.01)
    failure_of(d, DNSTimeout)
    assert link.transport.aborted, "a tunnel silent for a whole query timeout is reset"
    assert not r.connected
    link.drop()
    assert stats.upstream_closed == {"stale": 1}
    assert len(device.links) == 1, "nothing pending, nothing redialled"
    assert reactor.getDelayedCalls() == []


def test_timeout_of_one_query_keeps_a_tunnel_that_answers_others_and_late_replies_are_ignored():
    """A slow name does not kill a live tunnel; its late reply reaches nobody and its ID is not reused early."""
    reactor, device, stats, r = resolver(query_timeout=5.0)
    slow = r.query(make_query(name=b"slow.example"))
    link = device.links[0].up()
    (slow_id, slow_frame), = link.queries()
    reactor.advance(1)
    fast = r.query(make_query(name=b"fast.example"))
    (_, fast_frame), = link.queries()
    link.answer(fast_frame)
    result_of(fast)
    reactor.advance(4)
    failure_of(slow, DNSTimeout)
    assert not link.transport.aborted and r.connected
    later = r.query(make_query(name=b"later.example"))
    (later_id, later_frame), = link.queries()
    assert later_id != slow_id
    link.answer(slow_frame)  # late: ignored
    assert not later.called
    link.answer(later_frame)
    assert question(result_of(later)) == b"later.example"


def test_idle_tunnel_is_closed_and_counted():
    """With nothing pending for idle_timeout the tunnel is closed cleanly; a new query redials."""
    reactor, device, stats, r = resolver(idle_timeout=60.0)
    d = r.query(make_query())
    link = device.links[0].up()
    (_, frame), = link.queries()
    link.answer(frame)
    result_of(d)
    reactor.advance(59)
    assert not link.transport.disconnecting
    reactor.advance(1)
    assert link.transport.disconnecting and not link.transport.aborted
    link.drop()
    assert stats.upstream_closed == {"idle": 1}
    r.query(make_query())
    assert len(device.links) == 2


def test_in_flight_bound_queues_the_rest_and_overflow_is_refused():
    """At most max_in_flight on the wire; max_queued wait; beyond that Overloaded at once."""
    reactor, device, stats, r = resolver(max_in_flight=2, max_queued=1)
    ds = [r.query(make_query(name=b"n%d.example" % i)) for i in range(3)]
    failure_of(r.query(make_query()), Overloaded)
    link = device.links[0].up()
    sent = link.queries()
    assert len(sent) == 2
    link.answer(sent[0][1])
    result_of(ds[0])
    (_, third), = link.queries()
    assert question(third) == b"n2.example"


def test_close_fails_everything_and_resets_the_tunnel():
    """close() (device removed) answers pending queries with a failure and resets the connection."""
    reactor, device, stats, r = resolver()
    d = r.query(make_query())
    link = device.links[0].up()
    link.queries()
    r.close("forgotten")
    failure_of(d, DNSUnavailable)
    assert link.transport.aborted
    failure_of(r.query(make_query()), DNSUnavailable)
    assert reactor.getDelayedCalls() == []


def test_close_while_dialling_cancels_the_dial():
    """A dial in progress is cancelled, and the queued query fails."""
    reactor, device, stats, r = resolver()
    d = r.query(make_query())
    r.close()
    failure_of(d, DNSUnavailable)
    assert device.links[0].d.called, "the dial Deferred was cancelled"
    assert stats.upstream_failed == {}


# --- host policy ------------------------------------------------------------------------------------


class FakeHost:
    """Stands in for twisted.names.client.Resolver."""

    def __init__(self, udp, tcp=None):
        self.calls = []
        self._udp, self._tcp = udp, tcp

    def queryUDP(self, queries, timeout=None):
        self.calls.append(("udp", queries))
        return self._udp

    def queryTCP(self, queries, timeout=10):
        self.calls.append(("tcp", queries))
        return self._tcp


def _message(wire, trunc=0):
    m = decode(wire)
    m.trunc = trunc
    return m


def test_host_resolver_retries_truncated_udp_over_tcp():
    """UDP first; a TC reply is asked again over TCP, whose answer is returned encoded."""
    from proxy import dnsmessage

    q = dnsmessage.parse_query(make_query(name=b"Host.Example"))
    full = make_reply(make_query(name=b"Host.Example", qid=77), count=40)
    fake = FakeHost(defer.succeed(_message(make_reply(make_query(qid=77)), trunc=1)), defer.succeed(_message(full)))
    reply = result_of(HostResolver(MemoryReactorClock(), resolver=fake).query(q))
    assert [kind for kind, _ in fake.calls] == ["udp", "tcp"]
    assert fake.calls[0][1] == [dns.Query(b"Host.Example", dns.A, dns.IN)]
    assert len(decode(reply).answers) == 40


def test_host_resolver_timeout():
    """No answer within query_timeout: DNSTimeout, like the device path."""
    reactor = MemoryReactorClock()
    from proxy import dnsmessage

    d = HostResolver(reactor, query_timeout=5.0, resolver=FakeHost(defer.Deferred())).query(
        dnsmessage.parse_query(make_query())
    )
    reactor.advance(5)
    failure_of(d, DNSTimeout)


def test_read_resolv_conf(tmp_path):
    """nameserver lines only (scope IDs stripped); 127.0.0.1 when there are none."""
    path = tmp_path / "resolv.conf"
    path.write_text("# comment\nsearch lan\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\noptions ndots:1\n")
    assert read_resolv_conf(str(path)) == [("192.0.2.53", 53), ("fe80::1", 53)]
    path.write_text("search lan\n")
    assert read_resolv_conf(str(path)) == [("127.0.0.1", 53)]
    assert read_resolv_conf(str(tmp_path / "missing")) == [("127.0.0.1", 53)]


# --- fairness between the clients of one device (issue 14) -----------------------------------


def test_fair_share_leaves_room_for_one_more_client():
    """A lone client may hold half the device's queue, two a third each...; never under the floor."""
    from proxy.dnsqueue import MIN_SHARE, fair_share

    assert fair_share(320, 1) == 160 and fair_share(320, 2) == 106 and fair_share(320, 3) == 80
    assert fair_share(320, 100) == MIN_SHARE


def test_a_client_over_its_share_fails_at_once_and_a_co_tenant_still_gets_in():
    """max_in_flight 4 + max_queued 36 = 40: alice alone may hold 20; her 21st query is
    OverShare at once (not queued), bob's query is accepted and sent at once."""
    from proxy.dnserrors import OverShare

    reactor, device, stats, r = resolver(max_in_flight=4, max_queued=36)
    alice = [r.query(make_query(name=b"a%d.example" % i), owner="alice") for i in range(20)]
    link = device.links[0].up()
    assert len(link.queries()) == 3, "alice alone: window 4 minus the reserve of 1"
    failure_of(r.query(make_query(name=b"a20.example"), owner="alice"), OverShare)
    assert r.held("alice") == 20
    bob = r.query(make_query(name=b"bob.example"), owner="bob")
    ((_, frame),) = link.queries()
    assert question(frame) == b"bob.example", "bob is sent at once on the reserved slot"
    link.answer(frame)
    assert decode(result_of(bob)).answers
    assert r.held("bob") == 0 and r.pending() == 20
    for d in alice:
        d.addErrback(lambda f: None)


def test_queued_queries_are_sent_round_robin_between_clients():
    """alice queued 10 before bob asked 2: as the window frees, bob's go out before alice's backlog."""
    reactor, device, stats, r = resolver(max_in_flight=2, max_queued=100)
    for i in range(10):
        r.query(make_query(name=b"a%d.example" % i), owner="alice")
    for i in range(2):
        r.query(make_query(name=b"b%d.example" % i), owner="bob")
    link = device.links[0].up()
    first = link.queries()
    assert [question(f) for _, f in first] == [b"a0.example", b"b0.example"]
    order = []
    for _ in range(4):
        _, frame = first.pop(0)
        link.answer(frame)
        first += link.queries()
        order += [question(f) for _, f in first[-1:]]
    assert order[:3] == [b"a1.example", b"b1.example", b"a2.example"], order


def test_a_full_device_evicts_the_newest_query_of_the_client_most_over_its_share():
    """40 slots held by three clients (20 + 13 + 7): a fourth client's query takes the place of
    the newest queued query of the biggest holder, which fails at once as OverShare."""
    from proxy.dnserrors import OverShare

    reactor, device, stats, r = resolver(max_in_flight=2, max_queued=38)
    held = {}
    for owner, n in (("a", 20), ("c", 13), ("d", 7)):
        held[owner] = [r.query(make_query(name=b"%s%d.example" % (owner.encode(), i)), owner=owner) for i in range(n)]
    assert r.pending() == 40
    newcomer = r.query(make_query(name=b"new.example"), owner="b")
    assert not newcomer.called
    failure_of(held["a"][-1], OverShare)
    assert [d.called for d in held["a"][:-1]] == [False] * 19
    assert (r.held("a"), r.held("b"), r.pending()) == (19, 1, 40)
    for ds in held.values():
        for d in ds:
            d.addErrback(lambda f: None)
    newcomer.addErrback(lambda f: None)


def test_dial_failure_lines_are_throttled_with_a_suppressed_count():
    """A phone that refuses every dial logs one line per 10 s, the next saying how many were held back."""
    from twisted.logger import Logger, formatEvent

    reactor, device, stats, r = resolver()
    events = []
    r._log = Logger(observer=events.append)
    for _ in range(5):
        d = r.query(make_query())
        device.links[-1].d.errback(Unreachable("phone is off"))
        failure_of(d, DNSUnavailable)
    assert len(events) == 1 and events[0]["suppressed"] == 0
    reactor.advance(10)
    d = r.query(make_query())
    device.links[-1].d.errback(Unreachable("phone is off"))
    failure_of(d, DNSUnavailable)
    assert len(events) == 2 and events[1]["suppressed"] == 4
    assert "(4 similar lines held back)" in formatEvent(events[1])
    assert stats.upstream_failed == {"unreachable": 6}
