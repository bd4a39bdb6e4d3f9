# -*- test-case-name: tests.unit.test_upstream -*-
"""The typed failures of a device proxy, shared by the dialer and both handshake parsers.

A module of its own because :mod:`proxy.httpconnect` and :mod:`proxy.socks5` raise them and
:mod:`proxy.upstream` imports both parsers: kept there, they would make an import cycle. Each
has a short ``kind`` so the server can count failures by it.
"""

__all__ = [
    "UpstreamError",
    "AuthRefused",
    "Forbidden",
    "Unreachable",
    "HandshakeTimeout",
    "MalformedReply",
    "UpstreamClosed",
]


class UpstreamError(Exception):
    """A device proxy could not give us a tunnel; ``kind`` is a short label for metrics and logs."""

    kind = "error"


class AuthRefused(UpstreamError):
    """HTTP 407, or the SOCKS5 proxy refused our method or our username/password."""

    kind = "auth"


class Forbidden(UpstreamError):
    """HTTP 403 or another 4xx, or SOCKS5 reply 2 (not allowed by ruleset)."""

    kind = "forbidden"


class Unreachable(UpstreamError):
    """The device proxy itself or, by its answer (HTTP 5xx, SOCKS5 1/3/4/5/6), the destination is unreachable."""

    kind = "unreachable"


class HandshakeTimeout(UpstreamError):
    """No complete reply within the handshake timeout."""

    kind = "timeout"


class MalformedReply(UpstreamError):
    """An unparsable, oversized or unexpected reply (also SOCKS5 replies 7 and 8)."""

    kind = "malformed"


class UpstreamClosed(UpstreamError):
    """The device proxy closed or reset the connection before its reply was complete."""

    kind = "closed"
