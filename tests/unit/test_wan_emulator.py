"""The WAN emulator's scheduling core and forwarder loop, without root or namespaces.

:class:`tests.lab.wan.DelayLine` is driven with explicit times and a seeded RNG; the
:class:`tests.lab.wan.Forwarder` loop runs in a thread between two SOCK_SEQPACKET socketpairs
standing in for the tun devices (one read = one packet, as on a tun fd).
"""

import json
import os
import random
import socket
import statistics
import threading
import time

import pytest

from tests.lab.wan import DelayLine, Forwarder


def drain(line, now):
    return list(line.pop_due(now))


def test_delays_stay_within_delay_plus_minus_jitter():
    line = DelayLine(0.3, 0.1, random.Random(1), reorder=True)
    dues = [line.push(0.0, b"p%d" % i) for i in range(2000)]
    assert all(0.2 <= d <= 0.4 for d in dues)
    assert abs(statistics.fmean(dues) - 0.3) < 0.01
    assert drain(line, 0.199) == []
    assert len(drain(line, 0.4)) == 2000
    assert line.stats["packets"] == 2000 and 0.2 <= line.stats["delay_min"] <= line.stats["delay_max"] <= 0.4


def test_order_is_kept_by_default():
    """A burst comes out in the order it went in, however the draws fell."""
    line = DelayLine(0.3, 0.1, random.Random(2))
    for i in range(500):
        line.push(i * 0.001, b"%04d" % i)
    out = drain(line, 10.0)
    assert out == [b"%04d" % i for i in range(500)]


def test_reorder_mode_lets_packets_overtake():
    line = DelayLine(0.3, 0.1, random.Random(3), reorder=True)
    for i in range(500):
        line.push(i * 0.001, b"%04d" % i)
    out = drain(line, 10.0)
    assert sorted(out) == [b"%04d" % i for i in range(500)] and out != sorted(out)


def test_sparse_packets_see_the_whole_distribution_and_bulk_tends_to_the_upper_bound():
    """Documented consequence of keeping order: spaced ≥ 2×jitter, the mean delay is ``delay``;
    a dense flow waits for the slowest recent draw (toward delay + jitter)."""
    sparse = DelayLine(0.3, 0.1, random.Random(4))
    delays = [sparse.push(t * 0.25, b"x") - t * 0.25 for t in range(2000)]
    assert abs(statistics.fmean(delays) - 0.3) < 0.01
    dense = DelayLine(0.3, 0.1, random.Random(5))
    delays = [dense.push(t * 0.0001, b"x") - t * 0.0001 for t in range(20000)]
    assert statistics.fmean(delays[1000:]) > 0.39


def test_own_loss_and_queue_limit_are_counted():
    line = DelayLine(0.3, 0.1, random.Random(6), loss=0.03, limit=100000)
    for i in range(20000):
        line.push(0.0, b"x")
    assert abs(line.stats["dropped_loss"] / 20000 - 0.03) < 0.006
    full = DelayLine(0.3, 0.0, random.Random(7), limit=10)
    results = [full.push(0.0, b"x") for _ in range(15)]
    assert results.count(None) == 5 and full.stats["dropped_queue"] == 5 and full.stats["max_queue"] == 10


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        DelayLine(0.1, 0.2, random.Random())


def test_forwarder_delays_both_directions_and_writes_stats(tmp_path):
    """Packets written at one 'tun' come out at the other after ≈ delay; stats JSON is written on exit."""
    a_outer, a_inner = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b_outer, b_inner = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a_inner, b_inner):
        s.setblocking(False)
    rng = random.Random(8)
    lines = (DelayLine(0.05, 0.01, rng), DelayLine(0.05, 0.01, rng))
    stats_path = str(tmp_path / "stats.json")
    fwd = Forwarder((a_inner.fileno(), b_inner.fileno()), lines, stats_path, lifetime=10)
    thread = threading.Thread(target=fwd.run, daemon=True)
    thread.start()
    try:
        for sock in (a_outer, b_outer):
            sock.settimeout(2)
        sent = time.monotonic()
        for i in range(20):
            a_outer.send(b"a2b %d" % i)
            b_outer.send(b"b2a %d" % i)
        got_b = [b_outer.recv(100) for _ in range(20)]
        got_a = [a_outer.recv(100) for _ in range(20)]
        elapsed = time.monotonic() - sent
        assert got_b == [b"a2b %d" % i for i in range(20)]
        assert got_a == [b"b2a %d" % i for i in range(20)]
        assert 0.04 <= elapsed < 1.0
    finally:
        fwd.running = False
        thread.join(5)
        for s in (a_outer, a_inner, b_outer, b_inner):
            s.close()
    assert not thread.is_alive()
    with open(stats_path) as f:
        stats = json.load(f)
    assert stats["final"] and stats["pid"] == os.getpid()
    for direction in ("a_to_b", "b_to_a"):
        s = stats[direction]
        assert s["packets"] == 20 and s["dropped_loss"] == 0 and s["write_errors"] == 0
        assert 0.04 - 0.001 <= s["delay_min"] and s["delay_max"] <= 0.06 + 0.001


def test_forwarder_exits_at_its_lifetime(tmp_path):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        lines = (DelayLine(0.01, 0.0, random.Random()), DelayLine(0.01, 0.0, random.Random()))
        fwd = Forwarder((a.fileno(), b.fileno()), lines, str(tmp_path / "s.json"), lifetime=0.2)
        started = time.monotonic()
        fwd.run()
        assert time.monotonic() - started < 2 and fwd.exit_reason == "lifetime"
    finally:
        a.close()
        b.close()
