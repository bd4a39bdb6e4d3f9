# -*- test-case-name: tests.unit.test_logthrottle -*-
"""At most one log line per key per interval, and the next line says how many were held back.

A customer churning failing connections must not be able to write gigabytes of log: every
per-connection or per-query line goes through one of these, keyed by (what, who). The first
line for a key is written at once; later ones within ``interval`` are only counted, and the
next line written for that key carries ``suppressed`` (how many were dropped since the last
one), so an operator still sees the rate. Memory is bounded: at most ``size`` keys are
remembered (oldest forgotten first), and :meth:`expire` drops keys that have been quiet.
"""

import collections


class LogThrottle:
    """Decides which log lines to write; ``clock`` is an ``IReactorTime`` (``seconds()``)."""

    def __init__(self, clock, interval=10.0, size=10000):
        self.clock = clock
        self.interval = interval
        self.size = size
        self._keys = collections.OrderedDict()  # key -> [last written at, suppressed since]
        self.suppressed_total = 0

    def allow(self, key):
        """``None`` to drop this line, else how many lines for ``key`` were dropped before it."""
        now = self.clock.seconds()
        entry = self._keys.get(key)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            self.suppressed_total += 1
            return None
        suppressed = entry[1] if entry is not None else 0
        self._keys.pop(key, None)
        self._keys[key] = [now, 0]
        while len(self._keys) > self.size:
            self._keys.popitem(last=False)
        return suppressed

    def expire(self):
        """Forget keys quiet for six intervals (their dropped count, if any, is lost: by then
        the burst is long over and the totals live in the metrics)."""
        cutoff = self.clock.seconds() - 6 * self.interval
        for key in [k for k, (at, _) in self._keys.items() if at < cutoff]:
            del self._keys[key]

    def __len__(self):
        return len(self._keys)


def held_back(suppressed):
    """The tail of a throttled line's format string: how many like it were held back (none: nothing).
    The event carries ``suppressed`` as a field of its own."""
    return " ({suppressed} similar lines held back)" if suppressed else ""
