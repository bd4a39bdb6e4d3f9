"""proxy.probe: one health probe through a device's proxy, and kept tunnels (scripted dial, the
proxy tests' FakeDevice on a StringTransport)."""

import ipaddress

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from proxy.probe import ProbeFailed, Prober, ProbeTarget, exit_address, parse_answer, probe
from proxy.upstream import Upstream
from proxy.upstreamerrors import Unreachable
from tests.unit.proxy_world import FakeDevice as Device

UP = Upstream.parse("http://192.0.2.10:8080")
WHOAMI = ProbeTarget.parse("http://origin.test/whoami")


class Dial:
    def __init__(self):
        self.calls = []

    def __call__(self, reactor, upstream, connect_timeout, handshake_timeout):
        d = defer.Deferred()
        self.calls.append(d)
        return d


def started(target=WHOAMI, timeout=10.0):
    clock, dial, device = Clock(), Dial(), Device()
    got = []
    probe(clock, UP, target, timeout, dial=dial).addBoth(got.append)
    return clock, dial, device, got


def connect(clock, dial, device, after=0.3):
    clock.advance(after)
    dial.calls[0].callback(device)
    device.pending.callback(b"")


def test_targets_parse_with_default_ports_and_refuse_what_cannot_work():
    assert ProbeTarget.parse("http://origin.test/whoami") == ProbeTarget("http", "origin.test", 80, "/whoami")
    assert ProbeTarget.parse("https://api.example/") == ProbeTarget("https", "api.example", 443, "/")
    assert ProbeTarget.parse("http://[2001:db8::1]:8080") == ProbeTarget("http", "2001:db8::1", 8080, "/")
    assert ProbeTarget.parse("tcp://1.1.1.1:53") == ProbeTarget("tcp", "1.1.1.1", 53)
    assert str(ProbeTarget.parse("http://[2001:db8::1]:8080/ip?x=1")) == "http://[2001:db8::1]:8080/ip?x=1"
    for bad in ("ftp://x/", "tcp://host", "http://user:pw@host/", "http:///nohost", "http://h:99999/", 5):
        with pytest.raises(ValueError):
            ProbeTarget.parse(bad)


def test_an_http_probe_asks_through_the_device_and_reports_rtt_and_exit_address():
    clock, dial, device, got = started()
    connect(clock, dial, device)
    assert device.handshakes == [("origin.test", 80)]
    request = device.transport.value()
    assert request.startswith(b"GET /whoami HTTP/1.1\r\nHost: origin.test\r\n") and request.endswith(b"\r\n\r\n")
    clock.advance(0.2)
    device.leg.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n203.0.113.2\n")
    (result,) = got
    assert result.exit_address == ipaddress.ip_address("203.0.113.2") and result.status == 200
    assert result.rtt == pytest.approx(0.5)
    assert device.transport.disconnecting  # done with it at once, no wait for the server's close


def test_an_answer_without_length_ends_with_the_connection():
    clock, dial, device, got = started()
    connect(clock, dial, device)
    device.leg.dataReceived(b"HTTP/1.0 200 OK\r\n\r\n2001:db8:113::2")
    assert got == []
    device.leg.connectionLost(Failure(Exception("closed")))
    assert got[0].exit_address == ipaddress.ip_address("2001:db8:113::2")


def test_any_http_answer_proves_the_device_carried_it_even_without_an_address():
    clock, dial, device, got = started()
    connect(clock, dial, device)
    device.leg.dataReceived(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot here!")
    assert got[0].status == 404 and got[0].exit_address is None


def test_a_refusing_device_fails_the_probe_with_its_kind():
    clock, dial, device, got = started()
    dial.calls[0].callback(device)
    device.pending.errback(Unreachable("device proxy refused"))
    assert isinstance(got[0].value, ProbeFailed) and got[0].value.kind == "unreachable"


def test_a_silent_device_fails_at_the_timeout_and_the_dial_is_cancelled():
    clock, dial, device, got = started(timeout=10.0)
    clock.advance(9.9)
    assert got == []
    clock.advance(0.2)
    assert got[0].value.kind == "timeout" and "10s" in str(got[0].value)
    assert dial.calls[0].called  # cancelled: a later device is never used


def test_a_target_that_stays_silent_after_the_tunnel_fails_at_the_timeout():
    clock, dial, device, got = started(timeout=10.0)
    connect(clock, dial, device, after=1.0)
    clock.advance(9.1)
    assert got[0].value.kind == "timeout"
    assert device.transport.disconnecting


def test_a_connection_closed_before_an_answer_and_garbage_are_failures():
    clock, dial, device, got = started()
    connect(clock, dial, device)
    device.leg.connectionLost(Failure(Exception("reset")))
    assert got[0].value.kind == "closed"
    clock, dial, device, got = started()
    connect(clock, dial, device)
    device.leg.dataReceived(b"SSH-2.0-OpenSSH\r\n\r\n")
    device.leg.connectionLost(Failure(Exception("closed")))
    assert got[0].value.kind == "answer"


def test_a_huge_answer_is_cut_and_still_counts():
    clock, dial, device, got = started()
    connect(clock, dial, device)
    device.leg.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 100_000)
    assert got[0].status == 200 and got[0].exit_address is None


def test_a_tcp_target_succeeds_once_the_tunnel_is_open():
    target = ProbeTarget.parse("tcp://198.51.100.53:53")
    clock, dial, device, got = started(target)
    connect(clock, dial, device, after=0.4)
    assert device.handshakes == [("198.51.100.53", 53)]
    assert got[0].rtt == pytest.approx(0.4) and got[0].exit_address is None
    assert device.aborted  # the tunnel is not kept


def test_answer_parsing():
    assert parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef") == (200, b"abc")
    with pytest.raises(ValueError):
        parse_answer(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(ValueError):
        parse_answer(b"HTTP/1.1 2000 OK\r\n\r\n")
    assert exit_address(b" 203.0.113.9\r\n") == ipaddress.ip_address("203.0.113.9")
    assert exit_address(b"<html>203.0.113.9</html>") is None
    assert exit_address(b"\xff\xfe") is None


def kept_world():
    clock, dial = Clock(), Dial()
    prober = Prober(dial=dial)
    return clock, dial, prober


def ask(prober, clock, fresh=False, target=WHOAMI, key="phone"):
    got = []
    prober(clock, UP, target, 10.0, fresh=fresh, key=key).addBoth(got.append)
    return got


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n203.0.113.2\n"


def test_a_kept_tunnel_carries_the_next_probe_as_one_request():
    clock, dial, prober = kept_world()
    got = ask(prober, clock)
    device = Device()
    connect(clock, dial, device)
    device.leg.dataReceived(OK)
    assert got[0].fresh and prober.kept == 1 and not device.transport.disconnecting
    device.transport.clear()
    got = ask(prober, clock)
    assert len(dial.calls) == 1  # no new dial
    assert device.transport.value().startswith(b"GET /whoami HTTP/1.1\r\n")
    clock.advance(0.6)
    device.leg.dataReceived(OK.replace(b"203.0.113.2", b"203.0.113.9"))
    assert not got[0].fresh and got[0].rtt == pytest.approx(0.6) and str(got[0].exit_address) == "203.0.113.9"


def test_fresh_is_a_new_tunnel_and_the_old_one_is_closed():
    clock, dial, prober = kept_world()
    ask(prober, clock)
    first = Device()
    connect(clock, dial, first)
    first.leg.dataReceived(OK)
    got = ask(prober, clock, fresh=True)
    assert first.transport.disconnecting and len(dial.calls) == 2
    second = Device()
    dial.calls[1].callback(second)
    second.pending.callback(b"")
    second.leg.dataReceived(OK)
    assert got[0].fresh and prober.kept == 1


def test_a_tunnel_closed_while_kept_is_replaced_and_close_delimited_answers_are_not_kept():
    clock, dial, prober = kept_world()
    ask(prober, clock)
    device = Device()
    connect(clock, dial, device)
    device.leg.dataReceived(OK)
    device.leg.connectionLost(Failure(Exception("idle timeout at the target")))
    got = ask(prober, clock)
    assert len(dial.calls) == 2  # a fresh one, not a failure
    other = Device()
    dial.calls[1].callback(other)
    other.pending.callback(b"")
    other.leg.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 12\r\n\r\n203.0.113.2\n")
    assert got[0].status == 200 and prober.kept == 0 and other.transport.disconnecting


def test_chunked_answers_end_at_their_last_chunk():
    clock, dial, prober = kept_world()
    got = ask(prober, clock)
    device = Device()
    connect(clock, dial, device)
    device.leg.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nc\r\n203.0.113.2\n\r\n")
    assert got == []
    device.leg.dataReceived(b"0\r\n\r\n")
    assert str(got[0].exit_address) == "203.0.113.2" and prober.kept == 1


def test_a_kept_tunnel_that_stays_silent_times_out_and_is_dropped():
    clock, dial, prober = kept_world()
    ask(prober, clock)
    device = Device()
    connect(clock, dial, device)
    device.leg.dataReceived(OK)
    got = ask(prober, clock)
    clock.advance(10.1)
    assert got[0].value.kind == "timeout" and device.transport.disconnecting and prober.kept == 0


def test_unasked_bytes_on_a_kept_tunnel_close_it_and_forget_closes_it_too():
    clock, dial, prober = kept_world()
    ask(prober, clock)
    device = Device()
    connect(clock, dial, device)
    device.leg.dataReceived(OK)
    device.leg.dataReceived(b"surprise")
    assert device.transport.disconnecting
    clock, dial, prober = kept_world()
    ask(prober, clock)
    device = Device()
    connect(clock, dial, device)
    device.leg.dataReceived(OK)
    prober.forget("phone")
    assert device.transport.disconnecting and prober.kept == 0


def test_tcp_targets_and_probes_without_a_key_keep_nothing():
    clock, dial, prober = kept_world()
    ask(prober, clock, key=None)
    device = Device()
    connect(clock, dial, device)
    device.leg.dataReceived(OK)
    assert prober.kept == 0 and device.transport.disconnecting
