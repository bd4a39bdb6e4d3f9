# -*- test-case-name: tests.unit.test_pool -*-
"""VPN address allocation for the tunnel subnet.

OpenVPN runs with ``nopool``: the controller picks every client's address at
CONNECT time (``ifconfig_pool_remote_ip`` does not exist yet then). Addresses
are held by an opaque session key — the controller uses (epoch, CID) — and are
only freed when that session's DISCONNECT arrives, so an address is never
pushed to two live clients. Freed addresses go to the back of the queue, so a
just-released address is the last to be handed out again.
"""

import collections
import ipaddress


class PoolExhausted(Exception):
    """No dynamic address is free."""


class AddressInUse(Exception):
    """A static address is held by another session."""

    def __init__(self, address, owner):
        self.address = address
        self.owner = owner
        super().__init__("%s is in use by %r" % (address, owner))


class AddressPool:
    """Dynamic and static addresses of one IPv4 tunnel subnet."""

    def __init__(self, subnet, server_address, static=()):
        """
        :param subnet: the ``IPv4Network`` of ``server … nopool``.
        :param server_address: the server's own tunnel address (never handed out).
        :param static: addresses reserved for particular users; never given to others.
        """
        self.subnet = ipaddress.IPv4Network(subnet)
        self.server_address = ipaddress.IPv4Address(server_address)
        self._static = frozenset()
        self._owner = {}
        self._address = {}
        self._free = collections.deque(ip for ip in self.subnet.hosts() if ip != self.server_address)
        self.set_static(static)

    def set_static(self, static):
        """Replace the set of reserved static addresses (e.g. after the users file changed)."""
        static = frozenset(ipaddress.IPv4Address(ip) for ip in static)
        for ip in static:
            self.validate(ip)
        self._static = static

    def validate(self, ip):
        """Raise ValueError unless ``ip`` may be given to a client."""
        ip = ipaddress.IPv4Address(ip)
        if ip not in self.subnet:
            raise ValueError("%s is outside the tunnel subnet %s" % (ip, self.subnet))
        if ip in (self.subnet.network_address, self.subnet.broadcast_address, self.server_address):
            raise ValueError("%s is the network, broadcast or server address" % ip)
        return ip

    def allocate(self, key, static=None):
        """Give ``key`` an address: its ``static`` one, or the next free dynamic one.

        Idempotent for the same key. Raises :class:`AddressInUse` or :class:`PoolExhausted`.
        """
        current = self._address.get(key)
        if current is not None and (static is None or current == ipaddress.IPv4Address(static)):
            return current
        if current is not None:
            self.release(key)
        if static is not None:
            ip = self.validate(static)
            owner = self._owner.get(ip)
            if owner is not None:
                raise AddressInUse(ip, owner)
            self._hold(key, ip)
            return ip
        skipped = 0
        while self._free and skipped <= len(self._free):
            ip = self._free.popleft()
            if ip in self._owner:
                continue
            if ip in self._static:
                self._free.append(ip)
                skipped += 1
                continue
            self._hold(key, ip)
            return ip
        raise PoolExhausted("no free address in %s (%d in use)" % (self.subnet, len(self._owner)))

    def claim(self, key, ip):
        """Record that ``key`` already holds ``ip`` (rebuilding state from OpenVPN's status).

        Raises :class:`AddressInUse` if another key holds it, ValueError if it is not a client address.
        """
        ip = self.validate(ip)
        owner = self._owner.get(ip)
        if owner is not None and owner != key:
            raise AddressInUse(ip, owner)
        if self._address.get(key) not in (None, ip):
            self.release(key)
        self._hold(key, ip)
        return ip

    def transfer(self, ip, key):
        """Move ``ip`` to ``key`` from whoever holds it (the same user reconnecting with a static address)."""
        ip = self.validate(ip)
        previous = self._owner.get(ip)
        if previous is not None:
            del self._address[previous]
        if self._address.get(key) not in (None, ip):
            self.release(key)
        self._hold(key, ip)
        return previous

    def release(self, key):
        """Free the address held by ``key``; returns it, or None if it held none."""
        ip = self._address.pop(key, None)
        if ip is not None:
            del self._owner[ip]
            self._free.append(ip)
        return ip

    def address_of(self, key):
        """The address ``key`` holds, or None."""
        return self._address.get(key)

    def owner(self, ip):
        """The key holding ``ip``, or None."""
        return self._owner.get(ipaddress.IPv4Address(ip))

    def in_use(self):
        """``{ip: key}`` of every held address."""
        return dict(self._owner)

    def _hold(self, key, ip):
        self._owner[ip] = key
        self._address[key] = ip
