"""Device health (issue 16) against real OpenVPN 2.6, the real daemon and two tinyproxy phones.

One lab for the module (torn down at the end, also on failure)::

    alice, carol ── OpenVPN ── server ns ── phone  (tinyproxy, BasicAuth) ──┐
    bob          ──            pocketproxy ── phone2 (tinyproxy) ────────────┴── origin 203.0.113.10

The daemon probes each phone through its own proxy to the origin's ``/whoami`` (the lab
internet's "what is my address" service, as ``https://api.ipify.org/`` is on the real one),
with a detection time configured for the test (``interval 5, timeout 3, retry 1, fall 3``:
a silent phone is down within about 15 s). A phone "loses signal" by dropping every packet
between it and the server in its own namespace: nothing is refused, connections just stall,
as on a real cellular link; this is the case a refused connection cannot show.
"""

import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from tests.integration.helpers import pp_json
from tests.lab.childlines import ChildLines
from tests.lab.daemon import ROOT, Daemon
from tests.lab.dnsclient import SERVFAIL, dig
from tests.lab.netns import require_root, require_tools, wait_for
from tests.lab.openvpn import OPENVPN, Lab
from tests.lab.probes import NETCLIENT, run_json
from tests.lab.world import ORIGIN_IP, TINYPROXY, World

HEALTH = {
    "enabled": True,
    "target": "http://%s/whoami" % ORIGIN_IP,
    "interval": 5,
    "timeout": 3,
    "retry_interval": 1,
    "fall": 3,
    "rise": 2,
}
DETECTION = 5 + 3 * (3 + 1) + 5  # interval + fall x (timeout + retry) + slack
ROTATED_IP = "203.0.113.50"
ROTATION_TIMEOUT = 12  # a rotation whose address never changes fails after this


def move_address(phone, new):
    """Shell text, run in the phone's namespace: its origin-side address becomes ``new``."""
    return (
        "dev=$(ip -o -4 addr show to {old} | awk '{{print $2}}') && "
        "ip addr del {old}/24 dev $dev && ip addr add {new}/24 dev $dev && "
        "ip route replace default via 203.0.113.254"
    ).format(old=phone.origin_ip, new=new)


def ctl(*argv, timeout=60):
    """``pocketproxyctl`` from the checkout (the admin socket is a file the host namespace sees)."""
    return subprocess.run(
        [sys.executable, "-m", "ovpnmgr.ctl", *argv], cwd=str(ROOT), capture_output=True, text=True, timeout=timeout
    )


class Env:
    def __init__(self, lab, world, daemon, phone, phone2, alice, bob, admin_path):
        self.lab, self.world, self.daemon = lab, world, daemon
        self.phone, self.phone2, self.alice, self.bob = phone, phone2, alice, bob
        self.admin_path = admin_path

    def devices(self):
        return {d["device"]: d for d in pp_json(self.admin_path, "devices")["devices"]}

    def health(self, name):
        return self.devices()[name]["health"]

    def wait_state(self, name, state, timeout):
        wait_for(lambda: (self.health(name) or {}).get("state") == state, timeout, interval=0.1,
                 what="device %s %s\n%s" % (name, state, self.daemon.tail(30)))
        return self.health(name)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    require_root()
    require_tools(OPENVPN, "ipset", "iptables", TINYPROXY)
    base = tmp_path_factory.mktemp("health")
    sockdir = tempfile.mkdtemp(prefix="pphealth-")
    admin_path = os.path.join(sockdir, "admin.sock")
    try:
        with Lab(base / "lab") as lab, World(lab.server_ns, base / "world", lab.internet) as world:
            phone = world.add_device("phone", username="dev", password="devpw")
            phone2 = world.add_device("phone2")
            # The phone's rotation action: move its address on the origin-side link, as a carrier
            # hands a phone a new one. phone2's action "succeeds" but changes nothing.
            rotate = {"command": ["ip", "netns", "exec", phone.ns.name, "sh", "-c", move_address(phone, ROTATED_IP)]}
            daemon = Daemon(
                lab.server_ns,
                base / "daemon",
                lab.server.mgmt_socket,
                {
                    "alice": {"password": "alice-pw", "device": "phone"},
                    "bob": {"password": "bob-pw", "device": "phone2"},
                    "carol": {"password": "carol-pw", "device": "phone"},
                },
                devices={"phone": {"upstream": phone.url, "rotate": rotate},
                         "phone2": {"upstream": phone2.url, "rotate": {"command": ["true"]}}},
                admin={"socket": admin_path},
                openvpn={"temp_backoff": 3},
                health=dict(HEALTH, rotation_timeout=ROTATION_TIMEOUT),
            ).start()
            try:
                daemon.wait_log(r"reconciled with OpenVPN", timeout=30)
                alice = lab.add_client("alice", username="alice", password="alice-pw")
                bob = lab.add_client("bob", username="bob", password="bob-pw")
                alice.wait_connected(timeout=30)
                bob.wait_connected(timeout=30)
                yield Env(lab, world, daemon, phone, phone2, alice, bob, admin_path)
            except BaseException:
                print("%s\n%s\n==== pocketproxy ====\n%s" % (lab.logs(20), world.logs(20), daemon.tail(80)))
                raise
            finally:
                daemon.stop()
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def epoch(iso):
    return datetime.datetime.fromisoformat(iso).timestamp()


def test_both_phones_come_up_with_their_exit_addresses(env):
    """Each phone is probed through its own proxy: up, with an RTT and the address the origin saw."""
    for device, phone in (("phone", env.phone), ("phone2", env.phone2)):
        health = env.wait_state(device, "up", timeout=15)
        assert health["exit_address"] == phone.origin_ip, health
        assert 0 < health["rtt_ms"] < 3000 and health["last_error"] is None, health
    assert env.devices()["phone"]["users"] == ["alice", "carol"]


class Held:
    """A long-lived connection from a client namespace through its phone to the origin's :22."""

    def __init__(self, client):
        self.proc = client.ns.popen(
            [sys.executable, NETCLIENT, "--timeout", "120", "hold", ORIGIN_IP, "22"],
            stdout=subprocess.PIPE,
        )
        self.lines = ChildLines(self.proc.stdout)
        first = self.lines.json(15, self.proc)
        assert first.get("first", "").startswith("SSH-2.0-origin"), first

    def result(self, timeout):
        line = self.lines.readline(timeout)
        return None if line is None else json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


def silence(phone, server_ip):
    """The phone "loses signal": every packet between it and the server is dropped, in its namespace."""
    phone.ns.run("iptables", "-I", "INPUT", "-s", server_ip, "-j", "DROP")
    phone.ns.run("iptables", "-I", "OUTPUT", "-d", server_ip, "-j", "DROP")


def restore(phone, server_ip):
    phone.ns.run("iptables", "-D", "INPUT", "-s", server_ip, "-j", "DROP")
    phone.ns.run("iptables", "-D", "OUTPUT", "-d", server_ip, "-j", "DROP")


def test_a_silent_phone_goes_down_its_customers_are_reset_and_refused_and_return_with_it(env):
    """The phone stops answering: it goes down within the configured detection time; alice's live
    connection is reset within a second of that (not at some TCP timeout), her uncached DNS gets
    SERVFAIL at once, a new customer of that phone (carol) is denied AUTH_FAILED,TEMP with the
    reason "device offline", and bob on the other phone keeps his connection. Once the phone
    answers again it comes back up and carol is admitted by her own client's retry."""
    env.wait_state("phone", "up", timeout=15)
    env.wait_state("phone2", "up", timeout=15)
    alice_conn, bob_conn = Held(env.alice), Held(env.bob)
    carol = None
    try:
        silenced_at = time.time()
        silence(env.phone, env.phone.server_ip)
        try:
            health = env.wait_state("phone", "down", timeout=DETECTION)
            down_at = epoch(health["since"])
            print("phone down %.1f s after it went silent" % (down_at - silenced_at))
            ended = alice_conn.result(timeout=5)
            assert ended is not None and ended["outcome"] == "reset", ended
            assert down_at - 0.05 <= ended["ended_at"] <= down_at + 1.0, (ended, health)
            assert bob_conn.proc.poll() is None  # the other phone's customer: untouched
            assert env.health("phone2")["state"] == "up"

            got = dig(env.alice.ns, "uncached-while-down.test", timeout=5)
            assert got.get("rcode") == SERVFAIL and got["seconds"] < 1.0, got

            carol = env.lab.add_client("carol", username="carol", password="carol-pw")
            carol.wait_log(r"AUTH_FAILED,TEMP\[backoff 3,advance no\]: device offline", timeout=20)
            assert "admitted user carol" not in env.daemon.log_text()
        finally:
            restore(env.phone, env.phone.server_ip)
        health = env.wait_state("phone", "up", timeout=20)
        assert health["exit_address"] == env.phone.origin_ip
        carol.wait_connected(timeout=30)  # her client retried on its own
        env.daemon.wait_log(r"admitted user carol ", timeout=10)
        assert env.alice.vpn_ip()  # alice's VPN session stayed up (health.on_down: keep)
    finally:
        alice_conn.close()
        bob_conn.close()


def test_rotation_changes_the_exit_address_resets_connections_and_is_rate_limited(env):
    """pp rotate runs the phone's action (its address moves on the origin side) and answers once
    the probe sees the new exit address; the live connection through the phone was reset, a
    fetch now comes from the new address, a second rotation within the minimum interval is
    refused with how long to wait, and phone2's rotation (whose address never changes) fails
    after the timeout."""
    env.wait_state("phone", "up", timeout=20)
    held = Held(env.alice)
    try:
        done = ctl("--socket", env.admin_path, "--json", "rotate", "phone")
        assert done.returncode == 0, (done.stdout, done.stderr, env.daemon.tail(30))
        result = json.loads(done.stdout)
        assert (result["state"], result["old_address"], result["new_address"]) == ("done", env.phone.origin_ip, ROTATED_IP)
        print("rotated in %.3f s" % result["seconds"])
        ended = held.result(timeout=5)
        assert ended is not None and ended["outcome"] == "reset", ended
    finally:
        held.close()
    fetched = run_json(env.alice.ns, sys.executable, NETCLIENT, "--timeout", "10", "fetch", "http://%s/whoami" % ORIGIN_IP)
    assert fetched.get("status") == 200 and fetched["body"].strip() == ROTATED_IP, fetched
    health = env.health("phone")
    assert (health["exit_address"], health["rotation"]) == (ROTATED_IP, "done")

    again = ctl("--socket", env.admin_path, "rotate", "phone")
    assert again.returncode == 1 and "was rotated" in again.stderr and "the next rotation is allowed in" in again.stderr, again

    started = time.monotonic()
    failed = ctl("--socket", env.admin_path, "rotate", "phone2")
    assert failed.returncode == 1, failed
    assert "exit address still %s after %d s" % (env.phone2.origin_ip, ROTATION_TIMEOUT) in failed.stderr, failed.stderr
    assert ROTATION_TIMEOUT - 1 <= time.monotonic() - started <= ROTATION_TIMEOUT + 10
    assert env.health("phone2")["rotation"] == "failed"


def test_metrics_and_log_tell_the_story(env):
    """Every state change is one log event; probes are counted by result."""
    text = env.daemon.log_text()
    assert "device phone is down (was degraded)" in text and "device phone is up (was down)" in text
    assert "device phone: device down: reset" in text
    assert "device phone rotated: exit address" in text and "rotation of device phone2 failed" in text
    devices = env.devices()
    assert devices["phone2"]["health"]["state"] == "up"
    assert "devpw" not in json.dumps(devices)
