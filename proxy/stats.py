# -*- test-case-name: tests.unit.test_server -*-
"""Counters of the data path, read by the admin socket and metrics.

Plain integers and Counters: cheap to bump on every connection, and a
snapshot is a dict an exporter can render however it likes.
"""

import math
from collections import Counter


class ProxyStats:
    """What happened to proxied connections since start.

    :ivar refused: connections refused before dialling, by reason
        (``unmapped``, ``loop``, ``origdst``, ``limit``, ``client-limit``).
    :ivar upstream_errors: failed device handshakes by ``UpstreamError.kind``.
    :ivar sniffed: how the CONNECT target was chosen (``sni``, ``host``,
        ``timeout``, ``none``, ``invalid``, ``skipped``, ``learned``).
    :ivar finished_up: bytes client → device of finished connections.
    :ivar finished_down: bytes device → client of finished connections.
    :ivar live: ``f() → iterable of (up, down)`` of the connections relaying now (the factory
        sets it): the relays' own counters, the one count of every byte, read at snapshot time.
    """

    def __init__(self):
        self.accepted = 0
        self.relayed = 0
        self.completed = 0
        self.active = 0
        self.finished_up = 0
        self.finished_down = 0
        self.live = tuple
        self.refused = Counter()
        self.upstream_errors = Counter()
        self.sniffed = Counter()
        self.closed = Counter()

    def bytes_moved(self):
        """``(up, down)`` relayed since start: finished connections plus what live ones moved so
        far (a connection's bytes pass from live to finished in one reactor turn: never counted
        twice, never missing, so the totals only grow)."""
        up, down = self.finished_up, self.finished_down
        for live_up, live_down in self.live():
            up += live_up
            down += live_down
        return up, down

    def snapshot(self):
        """A JSON-friendly copy of every counter."""
        up, down = self.bytes_moved()
        return {
            "accepted": self.accepted,
            "relayed": self.relayed,
            "completed": self.completed,
            "active": self.active,
            "bytes_up": up,
            "bytes_down": down,
            "refused": dict(self.refused),
            "upstream_errors": dict(self.upstream_errors),
            "sniffed": dict(self.sniffed),
            "closed": dict(self.closed),
        }


class Histogram:
    """A cumulative-bucket histogram (upper bounds inclusive, ``+Inf`` implied)."""

    def __init__(self, buckets):
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds != sorted(set(bounds)) or any(math.isinf(b) or math.isnan(b) for b in bounds):
            raise ValueError("buckets must be distinct finite numbers, got %r" % (buckets,))
        self.buckets = tuple(bounds)
        self._counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value):
        value = float(value)
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                break
        else:
            i = len(self.buckets)
        self._counts[i] += 1
        self.sum += value
        self.count += 1

    def cumulative(self):
        """``[(le, cumulative count)]`` ending with ``(inf, count)``."""
        out, total = [], 0
        for bound, n in zip(self.buckets + (math.inf,), self._counts):
            total += n
            out.append((bound, total))
        return out
