# -*- test-case-name: tests.unit.test_mappings -*-
"""Client address → its :class:`Route`, and the live proxied connections per client.

The admission side adds a mapping before it lets a client in and removes it
when the client leaves; removing a mapping or changing its upstream closes that
client's live connections so no traffic keeps flowing through the wrong device.
Listeners in :attr:`MappingTable.released` hear of every removal and change, so
per-device state elsewhere (the DNS service's resolvers) follows the table.

Each mapping also counts the bytes its client's finished connections relayed,
so operators can see per-client proxied traffic; the count starts at zero for
every new owner of an address.
"""

import ipaddress
from collections import Counter
from dataclasses import dataclass, field

from twisted.logger import Logger

from proxy.destinations import DEFAULT_CLIENT, ClientPolicy


class MappingConflict(Exception):
    """The address is already mapped for another owner."""


@dataclass(frozen=True)
class Route:
    """Where one client's traffic goes and what the proxy and DNS service know of it: a value the
    admission side builds, so ``proxy/`` reads typed fields instead of poking at its objects.

    :ivar upstream: the device's proxy (:class:`~proxy.upstream.Upstream`).
    :ivar device: the device's name (the DNS service's key: one resolver and cache per device),
        or None for a bare upstream.
    :ivar dns: the device's DNS policy, or None for the service's default.
    :ivar policy: what the client may reach and its phone's capacity.
    :ivar log_fields: structured log fields naming the client (user, device, ...).
    """

    upstream: object
    device: str | None = None
    dns: str | None = None
    policy: ClientPolicy = DEFAULT_CLIENT
    log_fields: dict = field(default_factory=dict, compare=False)

    @property
    def key(self):
        """One device's identity across the DNS service: its name, else its upstream."""
        return self.device if self.device is not None else self.upstream

    @classmethod
    def of(cls, target):
        """``target`` as a Route: a Route is itself, a bare upstream gets the defaults."""
        return target if isinstance(target, Route) else cls(target)


class MappingTable:
    """``ip → (route, owner)`` plus the live connections of each ip.

    ``owner`` is an opaque key of whoever installed the mapping (the
    controller uses its (epoch, CID) session key), so a late removal by a
    previous owner can never drop a newer client's mapping.
    """

    _log = Logger()

    def __init__(self):
        self._entries = {}
        self._live = {}
        self._bytes = {}  # ip -> [up, down] of finished connections, for the current owner
        self._by_upstream = {}  # upstream -> set of ips mapped to it (co-tenants of one phone)
        self._by_route_key = Counter()  # Route.key -> how many ips map to it
        #: ``f(ip, route)`` after ``ip`` stopped mapping to ``route``'s device (removed, or its
        #: upstream or device changed), so whoever keeps per-device state (the DNS service's
        #: tunnels and caches) can let it go.
        self.released = []

    @staticmethod
    def _key(ip):
        # The proxy passes parsed addresses on every connection: don't re-parse them.
        if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            return ip
        return ipaddress.ip_address(ip)

    def add(self, ip, route, owner=None):
        """Map ``ip`` to ``route`` (a :class:`Route` or a bare upstream) for a single owner;
        re-adding for the same owner replaces it. Raises :class:`MappingConflict` for another owner."""
        current = self._entries.get(self._key(ip))
        if current is not None and current[1] != owner:
            raise MappingConflict("%s is already mapped for %r" % (ip, current[1]))
        self.transfer(ip, route, owner)

    def transfer(self, ip, route, owner):
        """Map ``ip`` to ``route`` for ``owner`` whatever the previous owner (the same user
        reconnecting, a reload): a changed upstream closes the live connections; a new owner's
        byte count starts at zero."""
        key = self._key(ip)
        route = Route.of(route)
        current = self._entries.get(key)
        if current is not None and current[0].upstream != route.upstream:
            self._close_live(key, "mapping changed")
        if current is None or current[1] != owner:
            self._bytes[key] = [0, 0]
        if current is not None:
            self._unindex(key, current[0])
        self._entries[key] = (route, owner)
        self._by_upstream.setdefault(route.upstream, set()).add(key)
        self._by_route_key[route.key] += 1
        if current is not None and (current[0].upstream, current[0].key) != (route.upstream, route.key):
            self._released(key, current[0])

    def _released(self, key, route):
        for listener in self.released:
            try:
                listener(key, route)
            except Exception:
                self._log.failure("mapping listener failed for {ip}", ip=str(key))

    def _unindex(self, key, route):
        ips = self._by_upstream.get(route.upstream)
        if ips is not None:
            ips.discard(key)
            if not ips:
                del self._by_upstream[route.upstream]
        self._by_route_key[route.key] -= 1
        if self._by_route_key[route.key] <= 0:
            del self._by_route_key[route.key]

    def remove(self, ip, owner=None):
        """Drop the mapping of ``ip`` if ``owner`` (when given) still owns it; close its connections.

        :returns: True if a mapping was removed.
        """
        key = self._key(ip)
        current = self._entries.get(key)
        if current is None or (owner is not None and current[1] != owner):
            return False
        del self._entries[key]
        self._unindex(key, current[0])
        self._bytes.pop(key, None)
        self._close_live(key, "mapping removed")
        self._released(key, current[0])
        return True

    def lookup(self, ip):
        """The upstream for ``ip``, or None when the address is not mapped."""
        entry = self._entries.get(self._key(ip))
        return entry[0].upstream if entry is not None else None

    def route(self, ip):
        """The :class:`Route` of ``ip``, or None when the address is not mapped."""
        entry = self._entries.get(self._key(ip))
        return entry[0] if entry is not None else None

    def owner(self, ip):
        """Who installed the mapping of ``ip`` (None when unmapped)."""
        entry = self._entries.get(self._key(ip))
        return entry[1] if entry is not None else None

    def log_fields(self, ip):
        """The route's structured log fields for ``ip`` (a copy), or ``{}`` when unmapped.

        The proxy adds them to its events about this client without knowing what they mean.
        """
        entry = self._entries.get(self._key(ip))
        return dict(entry[0].log_fields) if entry is not None else {}

    def policy(self, ip):
        """The route's :class:`~proxy.destinations.ClientPolicy` for ``ip``, or the default
        (the public internet only, device capacity unknown) when unmapped."""
        entry = self._entries.get(self._key(ip))
        return entry[0].policy if entry is not None else DEFAULT_CLIENT

    def routed_to(self, key):
        """True while some address maps to a route whose :attr:`Route.key` is ``key``."""
        return key in self._by_route_key

    def co_tenants(self, upstream):
        """The addresses mapped to ``upstream`` (every client sharing that phone)."""
        return frozenset(self._by_upstream.get(upstream, ()))

    def add_bytes(self, ip, up, down):
        """Count a finished connection's relayed bytes for ``ip``'s current mapping (ignored if unmapped)."""
        counts = self._bytes.get(self._key(ip))
        if counts is not None:
            counts[0] += up
            counts[1] += down

    def client_bytes(self, ip):
        """``(up, down)`` bytes relayed for ``ip`` under its current mapping: finished connections
        plus what live relays have moved so far (a live connection exposes ``bytes_relayed()``)."""
        key = self._key(ip)
        up, down = self._bytes.get(key, (0, 0))
        for connection in self._live.get(key, ()):
            relayed = getattr(connection, "bytes_relayed", None)
            if relayed is not None:
                live_up, live_down = relayed()
                up += live_up
                down += live_down
        return up, down

    def addresses(self):
        """All mapped addresses."""
        return set(self._entries)

    def __contains__(self, ip):
        return self._key(ip) in self._entries

    def __len__(self):
        return len(self._entries)

    def register(self, ip, connection):
        """Track a live proxied connection of ``ip``; it needs an ``abortConnection()`` method."""
        self._live.setdefault(self._key(ip), set()).add(connection)

    def unregister(self, ip, connection):
        """Forget a finished connection."""
        key = self._key(ip)
        live = self._live.get(key)
        if live is not None:
            live.discard(connection)
            if not live:
                del self._live[key]

    def live_count(self, ip):
        """How many proxied connections ``ip`` has open now."""
        return len(self._live.get(self._key(ip), ()))

    def reset_device(self, key, why):
        """Abort the live connections of every address whose :attr:`Route.key` is ``key`` (the
        device went down, or its exit address changed); the mappings stay.

        :returns: how many connections were aborted.
        """
        count = 0
        for ip, (route, _) in list(self._entries.items()):
            if route.key == key:
                count += len(self._live.get(ip, ()))
                self._close_live(ip, why)
        return count

    def _close_live(self, key, why):
        live = self._live.pop(key, set())
        if live:
            self._log.info("closing {count} live connections of {ip}: {why}", count=len(live), ip=str(key), why=why)
        for connection in live:
            connection.abortConnection()
