# -*- test-case-name: tests.unit.test_rotation -*-
"""Changing a phone's exit address on purpose, as a verified transaction (``pp rotate DEVICE``).

A rotation runs the device's configured action (``rotate:`` in ``users.yaml``: a command, or
an HTTP request to the phone app or modem API), then probes the phone until the health probe
sees a **new** exit address and the device is ``up`` again; only then is it ``done``. Anything
else within ``health.rotation_timeout`` (the action failing, the address never changing, the
phone not coming back) ends it ``failed``, with the reason. States per device:
``idle → rotating → done | failed``.

- A second request while one runs joins it (same result); never two at once per device.
- Rotations of one device start at least ``health.rotation_min_interval`` apart; a request
  sooner is refused with how long to wait.
- Customers' connections through the phone are reset when the address changes
  (:mod:`ovpnmgr.devices`), so no TCP session spans two exit addresses.
"""

from collections import Counter

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from proxy.health import UP

__all__ = ["RotationRefused", "Rotator", "IDLE", "ROTATING", "DONE", "FAILED"]

IDLE, ROTATING, DONE, FAILED = "idle", "rotating", "done", "failed"
RECHECK = 2.0  # seconds between probes while waiting for the new address


class RotationRefused(Exception):
    """The rotation was not started; the message says why, for the operator."""


class _Rotation:
    def __init__(self, name, started, old):
        self.name = name
        self.state = ROTATING
        self.started = started
        self.ended = None
        self.old = old
        self.new = None
        self.error = None
        self.waiters = []
        self.timer = None
        self.recheck = None
        self.action = None

    def result(self):
        return {
            "device": self.name,
            "state": self.state,
            "old_address": str(self.old) if self.old is not None else None,
            "new_address": str(self.new) if self.new is not None else None,
            "started": self.started,
            "seconds": (self.ended - self.started) if self.ended is not None else None,
            "error": self.error,
        }


class Rotator:
    """Rotations of the devices a :class:`~proxy.health.HealthMonitor` watches.

    :param clock: IReactorTime for every timeout here.
    :param monitor: the :class:`~proxy.health.HealthMonitor` (its probes verify the new address).
    :param devices: ``() -> {name: Device}`` (the directory in force).
    :param run: ``RotateAction -> Deferred`` that fails when the action failed (see :func:`action_runner`).
    """

    _log = Logger()

    def __init__(self, clock, monitor, devices, run, timeout=120.0, min_interval=300.0):
        self.clock = clock
        self.monitor = monitor
        self.devices = devices
        self.run = run
        self.timeout = timeout
        self.min_interval = min_interval
        self.rotations = {}  # name -> its last _Rotation
        self.results = Counter()  # (device, "done"/"failed") -> count (metrics)
        monitor.observers.append(self._probed)

    def state(self, name):
        """``{"state", "error", "started", ...}`` of ``name``'s last rotation, or ``{"state": "idle"}``."""
        r = self.rotations.get(name)
        return r.result() if r is not None else {"device": name, "state": IDLE}

    def rotate(self, name):
        """Start (or join) a rotation of device ``name``.

        :returns: Deferred firing the rotation's :meth:`state` dict once it is ``done`` or
            ``failed`` (a failed rotation is a result, not an errback).
        :raises RotationRefused: unknown device, no action, not watched, exit address
            unknown, or too soon after the last rotation.
        """
        r = self.rotations.get(name)
        if r is not None and r.state == ROTATING:
            return self._wait(r)
        device = self.devices().get(name)
        if device is None:
            raise RotationRefused("no such device %s" % name)
        if device.rotate is None:
            raise RotationRefused("device %s has no rotation action (devices.%s.rotate in the users file)" % (name, name))
        health = self.monitor.get(name)
        if health is None:
            raise RotationRefused("device %s is not watched (health is off, or the device has no users)" % name)
        now = self.clock.seconds()
        if r is not None and now - r.started < self.min_interval:
            raise RotationRefused(
                "device %s was rotated %.0f s ago; the next rotation is allowed in %.0f s (health.rotation_min_interval %g s)"
                % (name, now - r.started, self.min_interval - (now - r.started), self.min_interval)
            )
        if health.exit_address is None:
            raise RotationRefused(
                "the exit address of device %s is not known yet: its health target must answer with the caller's address" % name
            )
        r = self.rotations[name] = _Rotation(name, now, health.exit_address)
        self._log.info(
            "rotating device {device}: exit address {old}", device=name, old=str(r.old), event="device-rotation-started"
        )
        r.timer = self.clock.callLater(self.timeout, self._timed_out, r)
        d = self._wait(r)
        try:
            r.action = self.run(device.rotate)
        except Exception as e:
            self._end(r, FAILED, "rotation action could not start: %s" % e)
            return d
        r.action.addCallbacks(self._acted, self._action_failed, callbackArgs=(r,), errbackArgs=(r,))
        return d

    def _wait(self, r):
        d = defer.Deferred()
        r.waiters.append(d)
        return d

    def _acted(self, _, r):
        r.action = None
        if r.state != ROTATING:
            return
        self._check(r)
        if r.state == ROTATING:
            self._recheck(r)

    def _action_failed(self, failure, r):
        r.action = None
        if r.state == ROTATING:
            self._end(r, FAILED, "rotation action failed: %s" % failure.getErrorMessage())

    def _recheck(self, r):
        r.recheck = None
        if r.state != ROTATING:
            return
        self.monitor.probe_now(r.name)
        r.recheck = self.clock.callLater(RECHECK, self._recheck, r)

    def _probed(self, health, result, failure):
        r = self.rotations.get(health.name)
        if r is not None and r.state == ROTATING and r.action is None:
            self._check(r)

    def _check(self, r):
        health = self.monitor.get(r.name)
        if health is not None and health.exit_address is not None and health.exit_address != r.old and health.state == UP:
            r.new = health.exit_address
            self._end(r, DONE, None)

    def _timed_out(self, r):
        r.timer = None
        if r.state != ROTATING:
            return
        health = self.monitor.get(r.name)
        if health is None:
            why = "device %s is no longer watched" % r.name
        elif health.exit_address == r.old:
            why = "exit address still %s after %g s" % (r.old, self.timeout)
        else:
            why = "device %s not healthy again within %g s (state %s)" % (r.name, self.timeout, health.state)
        if r.action is not None:
            r.action.cancel()
        self._end(r, FAILED, why)

    def _end(self, r, state, error):
        r.state = state
        r.error = error
        r.ended = self.clock.seconds()
        self.results[r.name, state] += 1
        for call in (r.timer, r.recheck):
            if call is not None and call.active():
                call.cancel()
        r.timer = r.recheck = None
        if state == DONE:
            self._log.info(
                "device {device} rotated: exit address {old} -> {new} in {seconds:.1f} s",
                device=r.name,
                old=str(r.old),
                new=str(r.new),
                seconds=r.ended - r.started,
                event="device-rotated",
            )
        else:
            self._log.warn("rotation of device {device} failed: {error}", device=r.name, error=error, event="device-rotation-failed")
        waiters, r.waiters = r.waiters, []
        for d in waiters:
            d.callback(r.result())


def action_runner(reactor, runner, timeout, agent=None):
    """``RotateAction -> Deferred``: a command through ``runner`` (an
    :class:`~ovpnmgr.process.ProcessRunner`; a non-zero exit fails, with its stderr), or an HTTP
    request (a 2xx answer within ``timeout`` s succeeds). The URL is never logged: it may hold
    the API's token."""

    def run(action):
        if action.command:
            def exited(result):
                code, out, err = result
                if code != 0:
                    text = (err or out).decode("utf-8", "replace").strip().splitlines()
                    raise RuntimeError("%s exited %d%s" % (action.command[0], code, (": " + text[-1][:200]) if text else ""))
                return None

            return runner.run(list(action.command)).addCallback(exited)
        from twisted.web.client import Agent

        client = agent if agent is not None else Agent(reactor)
        d = client.request(action.method.encode("ascii"), action.url.encode("utf-8"))

        def answered(response):
            response.deliverBody(_Discard())  # the answer's code is all we need
            if not 200 <= response.code < 300:
                raise RuntimeError("the rotation API answered HTTP %d" % response.code)
            return None

        d.addCallback(answered)
        return d.addTimeout(timeout, reactor)

    return run


class _Discard(Protocol):
    """Drops the rotation API's body, closing its connection instead of draining it."""

    def connectionMade(self):
        self.transport.stopProducing()
