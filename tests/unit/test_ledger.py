"""The ledger: address, kernel set member and mapping held as one, and its invariant.

Real AddressPool, MappingTable and Firewall (membership over a FakeIPSet); sessions are
real :class:`~ovpnmgr.session.Session` objects with users from a parsed users file.
"""

import ipaddress

import pytest
from twisted.internet import defer

from ovpnmgr.config import FirewallConfig
from ovpnmgr.directory import Directory
from ovpnmgr.firewall import Drift, Firewall, FirewallError, MemberSync
from ovpnmgr.ipset import FakeIPSet, IPSetError
from ovpnmgr.ledger import Ledger
from ovpnmgr.pool import AddressPool, PoolExhausted
from ovpnmgr.session import Session, State, TemporaryFailure
from proxy.mappings import MappingTable

IP = ipaddress.IPv4Address
SUBNET = ipaddress.IPv4Network("10.9.0.0/24")
USERS = """
devices:
  p1: {upstream: "http://192.168.255.2:8080"}
  p2: {upstream: "socks5://192.168.255.3:1080"}
users:
  alice: {common_name: alice, device: p1}
  bob: {common_name: bob, device: p2}
  carol: {common_name: carol, device: p1, address: 10.9.0.77}
"""


class World:
    def __init__(self, pool=None, **ipset):
        self.directory = Directory.parse(USERS, "users.yaml", SUBNET, IP("10.9.0.1"))
        self.pool = pool or AddressPool(SUBNET, "10.9.0.1", static=self.directory.static_addresses())
        self.ipset = FakeIPSet(**ipset)
        self.firewall = Firewall(FirewallConfig(), 12345, SUBNET, self.ipset, runner=None)
        self.mappings = MappingTable()
        self.ledger = Ledger(self.pool, self.firewall, self.mappings)
        self.live = []
        self.cid = 0

    def session(self, name):
        s = Session(1, self.cid, 1, {"common_name": name}, 0.0)
        self.cid += 1
        s.user = self.directory.users[name]
        return s

    def admit(self, name):
        s = self.session(name)
        self.ledger.admit(s)
        self.live.append(s)
        return s

    def end(self, s):
        s.state = State.ENDED
        self.live.remove(s)
        self.ledger.release(s)

    def problems(self):
        return self.ledger.problems(self.live)


def test_admit_holds_address_member_and_mapping_and_release_drops_all():
    w = World()
    a = w.admit("alice")
    assert a.address == IP("10.9.0.2") and w.ipset.content == {a.address}
    route = w.mappings.route(a.address)
    assert (route.upstream, route.device, route.log_fields["user"]) == (w.directory.devices["p1"].upstream, "p1", "alice")
    assert w.problems() == []
    w.end(a)
    assert a.address is None and w.ipset.content == set() and len(w.mappings) == 0 and w.pool.in_use() == {}
    assert w.problems() == []


@pytest.mark.parametrize("step", ["pool", "member", "mapping"])
def test_admit_is_all_or_nothing(step):
    """Whichever step fails, nothing is left behind and the error reaches the caller."""
    w = World(pool=AddressPool("10.9.0.0/30", "10.9.0.1")) if step == "pool" else World()
    if step == "pool":
        w.admit("alice")
        with pytest.raises(PoolExhausted):
            w.ledger.admit(w.session("bob"))
        assert w.problems() == []
        return
    if step == "member":
        w.ipset.fail_next_add = True
        error = FirewallError
    else:
        w.mappings.transfer = lambda *a: (_ for _ in ()).throw(RuntimeError("mapping broke"))
        error = RuntimeError
    s = w.session("alice")
    with pytest.raises(error):
        w.ledger.admit(s)
    assert s.address is None and w.ipset.content == set() and w.pool.in_use() == {}
    assert w.mappings.addresses() == set() and w.problems() == []


def test_a_static_address_moves_to_the_same_user_and_comes_back_if_that_admission_fails():
    w = World()
    first = w.admit("carol")
    second = w.session("carol")
    w.ipset.fail_next_add = True  # the second admission fails after taking the address
    with pytest.raises(FirewallError):
        w.ledger.admit(second)
    assert first.address == IP("10.9.0.77") and w.mappings.owner(first.address) is first
    assert w.problems() == []
    third = w.admit("carol")  # succeeds: the address moves, the first instance no longer holds it
    w.live.remove(first)
    assert third.address == IP("10.9.0.77") and first.address is None and w.mappings.owner(third.address) is third
    assert w.problems() == []


def test_another_users_static_address_is_a_temporary_failure():
    w = World()
    w.admit("carol")
    s = w.session("alice")
    s.user = w.directory.users["carol"].__class__(**{**w.directory.users["carol"].__dict__, "name": "mallory"})
    with pytest.raises(TemporaryFailure):
        w.ledger.admit(s)
    assert w.problems() == []


def test_sync_restores_mappings_and_members_sweeps_strays_and_returns_who_it_could_not_restore():
    w = World()
    a, b = w.admit("alice"), w.admit("bob")
    w.mappings.remove(a.address)  # lost behind our back
    w.ipset.content.clear()
    w.ipset.content.add(IP("10.9.0.200"))  # a member of nobody
    stray = w.session("alice")
    w.pool.allocate(stray)  # an address held for nobody live
    assert w.problems() != []
    assert w.ledger.sync(w.live) == []
    assert w.problems() == []
    w.ipset.fail_next_add = True
    w.ipset.content.discard(b.address)
    assert w.ledger.sync(w.live) == [b] and b.address is None  # released; the caller ends and kills it
    w.live.remove(b)
    assert w.problems() == []


def test_update_rebuilds_the_route_and_says_when_the_device_moved():
    w = World()
    a = w.admit("alice")
    moved = Directory.parse(USERS.replace("alice: {common_name: alice, device: p1}", "alice: {common_name: alice, device: p2}"), "u", SUBNET, IP("10.9.0.1"))
    assert w.ledger.update(a, moved.users["alice"]) is True
    assert w.mappings.route(a.address).device == "p2" and w.problems() == []
    private = Directory.parse(USERS.replace("alice: {common_name: alice, device: p1}", "alice: {common_name: alice, device: p2, private_networks: allow}"), "u", SUBNET, IP("10.9.0.1"))
    assert w.ledger.update(a, private.users["alice"]) is False
    assert w.mappings.policy(a.address).allow_private


def test_problems_names_each_disagreement():
    w = World()
    a = w.admit("alice")
    w.ipset.content.clear()
    assert any("kernel set" in p for p in w.problems())
    assert w.ledger.problems(w.live, kernel=False) == []
    w.ipset.content.add(a.address)
    w.mappings.transfer(a.address, w.directory.devices["p2"].upstream, a)
    assert any("mapped to" in p for p in w.problems())
    w.mappings.transfer(a.address, a.route(), "someone else")
    assert any("mapping owner" in p for p in w.problems())
    w.mappings.transfer(a.address, a.route(), a)
    a.state = State.ENDED
    assert any("ended session" in p for p in w.problems())
    assert any("pool" in p for p in w.ledger.problems([]))


class StubFirewall:
    """A firewall whose rules are reported broken once and whose install can fail."""

    def __init__(self, install_error=None):
        self.installs = 0
        self.install_error = install_error
        self.synced = []
        self.ipset = FakeIPSet()

    def install(self):
        self.installs += 1
        return defer.fail(self.install_error) if self.install_error else defer.succeed(None)

    def sync_members(self, expected):
        self.synced.append(set(expected))
        self.ipset.content = set(expected)
        return MemberSync(added=tuple(sorted(expected)))

    def member_diff(self, expected):
        expected, actual = frozenset(expected), frozenset(self.ipset.content)
        return expected - actual, actual - expected

    def check(self, expected):
        return defer.succeed(Drift(missing_chain_rules=True, rule_problems=("nat PREROUTING: jump missing",)))


def _ledger(firewall):
    pool = AddressPool(SUBNET, "10.9.0.1")
    return Ledger(pool, firewall, MappingTable()), pool


def test_repair_reinstalls_rules_then_makes_members_what_the_ledger_holds():
    fw = StubFirewall()
    ledger, pool = _ledger(fw)
    pool.allocate("someone")
    drift = []
    ledger.check().addCallback(drift.append)
    assert ledger.last_drift is drift[0] and not drift[0].ok
    result = []
    ledger.repair(drift[0]).addCallback(result.append)
    reinstalled, sync = result[0]
    assert reinstalled and fw.installs == 1 and fw.synced == [{IP("10.9.0.2")}]
    assert ledger.last_drift.ok


def test_repair_of_member_drift_only_does_not_reinstall():
    fw = StubFirewall()
    ledger, _ = _ledger(fw)
    result = []
    ledger.repair(Drift(extra_members=frozenset({IP("10.9.0.9")}))).addCallback(result.append)
    assert result[0][0] is False and fw.installs == 0 and fw.synced == [set()]


def test_a_failed_reinstall_fails_the_repair():
    fw = StubFirewall(install_error=FirewallError("cannot install firewall: line 4 failed", operation="install"))
    ledger, _ = _ledger(fw)
    failures = []
    ledger.repair(Drift(set_missing=True)).addErrback(failures.append)
    assert failures and failures[0].check(FirewallError) and fw.synced == []


def test_a_failed_member_removal_on_release_is_logged_and_the_address_still_freed():
    w = World()
    a = w.admit("alice")
    w.ipset.fail_next_delete = IPSetError("del", w.ipset.name, a.address, 1)
    w.end(a)
    assert w.pool.in_use() == {} and len(w.mappings) == 0
