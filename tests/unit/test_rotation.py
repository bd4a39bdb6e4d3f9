"""ovpnmgr.rotation: pp rotate as a verified transaction (a real HealthMonitor on a Clock with
scripted probes, scripted rotation actions), and the action runner (a real command, a real
HTTP server on loopback)."""

import ipaddress
import random
import sys

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.web import resource, server

from ovpnmgr.directory import Device, RotateAction
from ovpnmgr.process import ProcessRunner
from ovpnmgr.rotation import DONE, FAILED, IDLE, ROTATING, RotationRefused, Rotator, action_runner
from proxy.health import HealthMonitor, HealthSettings
from proxy.probe import ProbeFailed, ProbeResult
from proxy.upstream import Upstream

SETTINGS = HealthSettings(interval=30.0, timeout=5.0, retry_interval=2.0, fall=3, rise=2, concurrency=8)
UP1 = Upstream.parse("http://192.168.255.2:8080")


class Phone:
    """Scripted probes of one phone whose exit address the test (or the action) changes."""

    def __init__(self):
        self.exit = "203.0.113.2"
        self.failing = False

    def __call__(self, reactor, upstream, target, timeout, fresh=True, key=None):
        if self.failing:
            return defer.fail(ProbeFailed("timeout", "scripted"))
        return defer.succeed(ProbeResult(0.4, ipaddress.ip_address(self.exit), 200))


class Actions:
    def __init__(self):
        self.calls = []
        self.pending = []

    def __call__(self, action):
        self.calls.append(action)
        d = defer.Deferred()
        self.pending.append(d)
        return d


def world(rotate=RotateAction(command=("rotate-it",)), timeout=60.0, min_interval=300.0):
    clock, phone, actions = Clock(), Phone(), Actions()
    monitor = HealthMonitor(clock, SETTINGS, probe=phone, rng=random.Random(1))
    devices = {"phone": Device("phone", UP1, rotate=rotate), "bare": Device("bare", UP1)}
    monitor.watch({"phone": (UP1, "t"), "bare": (UP1, "t")})
    monitor.start()
    clock.advance(31)  # first probes answered: up, exit known
    rotator = Rotator(clock, monitor, lambda: devices, actions, timeout, min_interval)
    return clock, phone, actions, monitor, rotator


def outcome(d):
    got = []
    d.addBoth(got.append)
    return got


def test_a_rotation_is_done_only_once_a_new_exit_address_is_seen_and_the_device_is_up():
    clock, phone, actions, monitor, rotator = world()
    got = outcome(rotator.rotate("phone"))
    assert rotator.state("phone")["state"] == ROTATING and actions.calls == [RotateAction(command=("rotate-it",))]
    clock.advance(5)
    assert got == []  # the action has not finished
    phone.exit = "203.0.113.50"
    actions.pending[0].callback(None)
    clock.advance(2.1)  # the next recheck probe sees the new address
    (result,) = got
    assert result["state"] == DONE and result["old_address"] == "203.0.113.2" and result["new_address"] == "203.0.113.50"
    assert 5 <= result["seconds"] <= 8 and rotator.results == {("phone", "done"): 1}


def test_a_second_request_while_rotating_joins_the_first_and_never_runs_the_action_twice():
    clock, phone, actions, monitor, rotator = world()
    first, second = outcome(rotator.rotate("phone")), outcome(rotator.rotate("phone"))
    assert len(actions.calls) == 1
    phone.exit = "203.0.113.51"
    actions.pending[0].callback(None)
    assert first == second and first[0]["state"] == DONE


def test_a_rotation_whose_address_never_changes_fails_at_the_timeout():
    clock, phone, actions, monitor, rotator = world(timeout=30.0)
    got = outcome(rotator.rotate("phone"))
    actions.pending[0].callback(None)
    clock.advance(29)
    assert got == [] and rotator.state("phone")["state"] == ROTATING
    clock.advance(1.1)
    assert got[0]["state"] == FAILED and "exit address still 203.0.113.2 after 30 s" in got[0]["error"]
    assert clock.getDelayedCalls() and all(c.func.__self__ is monitor for c in clock.getDelayedCalls())  # no rotation timers left


def test_a_failing_action_fails_the_rotation_with_its_reason():
    clock, phone, actions, monitor, rotator = world()
    got = outcome(rotator.rotate("phone"))
    actions.pending[0].errback(RuntimeError("rotate-it exited 3: modem busy"))
    assert got[0]["state"] == FAILED and got[0]["error"] == "rotation action failed: rotate-it exited 3: modem busy"


def test_a_phone_that_comes_back_with_a_new_address_but_not_yet_up_is_waited_for():
    clock, phone, actions, monitor, rotator = world()
    got = outcome(rotator.rotate("phone"))
    phone.failing = True  # the phone drops off while it changes address
    actions.pending[0].callback(None)
    clock.advance(20)
    assert monitor.get("phone").state == "down" and got == []
    phone.failing, phone.exit = False, "203.0.113.52"
    clock.advance(2.1)
    assert got == []  # a new address, but one good probe is not "up" after down (rise 2)
    clock.advance(2.1)
    assert got[0]["state"] == DONE


def test_refusals_say_why():
    clock, phone, actions, monitor, rotator = world(min_interval=300.0)
    with pytest.raises(RotationRefused, match="no such device nope"):
        rotator.rotate("nope")
    with pytest.raises(RotationRefused, match="device bare has no rotation action"):
        rotator.rotate("bare")
    got = outcome(rotator.rotate("phone"))
    phone.exit = "203.0.113.53"
    actions.pending[0].callback(None)
    assert got[0]["state"] == DONE
    clock.advance(100)
    with pytest.raises(RotationRefused, match=r"rotated 100 s ago; the next rotation is allowed in 200 s"):
        rotator.rotate("phone")
    clock.advance(201)
    outcome(rotator.rotate("phone"))
    assert len(actions.calls) == 2
    assert rotator.state("bare") == {"device": "bare", "state": IDLE}


def test_an_unknown_exit_address_cannot_be_verified_so_rotation_is_refused():
    clock, phone, actions, monitor, rotator = world()
    monitor.get("phone").exit_address = None
    with pytest.raises(RotationRefused, match="not known yet"):
        rotator.rotate("phone")


def test_the_command_runner_fails_on_a_non_zero_exit_with_the_last_line_of_stderr():
    run = action_runner(None, FakeRunnerFor({("rotate-it",): (3, b"", b"warming up\nmodem busy\n")}), 10)
    got = outcome(run(RotateAction(command=("rotate-it",))))
    assert "rotate-it exited 3: modem busy" in str(got[0].value)
    run = action_runner(None, FakeRunnerFor({("ok",): (0, b"", b"")}), 10)
    assert outcome(run(RotateAction(command=("ok",)))) == [None]


class FakeRunnerFor:
    def __init__(self, results):
        self.results = results

    def run(self, argv):
        return defer.succeed(self.results[tuple(argv)])


@pytest_twisted.inlineCallbacks
def test_the_real_runners_a_command_and_an_http_api_on_loopback():
    run = action_runner(reactor, ProcessRunner(reactor, 10), 10)
    yield run(RotateAction(command=(sys.executable, "-c", "pass")))
    with pytest.raises(RuntimeError, match="exited 4: no signal"):
        yield run(RotateAction(command=(sys.executable, "-c", "import sys; sys.stderr.write('no signal\\n'); sys.exit(4)")))

    seen = []

    class Rotate(resource.Resource):
        isLeaf = True

        def render_POST(self, request):
            seen.append(request.path)
            request.setResponseCode(200 if request.path == b"/rotate" else 503)
            return b"ok"

    port = reactor.listenTCP(0, server.Site(Rotate()), interface="127.0.0.1")
    try:
        base = "http://127.0.0.1:%d" % port.getHost().port
        yield run(RotateAction(url=base + "/rotate"))
        with pytest.raises(RuntimeError, match="HTTP 503"):
            yield run(RotateAction(url=base + "/broken"))
        assert seen == [b"/rotate", b"/broken"]
    finally:
        yield port.stopListening()
