"""LogThrottle: one line per key per interval, the next one says how many were held back."""

from twisted.internet.task import Clock

from proxy.logthrottle import LogThrottle


def test_first_line_passes_then_counts_until_the_interval_ends():
    clock = Clock()
    t = LogThrottle(clock, interval=10)
    assert t.allow("k") == 0
    assert [t.allow("k") for _ in range(5)] == [None] * 5
    assert t.allow("other") == 0
    clock.advance(10)
    assert t.allow("k") == 5
    assert t.allow("k") is None
    assert t.suppressed_total == 6


def test_memory_is_bounded_and_quiet_keys_expire():
    clock = Clock()
    t = LogThrottle(clock, interval=10, size=100)
    for i in range(1000):
        t.allow(i)
    assert len(t) == 100
    clock.advance(61)
    t.allow("fresh")
    t.expire()
    assert len(t) == 1
