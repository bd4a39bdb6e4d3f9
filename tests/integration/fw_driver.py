"""Run ovpnmgr.firewall operations in the *current* network namespace and print JSON results.

Netlink (ipset) and iptables act on the namespace of the calling process, so
the integration tests run this script under ``ip netns exec NS`` instead of
calling the firewall from the pytest process. Usage::

    ip netns exec NS python3 fw_driver.py '{"config": {...}, "port": 12345,
        "subnet": "10.9.0.0/24", "devices": {"phone": "http://192.168.255.2:8080"},
        "ops": [{"op": "install"}, ...]}'

``devices`` (name -> upstream URL) is the users file's device list the underlay guard
follows; ``{"op": "follow", "devices": {...}}`` is a reload.

Prints one JSON line: a list with one result object per op. A FirewallError
becomes ``{"error": "..."}`` for that op and the script carries on.
"""

import json
import os
import sys
import time
from ipaddress import IPv4Network, ip_network

from twisted.internet import defer, task

from ovpnmgr.config import FirewallConfig
from ovpnmgr.directory import Device, Directory
from ovpnmgr.firewall import Firewall, FirewallError
from ovpnmgr.ipset import NetlinkIPSet
from ovpnmgr.ledger import Ledger
from ovpnmgr.pool import AddressPool
from ovpnmgr.process import CommandError, ProcessRunner
from proxy.mappings import MappingTable
from proxy.upstream import Upstream


def _drift(d):
    return {
        "ok": d.ok,
        "missing_chain_rules": d.missing_chain_rules,
        "rule_problems": list(d.rule_problems),
        "set_missing": d.set_missing,
        "missing_members": sorted(str(ip) for ip in d.missing_members),
        "extra_members": sorted(str(ip) for ip in d.extra_members),
        "describe": d.describe(),
    }


def _children():
    pid = os.getpid()
    found = []
    for tid in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
            found.extend(f.read().split())
    return found


@defer.inlineCallbacks
def _op(reactor, fw, op):
    kind = op["op"]
    if kind == "follow":
        yield fw.follow(_directory(op["devices"]))
        return {"ok": True}
    if kind == "install":
        yield fw.install()
        return {"ok": True}
    if kind == "add":
        fw.add_member(op["ip"])
        return {"ok": True}
    if kind == "remove":
        fw.remove_member(op["ip"])
        return {"ok": True}
    if kind == "members":
        return {"members": sorted(str(ip) for ip in fw.members())}
    if kind == "check":
        drift = yield fw.check(op["expected"])
        return _drift(drift)
    if kind == "repair":
        # The daemon's repair: the ledger, holding exactly the expected addresses, checks and fixes.
        pool = AddressPool(fw.subnet, fw.subnet.network_address + 1)
        for ip in op["expected"]:
            pool.claim(ip, ip)
        ledger = Ledger(pool, fw, MappingTable())
        drift = yield ledger.check()
        yield ledger.repair(drift)
        return _drift(drift)
    if kind == "cycles":
        n = op["n"]
        start = time.perf_counter()
        for _ in range(n):
            fw.add_member(op["ip"])
            fw.remove_member(op["ip"])
        seconds = time.perf_counter() - start
        return {"cycles": n, "seconds": seconds, "per_second": n / seconds}
    if kind == "run":
        runner = ProcessRunner(reactor, timeout=op["timeout"])
        start = time.monotonic()
        try:
            result = yield runner.run(op["argv"])
            out = {"result": [result[0], result[1].decode(), result[2].decode()]}
        except CommandError as e:
            out = {"error": str(e), "type": type(e).__name__}
        out["elapsed"] = time.monotonic() - start
        # Give the reactor a moment to reap a killed child, then list what is left.
        yield task.deferLater(reactor, 0.2, lambda: None)
        out["children"] = _children()
        return out
    raise ValueError("unknown op %r" % kind)


def _directory(devices):
    return Directory({name: Device(name, Upstream.parse(url)) for name, url in devices.items()}, {})


def _config(values):
    values = dict(values)
    values["device_networks"] = tuple(ip_network(n) for n in values.get("device_networks", ()))
    values["device_allow"] = tuple(tuple(rule) for rule in values.get("device_allow", ()))
    return FirewallConfig(**values)


@defer.inlineCallbacks
def main(reactor, spec_json):
    spec = json.loads(spec_json)
    config = _config(spec.get("config", {}))
    ipset = NetlinkIPSet(config.ipset, config.maxelem)
    runner = ProcessRunner(reactor, config.command_timeout)
    fw = Firewall(
        config,
        spec.get("port", 12345),
        IPv4Network(spec.get("subnet", "10.9.0.0/24")),
        ipset,
        runner,
        mode=spec.get("mode", "redirect"),
        dns=spec.get("dns"),
        directory=_directory(spec.get("devices", {})),
    )
    results = []
    try:
        for op in spec["ops"]:
            try:
                result = yield _op(reactor, fw, op)
            except FirewallError as e:
                result = {"error": str(e)}
            results.append(result)
    finally:
        ipset.close()
    sys.stdout.write(json.dumps(results) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    task.react(main, sys.argv[1:2])
