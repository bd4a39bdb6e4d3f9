"""proxy.probe: one health probe through a device's proxy (scripted dial, StringTransport)."""

import ipaddress

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from proxy.probe import ProbeFailed, ProbeTarget, exit_address, parse_answer, probe
from proxy.upstream import Upstream
from proxy.upstreamerrors import Unreachable

UP = Upstream.parse("http://192.0.2.10:8080")
WHOAMI = ProbeTarget.parse("http://origin.test/whoami")


class Device:
    """A device connection whose handshake the test fires and whose bytes it reads."""

    def __init__(self):
        self.transport = StringTransport()
        self.asked = []
        self.pending = None
        self.leg = None
        self.aborted = 0

    def handshake(self, host, port):
        self.asked.append((host, port))
        self.pending = defer.Deferred(lambda d: self.abort())
        return self.pending

    def attach(self, leg, first=b""):
        self.leg = leg
        if first:
            leg.dataReceived(first)

    def abort(self):
        self.aborted += 1


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
    assert device.asked == [("origin.test", 80)]
    request = device.transport.value()
    assert request.startswith(b"GET /whoami HTTP/1.0\r\nHost: origin.test\r\n") and request.endswith(b"\r\n\r\n")
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
    assert device.asked == [("198.51.100.53", 53)]
    assert got[0].rtt == pytest.approx(0.4) and got[0].exit_address is None
    assert device.aborted == 1  # the tunnel is not kept


def test_answer_parsing():
    assert parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef") == (200, b"abc")
    with pytest.raises(ValueError):
        parse_answer(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(ValueError):
        parse_answer(b"HTTP/1.1 2000 OK\r\n\r\n")
    assert exit_address(b" 203.0.113.9\r\n") == ipaddress.ip_address("203.0.113.9")
    assert exit_address(b"<html>203.0.113.9</html>") is None
    assert exit_address(b"\xff\xfe") is None
