# -*- test-case-name: tests.unit.test_server -*-
"""The proxy as a Twisted service: listeners plus the timeout sweeper.

Binding happens in ``privilegedStartService`` so a port that cannot be bound
stops the daemon at startup with a clear message instead of leaving it running
without a data path (admitted clients would then only get RSTs).
"""

from twisted.application import service
from twisted.logger import Logger

from proxy.server import SweepLoop, is_unavailable_family, listen


class ProxyService(service.Service):
    """Listens on ``port`` at each of ``addresses`` with ``factory``.

    :param optional: addresses whose family may be missing on this host (the
        default ``::``): a warning instead of a failure when IPv6 is disabled.
    """

    _log = Logger()

    def __init__(self, reactor, factory, port, addresses=("0.0.0.0", "::"), optional=(), transparent=False):
        self.reactor = reactor
        self.factory = factory
        self.port = port
        self.addresses = tuple(addresses)
        self.optional = frozenset(optional)
        self.transparent = transparent
        self.ports = []
        self._sweeper = SweepLoop(factory)

    def privilegedStartService(self):
        from twisted.internet.error import CannotListenError

        for address in self.addresses:
            try:
                self.ports += listen(self.reactor, self.factory, self.port, (address,), transparent=self.transparent)
            except CannotListenError as e:
                if address in self.optional and is_unavailable_family(e):
                    self._log.warn("proxy not listening on {address}: {error}", address=address, error=e.socketError)
                    continue
                for p in self.ports:
                    p.stopListening()
                self.ports = []
                raise
        for p in self.ports:
            host = p.getHost()
            self._log.info(
                "transparent proxy listening on {host}:{port} ({mode}, max {limit} connections)",
                host=host.host,
                port=host.port,
                mode="tproxy" if self.transparent else "redirect",
                limit=self.factory.max_connections,
            )
        service.Service.privilegedStartService(self)

    def startService(self):
        service.Service.startService(self)
        self._sweeper.start()

    def stopService(self):
        from twisted.internet import defer

        service.Service.stopService(self)
        self._sweeper.stop()
        ports, self.ports = self.ports, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])
