# -*- test-case-name: tests.unit.test_dns_doh -*-
"""A Twisted client endpoint whose connections run through a device's CONNECT/SOCKS5 proxy.

Anything that speaks to an ``IStreamClientEndpoint`` (``wrapClientTLS``, ``Agent``) can then
reach a host *from the device's network*: the device resolves the name and opens the TCP
connection, this server only talks to the device. Failures are the typed
:class:`proxy.upstreamerrors.UpstreamError` of :func:`proxy.upstream.dial` and the handshake.
"""

from twisted.internet import error
from twisted.internet.address import HostnameAddress
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

from proxy.tunnel import open_tunnel
from proxy.upstream import dial

__all__ = ["TunnelEndpoint"]


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """Connects to ``host``:``port`` through ``upstream``.

    :param on_open: called with no arguments when a tunnel is established (for counters).
    :param on_close: called with the ``connectionLost`` reason of an established tunnel.
    :param close_grace: seconds a protocol closing gracefully (TLS close_notify) waits for the
        far side to agree before its tunnel is aborted: a phone that lost signal never answers,
        and the tunnel would hold its descriptor until the phone's own TCP gave up.
    :param dial: :func:`proxy.upstream.dial`; tests pass a scripted one.
    """

    def __init__(self, reactor, upstream, host, port, connect_timeout, handshake_timeout,
                 on_open=None, on_close=None, close_grace=5.0, dial=dial):
        self.reactor = reactor
        self.upstream = upstream
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self._on_open = on_open
        self._on_close = on_close
        self.close_grace = close_grace
        self._dial = dial
        self._legs = set()

    def abort_all(self):
        """Reset every open tunnel at once (the resolver is closing: nothing is waited for)."""
        for leg in list(self._legs):
            leg.device.abort()

    def connect(self, factory):
        """IStreamClientEndpoint.connect: fires with the protocol, or an UpstreamError.

        Cancelling the Deferred before it fires aborts the dial or the handshake.
        """
        address = HostnameAddress(self.host.encode("idna"), self.port)

        def established(tunnel):
            protocol = factory.buildProtocol(address)
            if protocol is None:
                tunnel.abort()
                raise error.ConnectingCancelledError(address)
            leg = _Leg(self, protocol, tunnel.device)
            self._legs.add(leg)
            graceful = getattr(protocol, "loseConnection", None)  # plain protocols have none

            def lose_connection():
                # A TLS protocol's graceful close waits for the far side's close_notify and only
                # then closes its transport: its own loseConnection is the only sign it began.
                leg.closing()
                return graceful()

            if graceful is not None:
                protocol.loseConnection = lose_connection
            protocol.makeConnection(tunnel.transport)
            tunnel.attach(leg)
            if self._on_open is not None:
                self._on_open()
            return protocol

        target = (self.host, self.port)
        d = open_tunnel(self.reactor, self.upstream, target, self.connect_timeout, self.handshake_timeout, self._dial)
        return d.addCallback(established)


class _Leg:
    """Receives the device connection's events for a protocol that knows nothing of half-close.

    A FIN from the far side ends the exchange (the protocol sees ``connectionLost`` once the
    connection is closed), as a plain Twisted TCP connection would behave.
    """

    def __init__(self, endpoint, protocol, device):
        self.endpoint = endpoint
        self.protocol = protocol
        self.device = device
        self.deadline = None
        self.dataReceived = protocol.dataReceived  # one hop per chunk

    def closing(self):
        """The protocol began a graceful close: abort the tunnel if it has not ended in time."""
        if self.deadline is None and self in self.endpoint._legs:
            self.deadline = self.endpoint.reactor.callLater(self.endpoint.close_grace, self.device.abort)

    def readConnectionLost(self):
        self.device.transport.loseConnection()

    def writeConnectionLost(self):
        self.device.abort()

    def connectionLost(self, reason):
        self.endpoint._legs.discard(self)
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        try:
            self.protocol.connectionLost(reason)
        finally:
            if self.endpoint._on_close is not None:
                self.endpoint._on_close(reason)
