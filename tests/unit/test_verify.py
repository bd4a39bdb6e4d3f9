"""Periodic firewall verification: drift found on a Clock, gauges updated, members repaired.

The unit-level World of test_controller (real Controller, FakeIPSet, scripted
OpenVPN) with a FakeRunner answering ``iptables -S`` with healthy chains.
"""

import ipaddress

from twisted.internet import defer
from twisted.logger import globalLogPublisher

from ovpnmgr.metrics import collect, render
from ovpnmgr.verify import FirewallVerifier
from tests.lab.prometheus import parse, value
from tests.unit.admin_world import admit, rules_world
from tests.unit.firewall_listings import FILTER6_S, NAT_S

IP = ipaddress.IPv4Address


def verifier_world(repair=True, interval=30):
    w, runner = rules_world()
    v = FirewallVerifier(w.clock, w.ops, interval, repair=repair)
    v.startService()
    return w, runner, v


def captured():
    events = []
    globalLogPublisher.addObserver(events.append)
    return events, lambda: globalLogPublisher.removeObserver(events.append)


def test_checks_run_every_interval_on_the_clock_and_stop_with_the_service():
    """Nothing runs before the first interval; then one check per interval; none after stopService."""
    w, runner, v = verifier_world(interval=30)
    w.clock.advance(29)
    assert v.checks == 0
    w.clock.advance(1)
    assert v.checks == 1 and w.ops.last_drift.ok
    w.clock.advance(30)
    w.clock.advance(30)
    assert v.checks == 3
    v.stopService()
    w.clock.advance(300)
    assert v.checks == 3 and w.clock.getDelayedCalls() == []


def test_drift_is_logged_with_members_and_repaired_and_counted():
    """A member deleted behind our back and a stranger added: warn with missing/extra, re-add the
    admitted client's member, remove the stranger, count both, gauges show the repaired state."""
    w, _, v = verifier_world()
    alice = admit(w, 0, at=0)
    w.ipset.delete(alice)
    w.ipset.add(IP("10.9.0.200"))
    events, stop = captured()
    try:
        w.clock.advance(30)
    finally:
        stop()
    [drift] = [e for e in events if e.get("event") == "drift"]
    assert drift["log_level"].name == "warn"
    assert drift["missing"] == [str(alice)] and drift["extra"] == ["10.9.0.200"]
    repaired = [e for e in events if e.get("event") == "drift-repaired"]
    assert [(e["action"], e["vpn_ip"]) for e in repaired] == [("member_added", str(alice)), ("member_removed", "10.9.0.200")]
    assert repaired[0]["user"] == "alice" and repaired[0]["cid"] == 0
    assert w.members() == {alice}
    assert v.repairs == {"member_added": 1, "member_removed": 1}
    fams = parse(render(collect(w.ops, verifier=v)))
    assert value(fams, "pocketproxy_ipset_drift", kind="missing") == 0
    assert value(fams, "pocketproxy_firewall_drift") == 0
    assert value(fams, "pocketproxy_firewall_repairs_total", action="member_added") == 1
    assert value(fams, "pocketproxy_firewall_repairs_total", action="rules_reinstalled") == 0
    assert value(fams, "pocketproxy_firewall_checks_total") == 1


def test_without_repair_drift_is_only_reported():
    """repair: false → the gauges show the drift and the kernel is left alone."""
    w, _, v = verifier_world(repair=False)
    alice = admit(w, 0, at=0)
    w.ipset.delete(alice)
    w.clock.advance(30)
    assert w.members() == set() and not v.repairs
    fams = parse(render(collect(w.ops, verifier=v)))
    assert value(fams, "pocketproxy_ipset_drift", kind="missing") == 1
    assert value(fams, "pocketproxy_firewall_drift") == 1


def test_missing_chain_is_reinstalled():
    """Rule drift (our nat chain gone) → the base rules are re-installed with iptables-restore."""
    w, runner, v = verifier_world()
    admit(w, 0, at=0)
    runner.on(NAT_S, stdout=b"-P PREROUTING ACCEPT\n")
    w.clock.advance(30)
    assert v.repairs["rules_reinstalled"] == 1
    assert any(argv[0] == "iptables-restore" for argv, _ in runner.calls)


def test_missing_ipv6_chains_are_reinstalled():
    """IPv6 rule drift (the ip6 filter chains flushed away) is found and re-installed like IPv4's."""
    w, runner, v = verifier_world()
    admit(w, 0, at=0)
    runner.on(FILTER6_S, stdout=b"-P INPUT ACCEPT\n-P FORWARD ACCEPT\n-P OUTPUT ACCEPT\n")
    events, stop = captured()
    try:
        w.clock.advance(30)
    finally:
        stop()
    [drift] = [e for e in events if e.get("event") == "drift"]
    assert "ip6 filter FORWARD: jump to POCKETPROXY missing" in drift["rule_problems"]
    assert v.repairs["rules_reinstalled"] == 1
    assert any(argv[0] == "ip6tables-restore" for argv, _ in runner.calls)


def test_nothing_is_checked_before_the_first_reconciliation():
    """Before the controller has rebuilt its view from status 3 it knows no clients: every
    surviving member would look extra, so the verifier waits."""
    w, _, v = verifier_world()
    w.controller.reconciled = False
    w.ipset.add(IP("10.9.0.9"))
    w.clock.advance(30)
    assert v.checks == 0 and IP("10.9.0.9") in w.members()


def test_admission_during_the_listing_is_not_drift():
    """A client admitted while iptables -S runs (its member added after the check began) is neither
    reported nor removed: members are compared at one instant, after the listing."""
    w, runner, v = verifier_world()
    held = defer.Deferred()
    runner.on(NAT_S, handler=lambda argv, stdin: held)
    w.clock.advance(30)
    alice = admit(w, 0, at=30)  # arrives while the check waits for iptables
    from tests.unit.firewall_listings import HEALTHY_NAT

    held.callback((0, HEALTHY_NAT.encode(), b""))
    assert w.ops.last_drift.ok and w.members() == {alice} and not v.repairs


def test_a_slow_check_is_not_stacked():
    """While one check waits on iptables, the next tick does not start another."""
    w, runner, v = verifier_world()
    held = defer.Deferred()
    runner.on(NAT_S, handler=lambda argv, stdin: held)
    w.clock.advance(30)
    w.clock.advance(30)
    assert sum(1 for argv, _ in runner.calls if argv == NAT_S) == 1
