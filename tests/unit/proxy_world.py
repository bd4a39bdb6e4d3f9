"""A ProxyFactory world for the unit tests: the accepted side is a :class:`Transport`
(StringTransport recording aborts), the device side a scripted :class:`FakeDevice` standing in
for ``proxy.upstream.HandshakeClient``, time a MemoryReactorClock.

Shared by ``test_server.py``, ``test_fuzz_sniff.py`` and ``test_dns_upstream.py``. Helpers, not tests.
"""

import ipaddress

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from proxy.localaddr import LocalAddresses
from proxy.mappings import MappingTable
from proxy.server import ProxyFactory, ProxySettings
from proxy.upstream import Upstream

DEVICE = Upstream.parse("http://dev:s3cret-pw@192.0.2.10:8080")
CLIENT = "10.9.0.5"
DEST = ipaddress.ip_address("93.184.216.34")


class Transport(StringTransport):
    """StringTransport that records aborts (RST) separately from clean closes."""

    aborted = False

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()


class FakeDevice:
    """Stands in for proxy.upstream.HandshakeClient."""

    def __init__(self):
        self.transport = Transport()
        self.handshakes = []
        self.pending = None
        self.leg = None
        self.aborted = False

    def handshake(self, host, port):
        self.handshakes.append((host, port))
        self.pending = defer.Deferred()
        return self.pending

    def attach(self, leg, first=b""):
        self.leg = leg
        if first:
            leg.dataReceived(first)

    def abort(self):
        self.aborted = True


class World:
    def __init__(self, **settings):
        self.reactor = MemoryReactorClock()
        self.mappings = MappingTable()
        self.mappings.add(CLIENT, DEVICE, owner="s1")
        self.dials = []
        self.destination = (DEST, 443)
        self.factory = ProxyFactory(
            self.reactor,
            self.mappings,
            ProxySettings(**settings),
            destination_of=lambda transport: self.destination,
            local=LocalAddresses(read=lambda: {ipaddress.ip_address("10.9.0.1"), ipaddress.ip_address("192.0.2.1")}),
            dial=self._dial,
        )

    def _dial(self, reactor, upstream, connect_timeout, handshake_timeout):
        d = defer.Deferred()
        self.dials.append((upstream, d))
        return d

    def accept(self, source=CLIENT, port=443, host=("10.9.0.1", 12345)):
        self.destination = (self.destination[0], port)
        proto = self.factory.buildProtocol(None)
        transport = Transport(hostAddress=IPv4Address("TCP", *host), peerAddress=IPv4Address("TCP", source, 40000))
        proto.makeConnection(transport)
        return proto, transport

    def connect_device(self, index=-1):
        device = FakeDevice()
        self.dials[index][1].callback(device)
        return device
