# -*- test-case-name: tests.unit.test_dns_upstream -*-
"""The explicit ``host`` DNS policy: this server's own resolvers, UDP with a TCP retry on
truncation, through ``twisted.names.client.Resolver``."""

from twisted.internet import defer
from twisted.names import client, dns

from proxy.dnserrors import DNSTimeout, DNSUnavailable

__all__ = ["HostResolver", "read_resolv_conf"]


def read_resolv_conf(path="/etc/resolv.conf"):
    """``nameserver`` entries as ``(host, 53)`` pairs; glibc's default 127.0.0.1 when none."""
    servers = []
    try:
        with open(path) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "nameserver":
                    servers.append((fields[1].split("%", 1)[0], 53))
    except OSError:
        pass
    return servers or [("127.0.0.1", 53)]


class HostResolver:
    """The ``host`` policy: this server's resolvers, over UDP, retried over TCP when truncated.

    :param servers: ``(host, port)`` pairs; empty means ``/etc/resolv.conf`` (read once, here).
    :param resolver: anything with ``queryUDP``/``queryTCP`` like ``twisted.names.client.Resolver``
        (tests inject a fake); built from ``servers`` when None.
    """

    def __init__(self, reactor, servers=(), query_timeout=5.0, resolver=None):
        self.reactor = reactor
        self.query_timeout = query_timeout
        if resolver is None:
            servers = list(servers) or read_resolv_conf()
            resolver = client.Resolver(servers=servers, reactor=reactor)
        self.resolver = resolver

    def query(self, query):
        """Resolve a :class:`proxy.dnsmessage.Query`; fires with reply bytes, fails like DeviceResolver."""
        question = [dns.Query(query.name, query.qtype, query.qclass)]
        # Two UDP tries within the budget; the overall timeout below is the real bound.
        d = self.resolver.queryUDP(question, timeout=(self.query_timeout / 2.5, self.query_timeout / 2.5))

        def truncated(message):
            if message.trunc:
                return self.resolver.queryTCP(question, timeout=self.query_timeout)
            return message

        def encoded(message):
            message.maxSize = 0
            return message.toStr()

        def failed(reason):
            if reason.check(defer.TimeoutError, defer.CancelledError, dns.DNSQueryTimeoutError):
                raise DNSTimeout("no DNS reply from the host resolver within %gs" % self.query_timeout)
            raise DNSUnavailable("host resolver failed: %s" % reason.getErrorMessage())

        d.addCallback(truncated)
        d.addTimeout(self.query_timeout, self.reactor)
        d.addCallbacks(encoded, failed)
        return d
