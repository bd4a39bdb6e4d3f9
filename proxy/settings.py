# -*- test-case-name: tests.unit.test_server,tests.unit.test_config -*-
"""The data path's policy as one value, free of Twisted imports.

The daemon's ``proxy:`` config section extends it (adding where to listen),
so every default is written once, here.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class ProxySettings:
    """Data-path policy; defaults are safe over a slow, lossy cellular WAN.

    :ivar sniff_ports: client-first ports where a name is sniffed; all other
        ports CONNECT to the original IP at once (server-first banners never wait).
    :ivar max_connections: global cap; 0 derives it from ``RLIMIT_NOFILE``.
    :ivar keepalive: TCP keepalive idle seconds on both legs (0 = off); dead
        peers are found without a short idle timeout killing quiet sessions.
    """

    sniff_ports: frozenset = frozenset({80, 443, 8080, 8443})
    sniff_budget: float = 0.2
    connect_timeout: float = 30.0
    handshake_timeout: float = 30.0
    idle_timeout: float = 3600.0
    half_closed_timeout: float = 60.0
    max_connections: int = 0
    max_connections_per_client: int = 1024
    keepalive: int = 120
    splice: bool = True
    sweep_interval: float = 5.0
