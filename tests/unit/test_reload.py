"""Live reload of the users file: Controller.reload/reload_file, ``pp reload``, SIGHUP.

The unit-level World of test_controller (real ManagementProtocol on a scripted
OpenVPN peer, in-memory ipset, Clock); live proxied connections are fakes
registered in the real MappingTable. No sockets, no root.
"""

import ipaddress
import json
import os
import signal

import pytest
from twisted.internet import defer

from ovpnmgr.admin import AdminFactory
from ovpnmgr.config import ConfigError
from ovpnmgr.directory import Directory, hash_password
from ovpnmgr.tap import ReloadOnSignal
from ovpnmgr.testing import connect_env
from tests.unit.admin_world import Admin, _parse, admit, crlf
from tests.unit.controller_world import HASH, SUBNET, USERS, World

IP = ipaddress.IPv4Address


class Live:
    """A live proxied connection (MappingTable only needs abortConnection)."""

    def __init__(self):
        self.aborted = 0

    def abortConnection(self):
        self.aborted += 1


def parse(text):
    return Directory.parse(text, "users.yaml", SUBNET, IP("10.9.0.1"))


def edited(*replacements):
    text = USERS
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    return text


def world(tmp_path=None):
    """alice (p1, dynamic), bob (p2), carol (p1, static .77) admitted, each with one live connection."""
    w = World()
    w.addr = {"alice": admit(w, 0), "bob": admit(w, 1, user="bob"), "carol": admit(w, 2, user="carol")}
    w.live = {}
    for name, ip in w.addr.items():
        w.live[name] = Live()
        w.mappings.register(ip, w.live[name])
    w.session = {name: w.controller.sessions[(w.controller.epoch, cid)] for cid, name in enumerate(w.addr)}
    if tmp_path is not None:
        w.path = tmp_path / "users.yaml"
        w.path.write_text(USERS)
        w.controller.directory.path = str(w.path)
    w.script.clear_sent()
    return w


def untouched(w, *names):
    for name in names:
        ip = w.addr[name]
        assert w.live[name].aborted == 0, name
        assert w.mappings.owner(ip) is w.session[name], name
        assert ip in w.members(), name
        assert w.controller.sessions[w.session[name].key] is w.session[name], name


def test_removed_user_is_kicked_and_torn_down_at_once():
    """bob removed: client-kill of his CID, his mapping (and live connection), member and address go now."""
    w = world()
    summary = w.ops.reload(parse(edited(('  bob: {password: "%s", device: p2}\n' % HASH, ""))))
    assert summary == {
        "path": "users.yaml", "users": 3, "added": 0, "removed": 1, "changed": 0, "kicked": 1, "remapped": 0
    }
    assert w.script.sent_commands() == ["client-kill 1"]
    bob = w.addr["bob"]
    assert w.live["bob"].aborted == 1
    assert bob not in w.mappings and bob not in w.members() and w.pool.owner(bob) is None
    assert "bob" not in w.controller.directory.users
    untouched(w, "alice", "carol")
    w.script.notify_disconnect(1, {})  # the DISCONNECT that follows the kill: nothing left to do
    untouched(w, "alice", "carol")
    w.connect(5, user="bob")  # and bob cannot come back
    assert w.commands("client-deny")[-1].startswith('client-deny 5 1 "unknown user')


def test_device_change_remaps_and_aborts_only_that_users_connections():
    """alice p1 → p2: same session and address, mapping now to p2's upstream, her live connection aborted."""
    w = world()
    summary = w.ops.reload(parse(edited(('alice: {password: "%s", device: p1}' % HASH, 'alice: {password: "%s", device: p2}' % HASH))))
    assert (summary["changed"], summary["kicked"], summary["remapped"]) == (1, 0, 1)
    assert w.script.sent_commands() == []
    alice = w.addr["alice"]
    assert w.mappings.lookup(alice) == w.controller.directory.devices["p2"].upstream
    assert w.mappings.owner(alice) is w.session["alice"] and alice in w.members()
    assert w.live["alice"].aborted == 1
    assert w.session["alice"].user.device.name == "p2"
    untouched(w, "bob", "carol")
    # re-authentication of alice still passes: the session knows her new device
    w.script.notify_reauth(0, 3, connect_env(username="alice", password="pw"))
    assert w.commands("client-auth-nt") == ["client-auth-nt 0 3"]


def test_device_url_change_remaps_every_user_of_that_device():
    """p1's upstream URL changes: alice and carol remapped (connections aborted); bob (p2) untouched."""
    w = world()
    summary = w.ops.reload(parse(edited(("192.168.255.2:8080", "192.168.255.9:8080"))))
    assert (summary["changed"], summary["kicked"], summary["remapped"]) == (2, 0, 2)
    for name in ("alice", "carol"):
        assert str(w.mappings.lookup(w.addr[name])) == "http://192.168.255.9:8080"
        assert w.live[name].aborted == 1
    untouched(w, "bob")
    assert w.script.sent_commands() == []


def test_unchanged_file_touches_nothing():
    """Reloading the same content: no kill, no abort, counts zero."""
    w = world()
    summary = w.ops.reload(parse(USERS))
    assert summary == {
        "path": "users.yaml", "users": 4, "added": 0, "removed": 0, "changed": 0, "kicked": 0, "remapped": 0
    }
    untouched(w, "alice", "bob", "carol")
    assert w.script.sent_commands() == []


def test_static_address_change_kicks_and_the_new_address_is_reserved():
    """carol .77 → .78: kicked and torn down; .77 is free for others, .78 is hers only."""
    w = world()
    summary = w.ops.reload(parse(edited(("10.9.0.77", "10.9.0.78"))))
    assert (summary["changed"], summary["kicked"]) == (1, 1)
    assert w.script.sent_commands() == ["client-kill 2"]
    assert w.live["carol"].aborted == 1 and IP("10.9.0.77") not in w.members()
    untouched(w, "alice", "bob")
    assert w.pool._static == frozenset({IP("10.9.0.78")})
    w.connect(6, user="carol")
    assert w.commands("client-auth")[-1].startswith("client-auth 6 1\nifconfig-push 10.9.0.78 ")


def test_a_newly_reserved_static_address_is_taken_back_from_its_holder():
    """bob gets alice's dynamic address as his static one: alice is kicked (she gets another), bob too."""
    w = world()
    text = edited(('bob: {password: "%s", device: p2}' % HASH, 'bob: {password: "%s", device: p2, address: %s}' % (HASH, w.addr["alice"])))
    summary = w.ops.reload(parse(text))
    assert summary["kicked"] == 2
    assert sorted(w.script.sent_commands()) == ["client-kill 0", "client-kill 1"]
    untouched(w, "carol")


def test_added_and_password_changed_users():
    """A new user can log in at once; a changed password applies to the next (re)authentication only."""
    w = world()
    new_hash = hash_password("new", n=16)
    text = edited(('alice: {password: "%s"' % HASH, 'alice: {password: "%s"' % new_hash))
    text += '  dave: {password: "%s", device: p2}\n' % HASH
    summary = w.ops.reload(parse(text))
    assert (summary["added"], summary["changed"], summary["kicked"]) == (1, 1, 0)
    untouched(w, "alice", "bob", "carol")
    w.script.notify_reauth(0, 3, connect_env(username="alice", password="pw"))
    assert w.commands("client-deny")[-1].startswith("client-deny 0 3 ")
    w.script.notify_reauth(0, 4, connect_env(username="alice", password="new"))
    assert w.commands("client-auth-nt") == ["client-auth-nt 0 4"]
    w.connect(7, user="dave")
    assert w.commands("client-auth")[-1].startswith("client-auth 7 1\n")


def test_authentication_in_flight_for_a_changed_user_is_retried():
    """A CONNECT still checking its password against the old file for a changed user: TEMP deny, no auth later."""
    w = World()
    pending = []
    w.controller.run_blocking = lambda f, *args: pending.append(defer.Deferred()) or pending[-1]
    w.connect(0, user="alice")
    w.connect(1, user="bob")
    assert len(pending) == 2
    w.ops.reload(parse(edited(('alice: {password: "%s", device: p1}' % HASH, 'alice: {password: "%s", device: p2}' % HASH))))
    assert w.commands("client-deny") == ['client-deny 0 1 "users file reloaded during authentication" "TEMP[backoff 7,advance no]: temporary failure, retrying"']
    pending[0].callback(True)
    pending[1].callback(True)
    assert [c.split("\n")[0] for c in w.commands("client-auth")] == ["client-auth 1 1"]


def test_bad_file_is_refused_and_the_old_directory_stays(tmp_path):
    """Unknown device, bad hash, bad YAML, missing file: ConfigError file: key: problem; nothing changes."""
    w = world(tmp_path)
    before = w.controller.directory
    cases = [
        (edited(("device: p2}", "device: p9}")), "users.bob.device: no such device 'p9'"),
        (edited(('bob: {password: "%s"' % HASH, 'bob: {password: "plain"')), "users.bob.password: not a scrypt hash"),
        ("users: [\n", "(top level): invalid YAML"),
        (edited(("10.9.0.77", "10.8.0.77")), "users.carol.address: 10.8.0.77 is not a usable client address"),
    ]
    for text, problem in cases:
        w.path.write_text(text)
        with pytest.raises(ConfigError) as e:
            w.ops.reload_file()
        assert str(e.value).startswith(str(w.path) + ": ") and problem in str(e.value), str(e.value)
        assert w.controller.directory is before
    w.path.unlink()
    with pytest.raises(ConfigError, match="cannot read users file"):
        w.ops.reload_file()
    assert w.controller.directory is before and w.pool._static == frozenset({IP("10.9.0.77")})
    untouched(w, "alice", "bob", "carol")
    assert w.script.sent_commands() == []


def test_reload_without_management_still_tears_down_removed_users():
    """Management down: the removed user's rules go now; the kill is left to reconciliation (unknown user)."""
    w = world()
    w.script.disconnect()
    summary = w.ops.reload(parse(edited(('  bob: {password: "%s", device: p2}\n' % HASH, ""))))
    assert summary["kicked"] == 1
    assert w.addr["bob"] not in w.members() and w.live["bob"].aborted == 1


# --- the admin verb ---------------------------------------------------------------------


def test_pp_reload_text_and_json(tmp_path):
    """pp reload: one SUCCESS line with the counts; --json one JSON line then END."""
    w = world(tmp_path)
    a = Admin(AdminFactory(w.ops))
    w.path.write_text(edited(('  bob: {password: "%s", device: p2}\n' % HASH, ""), ("alice: {password: \"%s\", device: p1}" % HASH, "alice: {password: \"%s\", device: p2}" % HASH)))
    assert a.send("pp reload") == b"SUCCESS: reloaded users file: 3 users (added 0, removed 1, changed 1, kicked 1)\r\n"
    assert w.script.sent_commands() == ["client-kill 1"]
    out = a.send("pp reload --json")
    assert out.endswith(b"\r\nEND\r\n") and out.count(b"\r\n") == 2
    assert json.loads(out.split(b"\r\n")[0]) == {
        "ok": True, "path": str(w.path), "users": 3, "added": 0, "removed": 0, "changed": 0, "kicked": 0, "remapped": 0
    }
    assert a.send("pp reload now") == b"ERROR: usage: see 'pp help'\r\n"
    assert b"pp reload" in a.send("pp help")


def test_pp_reload_refuses_a_bad_file(tmp_path):
    """A bad file: ERROR: reload refused: <file: key: problem>; previous users stay in force."""
    w = world(tmp_path)
    a = Admin(AdminFactory(w.ops))
    w.path.write_text(edited(("device: p2}", "device: p9}")))
    expected = "ERROR: reload refused: %s: users.bob.device: no such device 'p9'; previous users stay in force" % w.path
    assert a.send("pp reload") == crlf(expected)
    out = a.send("pp reload --json")
    assert json.loads(out.split(b"\r\n")[0]) == {"ok": False, "error": "%s: users.bob.device: no such device 'p9'" % w.path}
    w.path.write_text("users: [\n  x")
    line = a.send("pp reload")
    assert line.startswith(b"ERROR: reload refused: ") and line.count(b"\r\n") == 1
    untouched(w, "alice", "bob", "carol")


# --- SIGHUP --------------------------------------------------------------------------------


class ThreadCalls:
    def __init__(self):
        self.calls = []

    def callFromThread(self, f, *args):
        self.calls.append((f, args))


def test_sighup_schedules_a_reload_on_the_reactor_and_restores_the_handler(tmp_path):
    """startService installs the SIGHUP handler (callFromThread only); stopService restores the previous one."""
    w = world(tmp_path)
    w.path.write_text(edited(('  bob: {password: "%s", device: p2}\n' % HASH, "")))
    reactor = ThreadCalls()
    chained = []
    previous = signal.signal(signal.SIGHUP, lambda signum, frame: chained.append(signum))
    try:
        svc = ReloadOnSignal(reactor, w.ops)
        svc.startService()
        os.kill(os.getpid(), signal.SIGHUP)
        assert w.script.sent_commands() == []  # nothing done inside the handler
        assert [f for f, _ in reactor.calls] == [svc.reload] and chained == [signal.SIGHUP]
        reactor.calls[0][0]()
        assert w.script.sent_commands() == ["client-kill 1"]
        w.path.write_text("users: [")
        assert svc.reload() is None and "bob" not in w.controller.directory.users  # bad file: logged, kept
        svc.stopService()
        os.kill(os.getpid(), signal.SIGHUP)
        assert len(reactor.calls) == 1 and chained == [signal.SIGHUP, signal.SIGHUP]
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_tap_wires_the_sighup_service(tmp_path):
    """build() puts a ReloadOnSignal over the controller into the daemon."""
    from twisted.internet.testing import MemoryReactorClock

    from ovpnmgr.ipset import FakeIPSet
    from ovpnmgr.tap import build

    config = _parse(tmp_path, os.getgid())
    top, controller = build(MemoryReactorClock(), config, parse(USERS), None, ipset=FakeIPSet())
    found = [s for s in top if isinstance(s, ReloadOnSignal)]
    assert len(found) == 1 and found[0].operations.c is controller
