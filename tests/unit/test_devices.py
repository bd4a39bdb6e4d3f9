"""ovpnmgr.devices: what a phone's health means for its customers (a real HealthMonitor on a
Clock with scripted probes, a real controller world, a real MappingTable, proxy and DNS server)."""

import ipaddress
import json
import re

from twisted.internet import defer
from twisted.internet.task import Clock

from ovpnmgr.admin import HEALTH_COLUMNS, AdminFactory
from ovpnmgr.config import HealthConfig
from ovpnmgr.devices import DeviceWatch
from ovpnmgr.directory import Directory
from ovpnmgr.metrics import collect, render
from ovpnmgr.rotation import Rotator
from proxy.dnsserver import DNSRoute, DNSServer, DNSSettings
from proxy.health import DOWN, UP, HealthMonitor, HealthSettings
from proxy.probe import ProbeFailed, ProbeResult, ProbeTarget
from proxy.upstreamerrors import Unreachable
from tests.unit import proxy_world
from tests.unit.admin_world import Admin
from tests.unit.controller_world import HASH, SUBNET, World
from tests.unit.dns_wire import decode, make_query

DEFAULT = ProbeTarget.parse("http://203.0.113.10/whoami")
FAST = HealthSettings(interval=10.0, timeout=5.0, retry_interval=1.0, fall=2, rise=1, concurrency=8)


class Probes:
    """Scripted probes: per upstream host, "ok" (with an exit address) or a failure kind."""

    def __init__(self):
        self.outcome = {}
        self.exit = {}
        self.targets = []

    def __call__(self, reactor, upstream, target, timeout, fresh=True, key=None):
        self.targets.append((upstream.host, str(target)))
        outcome = self.outcome.get(upstream.host, "ok")
        if outcome == "ok":
            return defer.succeed(ProbeResult(0.3, ipaddress.ip_address(self.exit.get(upstream.host, "203.0.113.2")), 200))
        return defer.fail(ProbeFailed(outcome, "scripted"))


class LiveConnection:
    def __init__(self):
        self.aborted = False

    def abortConnection(self):
        self.aborted = True


class DNSTunnels:
    def __init__(self):
        self.closed = []

    def close_tunnel(self, key, why):
        self.closed.append((key, why))


def wired(users=None, **health):
    w = World() if users is None else World(users=users)
    clock = w.clock
    probes = Probes()
    monitor = HealthMonitor(clock, FAST, probe=probes)
    dns = DNSTunnels()
    watch = DeviceWatch(monitor, HealthConfig(enabled=True, **health), DEFAULT, w.ops, w.mappings, dns)
    watch.follow(w.ops.directory)
    w.ops.health = monitor
    w.controller.device_alive = watch.admits
    monitor.start()
    return w, monitor, probes, dns, watch


def settle(clock, seconds=30.0):
    for _ in range(int(seconds * 10)):
        clock.advance(0.1)


def test_only_devices_with_users_are_watched_each_with_its_own_target_or_the_default():
    users = """
devices:
  p1: {upstream: "http://192.168.255.2:8080", health_target: "tcp://198.51.100.53:53"}
  p2: {upstream: "socks5://192.168.255.3:1080"}
  spare: {upstream: "http://192.168.255.9:8080"}
users:
  alice: {password: "%s", device: p1}
  bob: {password: "%s", device: p2}
""" % (HASH, HASH)
    w, monitor, probes, dns, watch = wired(users)
    assert sorted(monitor.devices) == ["p1", "p2"]
    settle(w.clock, 11)
    assert sorted(set(probes.targets)) == [
        ("192.168.255.2", "tcp://198.51.100.53:53"),
        ("192.168.255.3", "http://203.0.113.10:80/whoami"),
    ]


def test_a_down_device_resets_its_customers_connections_and_dns_tunnel_and_keeps_sessions():
    w, monitor, probes, dns, watch = wired()
    w.connect(0, user="alice")  # p1
    w.connect(1, user="bob")  # p2
    alice_ip, bob_ip = ipaddress.ip_address("10.9.0.2"), ipaddress.ip_address("10.9.0.3")
    alice_conn, bob_conn = LiveConnection(), LiveConnection()
    w.mappings.register(alice_ip, alice_conn)
    w.mappings.register(bob_ip, bob_conn)
    settle(w.clock, 11)
    assert monitor.get("p1").state == UP
    probes.outcome["192.168.255.2"] = "unreachable"
    settle(w.clock, 15)
    assert monitor.get("p1").state == DOWN and monitor.get("p2").state == UP
    assert alice_conn.aborted and not bob_conn.aborted
    assert dns.closed == [("p1", "device down")]
    assert alice_ip in w.mappings and not w.commands("client-kill")  # the VPN session stays (default)


def test_on_down_kill_kills_the_device_customers_sessions():
    w, monitor, probes, dns, watch = wired(on_down="kill")
    w.connect(0, user="alice")
    w.connect(1, user="bob")
    settle(w.clock, 11)
    probes.outcome["192.168.255.2"] = "timeout"
    settle(w.clock, 15)
    assert w.commands("client-kill") == ["client-kill 0"]


def test_a_new_customer_of_a_down_device_is_denied_temp_device_offline_and_admitted_once_it_is_back():
    w, monitor, probes, dns, watch = wired()
    probes.outcome["192.168.255.2"] = "unreachable"
    settle(w.clock, 15)
    assert monitor.get("p1").state == DOWN
    w.connect(0, user="alice")
    assert w.commands("client-deny") == ['client-deny 0 1 "device p1 is down" "TEMP[backoff 7,advance no]: device offline"']
    assert len(w.mappings) == 0 and w.members() == set() and w.pool.in_use() == {}
    w.connect(1, user="bob")  # another phone's customer: untouched
    assert w.commands("client-auth")
    probes.outcome["192.168.255.2"] = "ok"
    settle(w.clock, 20)
    assert monitor.get("p1").state == UP
    w.connect(2, user="alice")  # the client's own retry
    assert len(w.commands("client-auth")) == 2


def test_when_down_admit_lets_them_in_anyway():
    w, monitor, probes, dns, watch = wired(when_down="admit")
    probes.outcome["192.168.255.2"] = "unreachable"
    settle(w.clock, 15)
    w.connect(0, user="alice")
    assert w.commands("client-auth") and not w.commands("client-deny")


def test_an_exit_address_change_resets_the_device_connections():
    w, monitor, probes, dns, watch = wired()
    w.connect(0, user="alice")
    conn = LiveConnection()
    w.mappings.register(ipaddress.ip_address("10.9.0.2"), conn)
    settle(w.clock, 11)
    assert not conn.aborted
    probes.exit["192.168.255.2"] = "203.0.113.99"
    settle(w.clock, 12)
    assert conn.aborted and dns.closed == [("p1", "exit address changed")]


def test_a_reload_follows_the_new_device_list():
    w, monitor, probes, dns, watch = wired()
    w.ops.directory_listeners.append(watch.follow)
    users = 'devices:\n  p2: {upstream: "socks5://192.168.255.3:1080"}\nusers:\n  bob: {password: "%s", device: p2}\n'
    w.ops.reload(Directory.parse(users % HASH, "users.yaml", SUBNET, ipaddress.ip_address("10.9.0.1")))
    assert sorted(monitor.devices) == ["p2"]


def test_the_proxy_refuses_a_down_device_at_once_and_reports_traffic_to_health():
    class Health:
        def __init__(self):
            self.down, self.failed, self.succeeded = set(), [], []

        def alive(self, key):
            return key not in self.down

        def traffic_failed(self, key):
            self.failed.append(key)

        def traffic_succeeded(self, key):
            self.succeeded.append(key)

    world = proxy_world.World()
    health = world.factory.health = Health()
    health.down.add(proxy_world.DEVICE)
    _, transport = world.accept(port=22)
    assert transport.aborted and world.dials == [] and world.factory.stats.refused["device-down"] == 1
    health.down.clear()
    world.accept(port=22)
    world.connect_device().pending.callback(b"")
    assert health.succeeded == [proxy_world.DEVICE]
    world.accept(port=22)
    world.dials[-1][1].errback(Unreachable("refused"))
    assert health.failed == [proxy_world.DEVICE]


def test_dns_of_a_down_device_is_servfail_at_once_without_dialling():
    class Health:
        def alive(self, key):
            return key != "p1"

    dials = []
    route = DNSRoute(key="p1", upstream=proxy_world.DEVICE)
    server = DNSServer(Clock(), DNSSettings(listen_host="10.9.0.1"), lambda ip: route, dial=lambda *a: dials.append(a) or defer.Deferred())
    server.health = Health()
    got = []
    server.answer(make_query(), ipaddress.ip_address("10.9.0.2"), udp=True).addCallback(got.append)
    assert dials == [] and decode(got[0]).rCode == 2  # SERVFAIL, now


def test_operators_see_health_in_pp_devices_and_metrics():
    w, monitor, probes, dns, watch = wired()
    probes.outcome["192.168.255.3"] = "timeout"
    settle(w.clock, 15)
    admin = Admin(AdminFactory(w.ops))
    lines = admin.send("pp devices").decode().split("\r\n")
    assert lines[0] == "HEADER\tDEVICE\tdevice\tupstream\tusers\tconnected\t" + "\t".join(HEALTH_COLUMNS)
    p1 = lines[1].split("\t")
    assert p1[1] == "p1" and p1[5] == "up" and p1[7] == "300.0" and p1[9] == "203.0.113.2"
    p2 = lines[2].split("\t")
    assert p2[1] == "p2" and p2[5] == "down" and p2[11] == "scripted"
    data = json.loads(admin.send("pp devices --json").split(b"\r\n")[0])
    assert data["devices"][0]["health"]["state"] == "up" and data["devices"][1]["health"]["success_ratio"] == 0.0
    text = render(collect(operations=w.ops))
    assert 'pocketproxy_device_state{device="p2",state="down"} 1' in text
    assert 'pocketproxy_device_state{device="p1",state="down"} 0' in text
    timeouts = monitor.devices["p2"].probes["timeout"]
    assert timeouts >= 3 and 'pocketproxy_device_probes_total{device="p2",result="timeout"} %d' % timeouts in text
    assert 'pocketproxy_device_probes_total{device="p1",result="timeout"} 0' in text
    assert 'pocketproxy_device_state_changes_total{state="down"} 1' in text
    # Per device: p1's probes answered in 300 ms (le 0.5 onwards), p2 never answered.
    assert 'pocketproxy_device_probe_duration_seconds_bucket{device="p1",le="0.25"} 0' in text
    ok = re.search(r'pocketproxy_device_probes_total\{device="p1",result="ok"\} (\d+)', text).group(1)
    assert int(ok) >= 1
    assert 'pocketproxy_device_probe_duration_seconds_bucket{device="p1",le="0.5"} %s' % ok in text
    assert 'pocketproxy_device_probe_duration_seconds_count{device="p1"} %s' % ok in text
    assert 'pocketproxy_device_probe_duration_seconds_count{device="p2"} 0' in text
    assert 'pocketproxy_device_exit_changes_total{device="p1"} 0' in text


def test_pp_rotate_answers_when_the_new_address_is_seen_and_refusals_are_errors():
    users = """
devices:
  p1: {upstream: "http://192.168.255.2:8080", rotate: {command: [rotate-p1]}}
  p2: {upstream: "socks5://192.168.255.3:1080"}
users:
  alice: {password: "%s", device: p1}
  bob: {password: "%s", device: p2}
""" % (HASH, HASH)
    w, monitor, probes, dns, watch = wired(users)
    actions = []

    def run(action):
        actions.append(action)
        probes.exit["192.168.255.2"] = "203.0.113.60"
        return defer.succeed(None)

    w.ops.rotator = Rotator(w.clock, monitor, lambda: w.ops.directory.devices, run, 30.0, 300.0)
    settle(w.clock, 11)
    admin = Admin(AdminFactory(w.ops))
    assert admin.send("pp rotate p2") == b"ERROR: device p2 has no rotation action (devices.p2.rotate in the users file)\r\n"
    admin.send("pp rotate p1")
    settle(w.clock, 3)
    assert admin.take() == b"SUCCESS: device p1 rotated: exit address 203.0.113.2 -> 203.0.113.60 in 0.0 s\r\n"
    assert [a.command for a in actions] == [("rotate-p1",)]
    row = admin.send("pp devices").decode().split("\r\n")[1].split("\t")
    assert row[-1] == "done" and row[9] == "203.0.113.60"
    assert admin.send("pp rotate p1").startswith(b"ERROR: device p1 was rotated 3 s ago")
    text = render(collect(operations=w.ops))
    assert 'pocketproxy_device_rotations_total{device="p1",result="done"} 1' in text
    assert 'pocketproxy_device_rotations_total{device="p2",result="done"} 0' in text
    assert 'pocketproxy_device_exit_changes_total{device="p1"} 1' in text
    w.ops.rotator = None
    assert admin.send("pp rotate p1") == b"ERROR: device health is off (health.enabled in the config): rotation needs its probes\r\n"
