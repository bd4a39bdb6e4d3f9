# -*- test-case-name: tests.unit.test_dns_wiring -*-
"""The customers' DNS service composed with the controller: who asks, which device answers.

:mod:`proxy.dnsserver` knows only "source address → route". Here a route comes from the
mapping table the controller fills at admission: the client's upstream, and the device's
``dns`` policy from the users file (the daemon's ``dns.policy`` when the device has none).
An unmapped source has no route and is REFUSED, so the service is never an open resolver.
"""

from ovpnmgr.config import ConfigError
from proxy.dnsserver import DNSRoute, DNSServer, DNSService, DNSSettings
from proxy.dohurl import DoHURL


def settings_from(config):
    """:class:`DNSSettings` for a :class:`~ovpnmgr.config.Config` whose DNS service is on."""
    address, port = config.dns_address
    d = config.dns
    return DNSSettings(
        listen_host=str(address),
        listen_port=port,
        resolver=d.resolver if isinstance(d.resolver, DoHURL) else tuple(d.resolver),
        ca_file=str(d.ca_file or ""),
        max_doh_connections=d.doh_connections,
        host_servers=tuple(d.host_servers),
        query_timeout=d.query_timeout,
        connect_timeout=d.connect_timeout,
        handshake_timeout=d.handshake_timeout,
        idle_timeout=d.idle_timeout,
        cache_entries=d.cache_entries,
        max_tcp_clients=d.max_tcp_clients,
        max_tcp_per_client=d.max_tcp_per_client,
        log_names=d.log_names,
    )


def route_lookup(mappings, default_policy):
    """``route_for(ip)`` over a :class:`~proxy.mappings.MappingTable`: the client's
    :class:`~proxy.mappings.Route` as the DNS service's :class:`DNSRoute`.

    The route key is the device's name: two devices never share a connection or a cache, and
    a device whose proxy URL changed on reload gets fresh ones (the server sees the key's
    upstream change). :func:`build_dns` also forgets a device no client maps to any more.
    """

    def route_for(ip):
        route = mappings.route(ip)
        if route is None:
            return None
        return DNSRoute(key=route.key, upstream=route.upstream, policy=route.dns or default_policy, log_fields=route.log_fields)

    return route_for


def build_dns(reactor, config, mappings):
    """``(DNSService, DNSServer)`` for ``config``, or ``(None, None)`` when ``dns.enabled`` is false."""
    if config.dns_address is None:
        return None, None
    try:
        server = DNSServer(reactor, settings_from(config), route_lookup(mappings, config.dns.policy))
    except ValueError as e:  # the CA file changed since the configuration was checked
        raise ConfigError(config.path, "dns.ca_file", str(e)) from None
    mappings.released.append(lambda ip, route: _release(mappings, server, route))
    return DNSService(server), server


def _release(mappings, server, route):
    """A client stopped mapping to ``route``'s device: once nobody does, close its DNS tunnels
    and drop its cache (a removed or renamed device); once nobody uses its proxy URL either,
    forget every key served through it (the old URL of a remapped device)."""
    if not mappings.routed_to(route.key):
        server.forget(route.key)
    if not mappings.co_tenants(route.upstream):
        server.forget_upstream(route.upstream)
