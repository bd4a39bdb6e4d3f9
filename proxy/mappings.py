# -*- test-case-name: tests.unit.test_mappings -*-
"""Client address → device upstream, and the live proxied connections per client.

The admission controller adds a mapping before it lets a client in and removes
it when the client leaves; removing or changing a mapping closes that client's
live connections so no traffic keeps flowing through the wrong device.

Each mapping also counts the bytes its client's finished connections relayed,
so operators can see per-client proxied traffic; the count starts at zero for
every new owner of an address.
"""

import ipaddress

from twisted.logger import Logger

from proxy.destinations import DEFAULT_CLIENT, ClientPolicy


class MappingConflict(Exception):
    """The address is already mapped for another owner."""


class MappingTable:
    """``ip → (upstream, owner)`` plus the live connections of each ip.

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
        #: ``f(ip, upstream)`` after ``ip`` stopped mapping to ``upstream`` (removed or remapped), so
        #: whoever keeps per-device state (the DNS service's tunnels and caches) can let it go.
        self.released = []

    @staticmethod
    def _key(ip):
        # The proxy passes parsed addresses on every connection: don't re-parse them.
        if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            return ip
        return ipaddress.ip_address(ip)

    def add(self, ip, upstream, owner=None):
        """Map ``ip`` to ``upstream``; re-adding for the same owner replaces (and closes on change)."""
        key = self._key(ip)
        current = self._entries.get(key)
        if current is not None and current[1] != owner:
            raise MappingConflict("%s is already mapped for %r" % (key, current[1]))
        if current is not None and current[0] != upstream:
            self._close_live(key, "mapping changed")
        if current is None:
            self._bytes[key] = [0, 0]
        self._set(key, upstream, owner)

    def transfer(self, ip, upstream, owner):
        """Give ``ip`` to a new owner whatever the previous one (same user reconnecting)."""
        key = self._key(ip)
        current = self._entries.get(key)
        if current is not None and current[0] != upstream:
            self._close_live(key, "mapping changed")
        if current is None or current[1] != owner:
            self._bytes[key] = [0, 0]
        self._set(key, upstream, owner)

    def _set(self, key, upstream, owner):
        current = self._entries.get(key)
        if current is not None:
            self._unindex(key, current[0])
        self._entries[key] = (upstream, owner)
        self._by_upstream.setdefault(upstream, set()).add(key)
        if current is not None and current[0] != upstream:
            self._released(key, current[0])

    def _released(self, key, upstream):
        for listener in self.released:
            try:
                listener(key, upstream)
            except Exception:
                self._log.failure("mapping listener failed for {ip}", ip=str(key))

    def _unindex(self, key, upstream):
        ips = self._by_upstream.get(upstream)
        if ips is not None:
            ips.discard(key)
            if not ips:
                del self._by_upstream[upstream]

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
        return entry[0] if entry is not None else None

    def owner(self, ip):
        """Who installed the mapping of ``ip`` (None when unmapped)."""
        entry = self._entries.get(self._key(ip))
        return entry[1] if entry is not None else None

    def log_fields(self, ip):
        """Structured log fields its owner gives for ``ip`` (an owner's ``log_fields`` dict), or ``{}``.

        The proxy adds them to its events about this client without knowing what they mean.
        """
        fields = getattr(self.owner(ip), "log_fields", None)
        return dict(fields) if isinstance(fields, dict) else {}

    def policy(self, ip):
        """The owner's :class:`~proxy.destinations.ClientPolicy` for ``ip`` (its
        ``proxy_policy``), or the default: the public internet only, device capacity unknown."""
        policy = getattr(self.owner(ip), "proxy_policy", None)
        return policy if isinstance(policy, ClientPolicy) else DEFAULT_CLIENT

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

    def _close_live(self, key, why):
        live = self._live.pop(key, set())
        if live:
            self._log.info("closing {count} live connections of {ip}: {why}", count=len(live), ip=str(key), why=why)
        for connection in live:
            connection.abortConnection()
