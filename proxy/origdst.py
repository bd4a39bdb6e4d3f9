# -*- test-case-name: tests.integration.test_proxy_kernel -*-
"""Where an accepted connection was really going.

With REDIRECT the kernel rewrote the destination to our listening port and
keeps the original in conntrack (``SO_ORIGINAL_DST``); with TPROXY the socket's
own local address *is* the original destination. Both lookups live here, in
one stubbable place, so the server can be tested without a kernel.
"""

import functools
import ipaddress
import socket
import struct

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
# CPython has no SOL_IPV6; the level is IPPROTO_IPV6 (41).
_SOL_IP = getattr(socket, "SOL_IP", 0)
_IPPROTO_IPV6 = getattr(socket, "IPPROTO_IPV6", 41)
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75


@functools.lru_cache(maxsize=16384)
def unmap(address):
    """``::ffff:a.b.c.d`` → ``a.b.c.d``; other addresses unchanged (as ip_address objects).

    Cached: the same client and listener addresses come back on every connection, and the
    objects are immutable."""
    if ":" not in address:
        return ipaddress.IPv4Address(address)
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def redirect_destination(sock):
    """The pre-REDIRECT destination of ``sock`` as ``(ip_address, port)``.

    The family comes from the socket's own address, not the peer's: on a
    dual-stack socket an IPv4 client has a v4-mapped local address and its
    conntrack entry is IPv4.

    :raises OSError: no conntrack entry (e.g. ENOENT) or not a TCP socket.
    """
    local = sock.getsockname()[0]
    if sock.family == socket.AF_INET or local.startswith("::ffff:"):
        raw = sock.getsockopt(_SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack_from("!H", raw, 2)[0]
        return ipaddress.IPv4Address(raw[4:8]), port
    raw = sock.getsockopt(_IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
    port = struct.unpack_from("!H", raw, 2)[0]
    return unmap(str(ipaddress.IPv6Address(raw[8:24]))), port


def tproxy_destination(sock):
    """With TPROXY the accepted socket is bound to the original destination."""
    host, port = sock.getsockname()[:2]
    return unmap(host), port
