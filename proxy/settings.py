# -*- test-case-name: tests.unit.test_server,tests.unit.test_config -*-
"""The data path's and the DNS service's policies as values, free of Twisted imports.

The daemon's ``proxy:`` and ``dns:`` config sections take their defaults from
these, so every default is written once, here.
"""

from dataclasses import dataclass

MAX_UDP_PAYLOAD = 1232  # DNS flag day 2020: no IP fragmentation on common paths
MAX_TTL = 86400  # cached answers never live longer (a day)
MAX_NEGATIVE_TTL = 3600  # NXDOMAIN/NODATA at most an hour (RFC 2308 §5)


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


@dataclass(frozen=True)
class DNSSettings:
    """DNS service settings; the WAN-facing timeouts are generous (cellular devices)."""

    listen_host: str
    listen_port: int = 53
    resolver: object = ("1.1.1.1", 53)  # reached THROUGH the device: (host, port) or a DoHURL
    ca_file: str = ""  # DoH only: trust these CAs instead of the system store
    max_doh_connections: int = 4  # DoH only: keep-alive tunnels per device
    host_servers: tuple = ()  # policy "host"; () = /etc/resolv.conf
    query_timeout: float = 5.0
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0
    idle_timeout: float = 60.0  # device tunnel
    cache_entries: int = 1000  # per device
    # Each client TCP connection costs a file descriptor and a few KiB: 4096 in all is safe
    # under the daemon's raised RLIMIT_NOFILE, and with 16 per client it takes 256 greedy
    # customers (not one, as with the former single pool of 256) to fill it.
    max_tcp_clients: int = 4096
    max_tcp_per_client: int = 16  # per source address; a stub resolver needs one or two
    log_names: bool = False
    tcp_idle_timeout: float = 30.0  # a client's TCP connection (RFC 7766 §6.2.3)
    max_tcp_pipeline: int = 32  # queries in flight per client TCP connection before we stop reading
    max_in_flight: int = 64  # per device tunnel
    max_queued: int = 256  # per device, beyond max_in_flight; more is SERVFAIL
    max_udp_payload: int = MAX_UDP_PAYLOAD
    max_ttl: int = MAX_TTL
    max_negative_ttl: int = MAX_NEGATIVE_TTL
