"""Idle and keepalive defaults against an SSH-style session, with a fake clock (issue 6, item 2).

An interactive session over a cellular WAN can sit silent for many minutes. Under the default
:class:`proxy.settings.ProxySettings` (idle_timeout 3600 s, half_closed_timeout 60 s,
keepalive 120 s) the sweeper (:class:`proxy.server.SweepLoop`, every ``sweep_interval`` s, calling
``Relay.check_timeouts``) must leave such a session alone for 10 minutes and more, and close it
only once it has been silent past ``idle_timeout``. Dead peers are the kernel's job: keepalive
(120 s idle, then 4 probes 30 s apart) finds them after ~4 minutes without any byte of payload.

The real ProxyFactory, ProxyConnection, Relay and SweepLoop run on a MemoryReactorClock; the
accepted side and the device side are in-memory transports; the device handshake is scripted.
The emulated-WAN counterpart (a real session idle across 300 ± 100 ms and 3 % loss) is
``tests/integration/test_wan.py``.
"""

import ipaddress
import socket

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from ovpnmgr.config import ProxyConfig
from proxy.localaddr import LocalAddresses
from proxy.mappings import MappingTable
from proxy.server import ProxyFactory, ProxySettings, SweepLoop, tune_socket
from proxy.upstream import Upstream

DEVICE = Upstream.parse("http://192.0.2.10:8080")
CLIENT = "10.9.0.5"
ORIGIN = ipaddress.ip_address("203.0.113.10")
MINUTE = 60.0


class Transport(StringTransport):
    """An accepted/dialled socket in memory: records RSTs; keepalive lands on a real, unconnected socket."""

    aborted = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.nodelay = False

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()

    def setTcpNoDelay(self, enabled):
        self.nodelay = enabled

    def getHandle(self):
        return self.sock


class FakeDevice:
    """The device proxy after connect: a handshake Deferred we fire, and the relay's upstream leg."""

    def __init__(self):
        self.transport = Transport()
        self.pending = None
        self.leg = None

    def handshake(self, host, port):
        self.pending = defer.Deferred()
        return self.pending

    def attach(self, leg, first=b""):
        self.leg = leg
        if first:
            leg.dataReceived(first)

    def abort(self):
        self.transport.abortConnection()


class Harness:
    """A ProxyFactory with its SweepLoop running on a fake clock."""

    def __init__(self, settings=None):
        self.clock = MemoryReactorClock()
        self.settings = settings or ProxySettings()
        self.mappings = MappingTable()
        self.mappings.add(CLIENT, DEVICE, owner="s1")
        self.devices = []
        self.factory = ProxyFactory(
            self.clock,
            self.mappings,
            self.settings,
            destination_of=lambda transport: (ORIGIN, 22),
            local=LocalAddresses(read=lambda: {ipaddress.ip_address("10.9.0.1")}),
            dial=self._dial,
        )
        self.sweeper = SweepLoop(self.factory)
        self.sweeper.start()

    def _dial(self, reactor, upstream, connect_timeout, handshake_timeout):
        device = FakeDevice()
        self.devices.append(device)
        return defer.succeed(device)

    def ssh_session(self):
        """Accept a port-22 connection (server-first, not sniffed) and finish the device handshake."""
        proto = self.factory.buildProtocol(None)
        client = Transport(
            hostAddress=IPv4Address("TCP", "10.9.0.1", 12345), peerAddress=IPv4Address("TCP", CLIENT, 40000)
        )
        proto.makeConnection(client)
        device = self.devices[-1]
        device.pending.callback(b"")
        assert proto.relay is not None
        # The server speaks first, the client answers: the session is up and has carried bytes.
        device.leg.dataReceived(b"SSH-2.0-origin\r\n")
        proto.dataReceived(b"SSH-2.0-client\r\n")
        return proto, client, device

    def wait(self, seconds, step=1.0):
        """Advance the clock in ``step`` s increments (the LoopingCall sweeps on its own schedule)."""
        elapsed = 0.0
        while elapsed < seconds:
            self.clock.advance(min(step, seconds - elapsed))
            elapsed += step


@pytest.fixture
def logs():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def _text(events):
    return "\n".join(formatEvent(e) for e in events)


def test_defaults_are_the_wan_safe_ones():
    """The premise of the other tests: what the daemon runs with when the config says nothing."""
    for settings in (ProxySettings(), ProxyConfig()):
        assert settings.idle_timeout == 3600.0
        assert settings.half_closed_timeout == 60.0
        assert settings.keepalive == 120
        assert settings.sweep_interval == 5.0


def test_ssh_session_idle_for_ten_minutes_is_not_closed(logs):
    """Silent both ways for 10 min (and 59): 720 sweeps later the session is intact and relays again."""
    h = Harness()
    proto, client, device = h.ssh_session()
    h.wait(10 * MINUTE)
    assert not client.aborted and not device.transport.aborted
    assert h.factory.stats.closed == {}
    h.wait(49 * MINUTE)
    assert not client.aborted and not device.transport.aborted
    # A keystroke and its echo after an hour minus a minute of silence still go through.
    before_up, before_down = device.transport.value(), client.value()
    proto.dataReceived(b"ls\n")
    device.leg.dataReceived(b"ls\r\nfile\r\n")
    assert device.transport.value() == before_up + b"ls\n"
    assert client.value() == before_down + b"ls\r\nfile\r\n"
    assert "on timeout" not in _text(logs)
    h.sweeper.stop()


def test_session_idle_past_idle_timeout_is_closed(logs):
    """Silent for idle_timeout (3600 s): the next sweep RSTs both sides, counts it and logs it."""
    h = Harness()
    proto, client, device = h.ssh_session()
    h.wait(3600 - 10)
    assert not client.aborted
    h.wait(10 + h.settings.sweep_interval)
    assert client.aborted and device.transport.aborted
    assert h.factory.stats.closed == {"idle": 1}
    assert "closed 1 proxied connections on timeout" in _text(logs)
    proto.connectionLost(Failure(Exception("aborted")))
    device.leg.connectionLost(Failure(Exception("aborted")))
    assert h.factory.stats.active == 0
    h.sweeper.stop()


def test_any_byte_restarts_the_idle_clock():
    """50 min silent, one keepalive-ish byte from the server, 50 min silent again: still open (100 min total)."""
    h = Harness()
    proto, client, device = h.ssh_session()
    h.wait(50 * MINUTE, step=5.0)
    device.leg.dataReceived(b"\0")  # e.g. an SSH ServerAliveInterval message
    h.wait(50 * MINUTE, step=5.0)
    assert not client.aborted and h.factory.stats.closed == {}
    h.wait(10 * MINUTE + 5, step=5.0)
    assert client.aborted and h.factory.stats.closed == {"idle": 1}
    h.sweeper.stop()


def test_half_closed_session_with_a_slow_reply_is_not_cut():
    """The client sent FIN; the server keeps replying every 50 s for 10 min: half_closed (60 s) counts
    from the last byte, so nothing is cut; 60 s after the last reply it is."""
    h = Harness()
    proto, client, device = h.ssh_session()
    proto.readConnectionLost()
    for _ in range(12):
        h.wait(50, step=5.0)
        device.leg.dataReceived(b"more output\n")
    assert not client.aborted and h.factory.stats.closed == {}
    h.wait(60 + h.settings.sweep_interval, step=5.0)
    assert client.aborted and h.factory.stats.closed == {"half-closed": 1}
    h.sweeper.stop()


def test_keepalive_is_set_on_both_legs_with_the_default():
    """Both sockets get SO_KEEPALIVE, 120 s idle, 30 s interval, 4 probes: a dead peer is found after
    120 + 4 × 30 = 240 s, long before idle_timeout, without touching a live silent session."""
    h = Harness()
    proto, client, device = h.ssh_session()
    for transport in (client, device.transport):
        sock = transport.sock
        assert transport.nodelay
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 120
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 30
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
        sock.close()
    detect = 120 + 4 * 30
    assert detect < h.settings.idle_timeout
    h.sweeper.stop()


def test_shortened_keepalive_as_in_the_wan_test():
    """keepalive: 10 (what tests/integration/test_wan.py configures): 10 s idle, probes every 2 s."""
    t = Transport()
    tune_socket(t, 10)
    assert t.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10
    assert t.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 2
    t.sock.close()
