# -*- test-case-name: tests.unit.test_health -*-
"""Which phones are alive: periodic probes through each phone's proxy, with hysteresis.

A phone is the least reliable part of the path (signal, sleep, cell changes), and a cellular
WAN with 200-500 ms RTT and some loss is normal, not an outage. So a device is ``down`` only
after ``fall`` probes in a row failed, and ``up`` again after ``rise`` in a row succeeded;
one failure makes it ``degraded`` (and the next probe comes sooner, to confirm). Before its
first probe a device is ``unknown``, which counts as alive: a restart never refuses anyone.

Probing costs little: at most ``concurrency`` probes in flight, each device's first probe at
a random point of the first interval (no storm at start), every interval jittered by ±10 %,
and probes back off (doubling up to ``interval``) while a device stays down. A healthy
device's probes reuse its tunnel to the target (one request each, :class:`proxy.probe.Prober`);
a fresh tunnel, proving the phone still opens connections, every ``fresh_every`` seconds,
whenever the device is not ``up``, and on any suspicion. Real traffic
counts too: a burst of upstream failures makes the next probe come at once, and a tunnel that
worked is evidence of life (it clears a streak of failed probes).

Listeners hear of state changes and of exit-address changes; what follows from them (refused
admissions, reset connections, SERVFAIL) is theirs to do: this module knows nothing of who
uses a device.
"""

import math
import random
from collections import Counter, deque
from dataclasses import dataclass

from twisted.logger import Logger

from proxy.probe import ProbeFailed, Prober
from proxy.stats import Histogram

__all__ = ["HealthSettings", "DeviceHealth", "HealthMonitor", "UNKNOWN", "UP", "DEGRADED", "DOWN"]

UNKNOWN, UP, DEGRADED, DOWN = "unknown", "up", "degraded", "down"
STATES = (UNKNOWN, UP, DEGRADED, DOWN)
HISTORY = 20  # probes remembered per device for its success ratio
TICK = 0.25  # seconds: probes are due on multiples of it, so devices due together share a wakeup
RTT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0)  # seconds; cellular probes live at 0.3-3 s


@dataclass(frozen=True)
class HealthSettings:
    """Probe timing. The defaults suit a phone on a 500 ms-RTT lossy cellular link: a probe (TCP to
    the phone, CONNECT, TCP to the target, one request) gets 10 s, a SYN or two lost on the way
    costs 1-3 s, so three failures in a row do not happen to a live phone."""

    interval: float = 30.0  # between probes of a healthy device
    timeout: float = 10.0  # for one probe, all steps
    retry_interval: float = 5.0  # after a failure (to confirm it), and the first back-off step while down
    fall: int = 3  # failures in a row: down
    rise: int = 2  # successes in a row: up again
    concurrency: int = 64  # probes in flight at most
    suspect_failures: int = 3  # upstream failures of real traffic ...
    suspect_window: float = 10.0  # ... within this many seconds: probe now
    fresh_every: float = 600.0  # a healthy device's probes reuse its tunnel; a fresh one this often


class DeviceHealth:
    """What is known of one device (read it; only :class:`HealthMonitor` writes it)."""

    def __init__(self, name, upstream, target, now):
        self.name = name
        self.upstream = upstream
        self.target = target
        self.state = UNKNOWN
        self.since = now  # when ``state`` began
        self.rtt = None  # seconds, of the last successful probe
        self.exit_address = None
        self.exit_changed = None  # when the exit address last changed (None: never seen one)
        self.successes = 0  # in a row
        self.failures = 0  # in a row
        self.history = deque(maxlen=HISTORY)  # True/False per probe, newest last
        self.last_probe = None  # when the last probe ended
        self.last_error = None
        self.probing = False
        self.timer = None  # the tick this device is due at (HealthMonitor's), or None
        self.backoff = None  # the current back-off delay while down
        self.last_fresh = None  # when the last probe on a fresh tunnel ended well
        self.force_fresh = False  # the next probe opens a new tunnel (a suspicion, a request)
        self.traffic_failures = deque()  # times of recent upstream failures of real traffic
        self.probes = Counter()  # this device's probes: "ok" or a ProbeFailed kind -> count (metrics)
        self.rtt_histogram = Histogram(RTT_BUCKETS)  # this device's successful probes' durations
        self.exit_changes = 0  # exit-address changes seen (the first address seen is not a change)

    @property
    def ratio(self):
        """Successful share of the last probes (None before the first)."""
        return sum(self.history) / len(self.history) if self.history else None

    @property
    def alive(self):
        """False only when the device is ``down``."""
        return self.state != DOWN

    def snapshot(self):
        """A plain dict for the admin socket and metrics."""
        return {
            "device": self.name,
            "state": self.state,
            "since": self.since,
            "rtt": self.rtt,
            "ratio": self.ratio,
            "exit_address": str(self.exit_address) if self.exit_address is not None else None,
            "exit_changed": self.exit_changed,
            "failures": self.failures,
            "last_probe": self.last_probe,
            "last_error": self.last_error,
            "target": str(self.target),
        }


class HealthMonitor:
    """Probes the devices it is told to watch and keeps their :class:`DeviceHealth`.

    :param reactor: IReactorTime (+ IReactorTCP for the real probe): the clock of everything here.
    :param probe: ``(reactor, upstream, target, timeout, fresh=, key=) -> Deferred(ProbeResult)``
        (a :class:`proxy.probe.Prober` by default; tests pass a scripted one).
    :param rng: a ``random.Random`` (jitter and the first probes' spread).
    """

    _log = Logger()

    def __init__(self, reactor, settings=HealthSettings(), probe=None, rng=None):
        self.reactor = reactor
        self.settings = settings
        self._probe = probe if probe is not None else Prober()
        self._rng = rng if rng is not None else random.Random()
        self.devices = {}
        self._waiting = deque()  # devices due while ``concurrency`` probes were in flight
        self._buckets = {}  # tick time -> {DeviceHealth: None} due then
        self._ticks = {}  # tick time -> its DelayedCall
        self.in_flight = 0
        self.max_in_flight = 0  # the most ever in flight (a bound the benchmark checks)
        self.probes = Counter()  # "ok" or a ProbeFailed kind -> count
        self.transitions = Counter()  # (old, new) -> count
        self.exit_changes = 0
        self.rtt = Histogram(RTT_BUCKETS)  # successful probes' durations, all devices
        #: ``f(device, old_state)`` after a device's state changed
        self.state_changed = []
        #: ``f(device, old_address)`` after a device's exit address changed (not its first sighting)
        self.exit_changed = []
        self.observers = []  # f(device, result or None, failure or None) after every probe
        self.running = False

    def sockets_held(self):
        """Sockets the probes hold now, at most: kept tunnels plus probes in flight (the proxy's
        fd-derived connection cap leaves room for them)."""
        return getattr(self._probe, "kept", 0) + self.in_flight

    def stats(self):
        """Counters for ``pp stats``: devices by state, probes by result, in flight now and at most."""
        states = Counter(h.state for h in self.devices.values())
        return {
            "devices": {state: states.get(state, 0) for state in STATES},
            "probes": dict(sorted(self.probes.items())),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "concurrency": self.settings.concurrency,
            "exit_changes": self.exit_changes,
        }

    # --- what is watched ----------------------------------------------------------------------

    def watch(self, devices):
        """Watch exactly ``devices``: ``{name: (upstream, target)}``. New ones get their first probe
        at a random point of the first interval; a changed upstream or target starts afresh;
        devices no longer listed are forgotten."""
        for name in list(self.devices):
            if name not in devices:
                self._forget(self.devices.pop(name))
        now = self.reactor.seconds()
        for name, (upstream, target) in devices.items():
            current = self.devices.get(name)
            if current is not None and (current.upstream, current.target) == (upstream, target):
                continue
            if current is not None:
                self._forget(current)
            health = self.devices[name] = DeviceHealth(name, upstream, target, now)
            if self.running:
                self._schedule(health, self._rng.uniform(0, self.settings.interval))

    def start(self):
        self.running = True
        for health in self.devices.values():
            if health.timer is None and not health.probing:
                self._schedule(health, self._rng.uniform(0, self.settings.interval))

    def stop(self):
        self.running = False
        for health in self.devices.values():
            self._cancel(health)
        self._waiting.clear()
        close = getattr(self._probe, "close", None)
        if close is not None:
            close()  # kept tunnels

    def get(self, name):
        """The :class:`DeviceHealth` of ``name``, or None when it is not watched."""
        return self.devices.get(name)

    def alive(self, name):
        """False only for a watched device that is ``down`` (unwatched devices are not judged)."""
        health = self.devices.get(name)
        return health is None or health.alive

    def probe_now(self, name):
        """Probe ``name`` on a fresh tunnel as soon as a slot is free (an operator's request, a
        suspicion, a rotation)."""
        health = self.devices.get(name)
        if health is not None and not health.probing and self.running:
            health.force_fresh = True
            self._cancel(health)
            self._due(health)

    # --- passive signals ----------------------------------------------------------------------

    def traffic_failed(self, name):
        """Real traffic could not get a tunnel through ``name``: a burst of these probes it now."""
        health = self.devices.get(name)
        if health is None or health.state == DOWN:
            return
        now = self.reactor.seconds()
        recent = health.traffic_failures
        recent.append(now)
        while recent and recent[0] < now - self.settings.suspect_window:
            recent.popleft()
        if len(recent) >= self.settings.suspect_failures:
            recent.clear()
            self.probe_now(name)

    def traffic_succeeded(self, name):
        """Real traffic got a tunnel through ``name``: evidence of life."""
        health = self.devices.get(name)
        if health is None:
            return
        health.traffic_failures.clear()
        if health.state == DEGRADED:
            health.failures = 0
            self._set_state(health, UP, "traffic through it succeeds")

    # --- probing ------------------------------------------------------------------------------

    def _schedule(self, health, delay):
        """Due at the next tick after ``delay``: devices due in the same tick share one timer and
        one reactor wakeup (thousands of devices cost a few dozen timers, not thousands)."""
        self._cancel(health)
        now = self.reactor.seconds()
        due = math.ceil((now + max(0.0, delay)) / TICK) * TICK
        bucket = self._buckets.get(due)
        if bucket is None:
            bucket = self._buckets[due] = {}
            self._ticks[due] = self.reactor.callLater(max(0.0, due - now), self._tick, due)
        bucket[health] = None
        health.timer = due

    def _tick(self, due):
        self._ticks.pop(due, None)
        for health in self._buckets.pop(due, {}):
            health.timer = None
            self._due(health)

    def _cancel(self, health):
        due, health.timer = health.timer, None
        bucket = self._buckets.get(due) if due is not None else None
        if bucket is not None:
            bucket.pop(health, None)
            if not bucket:
                del self._buckets[due]
                call = self._ticks.pop(due, None)
                if call is not None and call.active():
                    call.cancel()

    def _forget(self, health):
        self._cancel(health)
        forget = getattr(self._probe, "forget", None)
        if forget is not None:
            forget(health.name)
        health.upstream = None  # a probe still in flight finds it forgotten
        try:
            self._waiting.remove(health)
        except ValueError:
            pass

    def _due(self, health):
        if self.in_flight >= self.settings.concurrency:
            if health not in self._waiting:
                self._waiting.append(health)
            return
        self._run(health)

    def _run(self, health):
        health.probing = True
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        now = self.reactor.seconds()
        fresh = (
            health.force_fresh
            or health.state != UP
            or health.last_fresh is None
            or now - health.last_fresh >= self.settings.fresh_every
        )
        health.force_fresh = False
        try:
            d = self._probe(self.reactor, health.upstream, health.target, self.settings.timeout, fresh=fresh, key=health.name)
        except Exception as e:  # a bug in the probe must not stop probing
            self._log.failure("health probe of device {device} could not start", device=health.name)
            d = None
            self._finished(None, health, ProbeFailed("error", str(e)))
        if d is not None:
            d.addCallbacks(self._finished, self._failed, callbackArgs=(health, None), errbackArgs=(health,))
            d.addErrback(lambda f: self._log.failure("health probe bookkeeping failed", f))

    def _failed(self, failure, health):
        exc = failure.value if failure.check(ProbeFailed) else ProbeFailed("error", failure.getErrorMessage())
        self._finished(None, health, exc)

    def _finished(self, result, health, failure):
        health.probing = False
        self.in_flight -= 1
        if self.devices.get(health.name) is health:
            self._record(health, result, failure)
        while self._waiting and self.in_flight < self.settings.concurrency:
            self._run(self._waiting.popleft())

    def _record(self, health, result, failure):
        s = self.settings
        health.last_probe = self.reactor.seconds()
        health.history.append(failure is None)
        if failure is None:
            self.probes["ok"] += 1
            health.probes["ok"] += 1
            health.rtt_histogram.observe(result.rtt)
            if getattr(result, "fresh", True):
                health.last_fresh = health.last_probe
            self.rtt.observe(result.rtt)
            health.rtt = result.rtt
            health.last_error = None
            health.successes += 1
            health.failures = 0
            health.backoff = None
            if result.exit_address is not None and result.exit_address != health.exit_address:
                old, health.exit_address = health.exit_address, result.exit_address
                health.exit_changed = health.last_probe
                if old is not None:
                    self.exit_changes += 1
                    health.exit_changes += 1
                    self._log.warn(
                        "device {device} exit address changed from {old} to {new}",
                        device=health.name,
                        old=str(old),
                        new=str(result.exit_address),
                        event="device-exit-changed",
                    )
                    self._tell(self.exit_changed, health, old)
            if health.state in (UNKNOWN, DEGRADED) or (health.state == DOWN and health.successes >= s.rise):
                why = "probe answered in %.0f ms" % (result.rtt * 1000)
                if health.exit_address is not None:
                    why += ", exit address %s" % health.exit_address
                self._set_state(health, UP, why)
            delay = s.interval if health.state == UP else s.retry_interval
        else:
            self.probes[failure.kind] += 1
            health.probes[failure.kind] += 1
            health.last_error = str(failure)
            health.successes = 0
            health.failures += 1
            if health.state != DOWN and health.failures >= s.fall:
                self._set_state(health, DOWN, "%d probes failed in a row, the last: %s" % (health.failures, failure))
            elif health.state in (UNKNOWN, UP):
                self._set_state(health, DEGRADED, "probe failed: %s" % failure)
            if health.state == DOWN:
                health.backoff = s.retry_interval if health.backoff is None else min(health.backoff * 2, s.interval)
                delay = health.backoff
            else:
                delay = s.retry_interval
        for observer in self.observers:
            self._call(observer, health, result, failure)
        if self.running:
            self._schedule(health, delay * self._rng.uniform(0.9, 1.1))

    def _set_state(self, health, state, why):
        old = health.state
        if old == state:
            return
        health.state = state
        health.since = self.reactor.seconds()
        if state == UP:
            health.successes = max(health.successes, 1)
        self.transitions[(old, state)] += 1
        log = self._log.warn if state == DOWN or old == DOWN else self._log.info
        log(
            "device {device} is {state} (was {old}): {why}",
            device=health.name,
            state=state,
            old=old,
            why=why,
            event="device-state",
        )
        self._tell(self.state_changed, health, old)

    def _tell(self, listeners, health, old):
        for listener in listeners:
            self._call(listener, health, old)

    def _call(self, f, *args):
        try:
            f(*args)
        except Exception:
            self._log.failure("device health listener {f!r} failed", f=f)
