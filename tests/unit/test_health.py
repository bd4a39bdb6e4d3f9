"""proxy.health: device states with hysteresis, probe scheduling, back-off, passive signals
(a scripted probe on a Clock)."""

import ipaddress
import random

from twisted.internet import defer
from twisted.internet.task import Clock

from proxy.health import DEGRADED, DOWN, UNKNOWN, UP, HealthMonitor, HealthSettings
from proxy.probe import ProbeFailed, ProbeResult

SETTINGS = HealthSettings(interval=30.0, timeout=10.0, retry_interval=5.0, fall=3, rise=2, concurrency=4)


class Probes:
    """Hands out a Deferred per probe; the test answers them."""

    def __init__(self):
        self.calls = []  # (time, upstream, target, Deferred)
        self.fresh = []  # the fresh= of each call

    def __call__(self, reactor, upstream, target, timeout, fresh=True, key=None):
        d = defer.Deferred()
        self.calls.append((reactor.seconds(), upstream, target, d))
        self.fresh.append(fresh)
        return d

    def open(self):
        return [c for c in self.calls if not c[3].called]

    def answer(self, upstream=None, exit_address="203.0.113.2", rtt=0.4):
        for c in self.open():
            if upstream is None or c[1] == upstream:
                fresh = self.fresh[self.calls.index(c)]
                c[3].callback(ProbeResult(rtt, ipaddress.ip_address(exit_address) if exit_address else None, 200, fresh))
                return c
        raise AssertionError("no open probe of %s" % (upstream,))

    def fail(self, upstream=None, kind="unreachable"):
        for c in self.open():
            if upstream is None or c[1] == upstream:
                c[3].errback(ProbeFailed(kind, "scripted %s" % kind))
                return c
        raise AssertionError("no open probe of %s" % (upstream,))


def monitor(n=1, settings=SETTINGS):
    clock, probes = Clock(), Probes()
    m = HealthMonitor(clock, settings, probe=probes, rng=random.Random(7))
    m.watch({"phone%d" % i: ("up%d" % i, "target") for i in range(n)})
    m.start()
    return clock, probes, m


def run_until_probe(clock, probes, limit=1000.0, step=0.1):
    before = len(probes.calls)
    waited = 0.0
    while len(probes.calls) == before:
        assert waited < limit, "no probe within %g s" % limit
        clock.advance(step)
        waited += step
    return waited


def test_first_probes_are_spread_over_the_first_interval_not_a_storm():
    clock, probes, m = monitor(200, HealthSettings(concurrency=1000))
    assert probes.calls == []  # nothing at start
    clock.advance(SETTINGS.interval)
    starts = sorted(c[0] for c in probes.calls)
    assert len(starts) == 200
    per_second = max(sum(1 for t in starts if s <= t < s + 1) for s in range(30))
    assert per_second <= 20  # 200 over 30 s: about 7 a second, never all at once


def test_unknown_counts_as_alive_and_the_first_answer_makes_it_up():
    clock, probes, m = monitor()
    assert m.get("phone0").state == UNKNOWN and m.alive("phone0")
    run_until_probe(clock, probes)
    probes.answer()
    h = m.get("phone0")
    assert h.state == UP and h.rtt == 0.4 and str(h.exit_address) == "203.0.113.2" and h.exit_changed is not None
    assert m.alive("not-watched")


def test_down_only_after_fall_failures_in_a_row_and_up_after_rise_successes():
    clock, probes, m = monitor()
    changes = []
    m.state_changed.append(lambda h, old: changes.append((old, h.state)))
    run_until_probe(clock, probes)
    probes.answer()
    for _ in range(2):
        run_until_probe(clock, probes)
        probes.fail()
        assert m.get("phone0").state == DEGRADED and m.alive("phone0")
    waited = run_until_probe(clock, probes)
    assert 4.4 <= waited <= 5.6  # a failure is confirmed at retry_interval, not at interval
    probes.fail()
    assert m.get("phone0").state == DOWN and not m.alive("phone0")
    run_until_probe(clock, probes)
    probes.answer()
    assert m.get("phone0").state == DOWN  # one answer is not enough
    run_until_probe(clock, probes)
    probes.answer()
    assert m.get("phone0").state == UP
    assert changes == [(UNKNOWN, UP), (UP, DEGRADED), (DEGRADED, DOWN), (DOWN, UP)]
    assert m.transitions[(DEGRADED, DOWN)] == 1


def test_a_success_between_failures_resets_the_streak():
    clock, probes, m = monitor()
    for outcome in ("ok", "fail", "fail", "ok", "fail", "fail", "ok"):
        run_until_probe(clock, probes)
        probes.answer() if outcome == "ok" else probes.fail()
        assert m.get("phone0").state != DOWN
    assert m.get("phone0").state == UP and m.get("phone0").ratio == 3 / 7


def test_probes_back_off_while_down_up_to_the_interval():
    clock, probes, m = monitor()
    for _ in range(3):
        run_until_probe(clock, probes)
        probes.fail()
    waits = []
    for _ in range(6):
        waits.append(run_until_probe(clock, probes))
        probes.fail()
    expected = [5, 10, 20, 30, 30, 30]
    assert all(0.85 * e <= w <= 1.15 * e for w, e in zip(waits, expected)), waits


def test_never_more_probes_in_flight_than_the_concurrency_and_the_rest_wait_their_turn():
    clock, probes, m = monitor(10)
    clock.advance(SETTINGS.interval)
    assert len(probes.open()) == 4 and m.in_flight == 4
    for _ in range(6):
        probes.answer()
        assert len(probes.open()) == 4
    for _ in range(4):
        probes.answer()
    assert len(probes.calls) == 10 and m.max_in_flight == 4
    assert all(m.get("phone%d" % i).state == UP for i in range(10))


def test_sockets_held_counts_probes_in_flight_and_the_probers_kept_tunnels():
    """What the proxy's fd-derived cap leaves room for (ProxyFactory.sockets_elsewhere)."""
    clock, probes, m = monitor(10)
    assert m.sockets_held() == 0
    clock.advance(SETTINGS.interval)
    assert m.sockets_held() == 4  # in flight
    probes.kept = 7  # a Prober's kept tunnels
    assert m.sockets_held() == 11


def test_an_exit_address_change_is_told_but_the_first_sighting_is_not():
    clock, probes, m = monitor()
    seen = []
    m.exit_changed.append(lambda h, old: seen.append((str(old), str(h.exit_address))))
    run_until_probe(clock, probes)
    probes.answer(exit_address="203.0.113.2")
    run_until_probe(clock, probes)
    probes.answer(exit_address="203.0.113.2")
    assert seen == [] and m.exit_changes == 0
    run_until_probe(clock, probes)
    probes.answer(exit_address="203.0.113.77")
    assert seen == [("203.0.113.2", "203.0.113.77")] and m.exit_changes == 1
    run_until_probe(clock, probes)
    probes.answer(exit_address=None)  # a target that stops saying keeps the last known address
    assert str(m.get("phone0").exit_address) == "203.0.113.77"


def test_a_burst_of_failing_traffic_probes_at_once_and_working_traffic_is_evidence_of_life():
    clock, probes, m = monitor()
    run_until_probe(clock, probes)
    probes.answer()
    clock.advance(1)
    m.traffic_failed("phone0")
    m.traffic_failed("phone0")
    assert probes.open() == []
    m.traffic_failed("phone0")
    assert len(probes.open()) == 1  # now, not at the next interval
    probes.fail()
    assert m.get("phone0").state == DEGRADED
    m.traffic_succeeded("phone0")
    assert m.get("phone0").state == UP and m.get("phone0").failures == 0


def test_spread_out_traffic_failures_do_not_make_it_suspect():
    clock, probes, m = monitor()
    run_until_probe(clock, probes)
    probes.answer()
    for _ in range(4):  # one every 6 s: never 3 within the 10 s window (and before the next interval)
        clock.advance(6)
        m.traffic_failed("phone0")
    assert probes.open() == []


def test_watch_follows_the_device_list_and_a_late_answer_of_a_forgotten_device_is_ignored():
    clock, probes, m = monitor(2)
    clock.advance(SETTINGS.interval)
    assert len(probes.open()) == 2
    m.watch({"phone0": ("up0", "target")})
    assert m.get("phone1") is None
    probes.answer("up1")
    assert m.get("phone1") is None and m.in_flight == 1
    m.watch({"phone0": ("changed", "target")})  # a new upstream starts afresh
    assert m.get("phone0").upstream == "changed" and m.get("phone0").state == UNKNOWN
    probes.answer("up0")
    assert m.get("phone0").state == UNKNOWN
    run_until_probe(clock, probes)
    assert probes.open()[0][1] == "changed"


def test_stop_cancels_every_timer():
    clock, probes, m = monitor(5)
    m.stop()
    assert clock.getDelayedCalls() == []


def test_stats_count_states_probes_and_the_most_in_flight():
    clock, probes, m = monitor(6)
    clock.advance(SETTINGS.interval)
    for _ in range(3):
        probes.answer()
    probes.fail()
    stats = m.stats()
    assert stats["devices"] == {UNKNOWN: 2, UP: 3, DEGRADED: 1, DOWN: 0}
    assert stats["probes"] == {"ok": 3, "unreachable": 1} and stats["max_in_flight"] == 4 == stats["concurrency"]


def test_healthy_probes_reuse_the_tunnel_and_a_fresh_one_comes_every_fresh_every_or_on_any_doubt():
    clock, probes, m = monitor(settings=HealthSettings(interval=30.0, retry_interval=5.0, fresh_every=120.0))
    for _ in range(8):
        run_until_probe(clock, probes)
        probes.answer()
    times = [c[0] for c in probes.calls]
    fresh_times = [t for t, f in zip(times, probes.fresh) if f]
    assert probes.fresh[:3] == [True, False, False] and len(fresh_times) >= 2  # first, then again after 120 s
    assert all(b - a >= 120 for a, b in zip(fresh_times, fresh_times[1:]))
    assert all(f or t - max(x for x in fresh_times if x < t) < 120 + 1 for t, f in zip(times, probes.fresh))
    run_until_probe(clock, probes)
    probes.fail()
    run_until_probe(clock, probes)
    assert probes.fresh[-1] is True  # degraded: prove it with a new tunnel
    probes.answer()
    clock.advance(1)
    m.probe_now("phone0")
    assert probes.fresh[-1] is True  # a suspicion or a request: fresh


def test_devices_due_together_share_one_timer_so_thousands_cost_a_few_dozen():
    clock, probes, m = monitor(2000, HealthSettings(concurrency=10_000))
    assert len(clock.getDelayedCalls()) <= 30 / 0.25 + 1  # one per 0.25 s tick of the first interval
    clock.advance(30)
    assert len(probes.calls) == 2000
    for _ in range(2000):
        probes.answer()
    assert len(clock.getDelayedCalls()) <= 2 * 30 / 0.25 + 2  # next probes (interval ± 10 %) on ticks too
    m.stop()
    assert clock.getDelayedCalls() == []
