"""open_tunnel: the one way to reach a destination through a device (proxy, DNS resolvers, DoH endpoint).

A scripted dial hands out fake devices whose handshakes we fire; real HandshakeClients are
covered by test_upstream.
"""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from proxy.tunnel import open_tunnel
from proxy.upstream import Upstream
from proxy.upstreamerrors import Forbidden, Unreachable

UP = Upstream.parse("http://192.0.2.10:8080")


class Device:
    def __init__(self):
        self.transport = object()
        self.asked = []
        self.pending = None
        self.aborted = 0
        self.attached = None

    def handshake(self, host, port):
        self.asked.append((host, port))
        self.pending = defer.Deferred(lambda d: self.abort())
        return self.pending

    def attach(self, leg, first=b""):
        self.attached = (leg, first)

    def abort(self):
        self.aborted += 1


class Dial:
    def __init__(self):
        self.calls = []

    def __call__(self, reactor, upstream, connect_timeout, handshake_timeout):
        d = defer.Deferred()
        self.calls.append((upstream, connect_timeout, handshake_timeout, d))
        return d


def outcome(d):
    got = []
    d.addBoth(got.append)
    return got


def test_target_known_at_once_asks_as_soon_as_the_device_is_connected():
    dial, device = Dial(), Device()
    got = outcome(open_tunnel(Clock(), UP, ("example.com", 443), 7, 11, dial))
    assert [(c[1], c[2]) for c in dial.calls] == [(7, 11)]
    dial.calls[0][3].callback(device)
    assert device.asked == [("example.com", 443)] and got == []
    device.pending.callback(b"early bytes")
    (tunnel,) = got
    assert tunnel.transport is device.transport
    tunnel.attach("leg")
    assert device.attached == ("leg", b"early bytes")  # the leftover goes first, to the leg


def test_a_later_target_waits_for_both_and_the_dial_runs_meanwhile():
    """The proxy sniffs the name while the TCP connect runs; the device is asked once both are done."""
    dial, device = Dial(), Device()
    target = defer.Deferred()
    got = outcome(open_tunnel(Clock(), UP, target, 7, 11, dial))
    assert len(dial.calls) == 1  # dialling already
    dial.calls[0][3].callback(device)
    assert device.asked == []
    target.callback(("sni.example", 443))
    assert device.asked == [("sni.example", 443)]
    device.pending.callback(b"")
    assert len(got) == 1 and not isinstance(got[0], Failure)


def test_a_failed_dial_fails_at_once_even_before_the_name_is_known():
    dial = Dial()
    got = outcome(open_tunnel(Clock(), UP, defer.Deferred(), 7, 11, dial))
    dial.calls[0][3].errback(Unreachable("device proxy is unreachable: refused"))
    assert got[0].check(Unreachable)


def test_a_failed_handshake_fails_and_the_device_is_reset():
    dial, device = Dial(), Device()
    got = outcome(open_tunnel(Clock(), UP, ("example.com", 443), 7, 11, dial))
    dial.calls[0][3].callback(device)
    device.pending.errback(Forbidden("answered 403"))
    assert got[0].check(Forbidden) and device.aborted >= 1


def test_cancel_while_dialling_cancels_the_dial_and_a_late_device_is_reset():
    dial, device = Dial(), Device()
    d = open_tunnel(Clock(), UP, ("example.com", 443), 7, 11, dial)
    got = outcome(d)
    d.cancel()
    assert got[0].check(defer.CancelledError)
    assert dial.calls[0][3].called  # the dial Deferred was cancelled too
    late = Device()
    d = open_tunnel(Clock(), UP, ("example.com", 443), 7, 11, lambda *a: defer.succeed(late))
    later = outcome(d)
    d.cancel()
    assert later[0].check(defer.CancelledError) and late.aborted >= 1 and device.asked == []


def test_cancel_while_handshaking_resets_the_device():
    dial, device = Dial(), Device()
    d = open_tunnel(Clock(), UP, ("example.com", 443), 7, 11, dial)
    got = outcome(d)
    dial.calls[0][3].callback(device)
    d.cancel()
    assert got[0].check(defer.CancelledError) and device.aborted >= 1
