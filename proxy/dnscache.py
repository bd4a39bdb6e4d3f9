# -*- test-case-name: tests.unit.test_dns_cache -*-
"""A small per-device DNS answer cache.

Each device has its own LRU, so one customer's lookups can neither evict nor reveal another's
and answers are only ever served to clients of the device that resolved them. TTLs follow
RFC 1035 (minimum TTL of the answer) and RFC 2308 (negative answers live for the SOA minimum,
capped); both are capped so a bogus huge TTL cannot pin an entry. The clock is injected.
"""

from collections import OrderedDict

from twisted.names import dns

from proxy.settings import MAX_NEGATIVE_TTL, MAX_TTL

__all__ = ["DNSCache", "cache_ttl"]


def cache_ttl(message, max_ttl=MAX_TTL, max_negative_ttl=MAX_NEGATIVE_TTL):
    """Seconds ``message`` may be cached, or None when it must not be.

    Never cached: truncated replies, SERVFAIL and other errors, negative answers without an SOA.
    """
    if message.trunc:
        return None
    answers = [r for r in message.answers if r.type != dns.OPT]
    if message.rCode == dns.OK and answers:
        ttl = min(min(r.ttl for r in answers), max_ttl)
    elif message.rCode in (dns.OK, dns.ENAME):  # NODATA or NXDOMAIN
        soas = [r for r in message.authority if r.type == dns.SOA]
        if not soas:
            return None
        ttl = min(min(soas[0].ttl, soas[0].payload.minimum), max_negative_ttl)
    else:
        return None
    return ttl if ttl > 0 else None


class DNSCache:
    """``device → LRU of (name, type, class) → reply``, at most ``entries`` per device.

    :param clock: an ``IReactorTime``.
    """

    def __init__(self, clock, entries=1000, max_ttl=MAX_TTL, max_negative_ttl=MAX_NEGATIVE_TTL):
        self.clock = clock
        self.entries = entries
        self.max_ttl = max_ttl
        self.max_negative_ttl = max_negative_ttl
        self._devices = {}

    def get(self, device, key):
        """``(message, age in whole seconds)`` of a live entry, or None (expired entries are dropped)."""
        lru = self._devices.get(device)
        entry = lru.get(key) if lru is not None else None
        if entry is None:
            return None
        stored, expires, message = entry
        now = self.clock.seconds()
        if now >= expires:
            del lru[key]
            return None
        lru.move_to_end(key)
        return message, int(now - stored)

    def put(self, device, key, message):
        """Cache ``message`` if its TTLs allow; OPT records are stripped (they are per client).

        :returns: True if it was cached.
        """
        ttl = cache_ttl(message, self.max_ttl, self.max_negative_ttl)
        if ttl is None or self.entries <= 0:
            return False
        stored = dns.Message(maxSize=0)
        for attr in ("rCode", "auth", "recAv", "authenticData"):
            setattr(stored, attr, getattr(message, attr))
        stored.answers = list(message.answers)
        stored.authority = list(message.authority)
        stored.additional = [r for r in message.additional if r.type != dns.OPT]
        now = self.clock.seconds()
        lru = self._devices.setdefault(device, OrderedDict())
        lru[key] = (now, now + ttl, stored)
        lru.move_to_end(key)
        while len(lru) > self.entries:
            lru.popitem(last=False)
        return True

    def forget(self, device):
        """Drop everything cached for ``device`` (removed, or its proxy changed)."""
        self._devices.pop(device, None)

    def size(self, device=None):
        """Entries held for ``device``, or for all devices."""
        if device is not None:
            return len(self._devices.get(device, ()))
        return sum(len(lru) for lru in self._devices.values())
