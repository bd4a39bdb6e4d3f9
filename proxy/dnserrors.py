# -*- test-case-name: tests.unit.test_dns_upstream -*-
"""Why a customer's DNS query got no answer from upstream: each becomes a SERVFAIL, never a
fallback to another path (the device's resolver, DoH or the host's resolvers alike)."""

__all__ = ["DNSUnavailable", "DNSTimeout", "Overloaded", "OverShare"]


class DNSUnavailable(Exception):
    """The query could not be answered upstream; ``kind`` labels it for stats."""

    kind = "servfail"


class DNSTimeout(DNSUnavailable):
    """No reply within the query timeout."""

    kind = "timeout"


class Overloaded(DNSUnavailable):
    """Too many queries in flight and queued for this device."""

    kind = "overloaded"


class OverShare(Overloaded):
    """This client already holds its fair share of the device's queue (room stays for others)."""

    kind = "over_share"
