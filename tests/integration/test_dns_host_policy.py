"""The ``host`` DNS policy for real: a device whose proxy refuses port 53 has its clients'
queries answered by the server's own resolvers, while every other device's clients keep
resolving through their phone.

One lab for the module (torn down at the end, also on failure)::

    alice ──┐                                  ┌─ "phone" (via_device) ──┐
            OpenVPN ── server ns: pocketproxy ─┤                         tinyproxy ── origin
    bob ────┘          host resolver 127.0.0.1:5300                      203.0.113.10:53
                       ("phone-h", dns: host) ─┘

Both devices are the same tinyproxy, so only the policy differs. The host resolver is
:mod:`tests.lab.dns_origin` in the server namespace (zone ``test.``, its own query log);
``dns.host_servers: ["127.0.0.1:5300"]``. The server namespace has no route to the origin, so
the origin seeing a query proves it went through the phone, and the host resolver seeing one
proves it did not.
"""

import os
import subprocess
import sys

import pytest

from tests.lab.daemon import Daemon
from tests.lab.dns_origin import bench_address, big_addresses
from tests.lab.dnsclient import A, NOERROR, SERVFAIL, dig
from tests.lab.netns import read_log, require_root, require_tools, wait_for
from tests.lab.openvpn import OPENVPN, Lab
from tests.lab.world import HERE, TINYPROXY, World

HOST_DNS = ("127.0.0.1", 5300)
QUERY_TIMEOUT = 2.0
ERRORS = ("Unhandled Error", "Traceback", "#critical]")


class HostResolver:
    """The server's own resolver: the lab's zone server on 127.0.0.1:5300 in the server ns."""

    def __init__(self, ns, directory):
        self.ns = ns
        self.log_path = os.path.join(str(directory), "host-dns.log")
        self.ready = os.path.join(str(directory), "host-dns.ready")
        self.proc = None

    def start(self):
        if os.path.exists(self.ready):
            os.unlink(self.ready)
        argv = [sys.executable, os.path.join(HERE, "dns_origin.py"), "--address", HOST_DNS[0],
                "--port", str(HOST_DNS[1]), "--log", self.log_path, "--ready", self.ready]
        self.proc = self.ns.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: os.path.exists(self.ready), 15, what="host resolver")
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def names(self):
        """(proto, qname) of every query it received."""
        lines = read_log(self.log_path).splitlines() if os.path.exists(self.log_path) else []
        return [tuple(line.split()[1:3]) for line in lines if len(line.split()) >= 4]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    require_root()
    require_tools(OPENVPN, "ipset", "iptables", "ss", "openssl", TINYPROXY)
    base = tmp_path_factory.mktemp("dnshost")
    with Lab(base / "lab") as lab, World(lab.server_ns, base / "world", lab.internet) as world:
        phone = world.add_device("phone", username="dev", password="devpw")
        origin_dns = world.start_dns()
        host = HostResolver(lab.server_ns, base).start()
        daemon = Daemon(
            lab.server_ns,
            base / "daemon",
            lab.server.mgmt_socket,
            {"alice": {"password": "alice-pw", "device": "phone"}, "bob": {"password": "bob-pw", "device": "phone-h"}},
            devices={"phone": phone.url, "phone-h": {"upstream": phone.url, "dns": "host"}},
           
            proxy={"bind": ["0.0.0.0"]},
            dns={
                "host_servers": ["%s:%d" % HOST_DNS],
                "query_timeout": QUERY_TIMEOUT,
            },
        ).start()
        try:
            daemon.wait_log(r"reconciled with OpenVPN", timeout=30)
            alice = lab.add_client("alice", username="alice", password="alice-pw")
            bob = lab.add_client("bob", username="bob", password="bob-pw")
            alice.wait_connected(timeout=30)
            bob.wait_connected(timeout=30)
            daemon.wait_log(r"admitted user bob ", timeout=20)
            yield lab, world, phone, origin_dns, host, daemon, alice, bob
        except BaseException:
            print(lab.logs(20), world.logs(20), daemon.tail(60))
            raise
        finally:
            daemon.stop()
            host.stop()


def test_host_policy_answers_from_the_server_and_via_device_from_the_phone(env):
    lab, world, phone, origin_dns, host, daemon, alice, bob = env
    mark = origin_dns.log_mark()
    got = dig(bob.ns, "hp-bob.bench.test")
    assert (got.get("rcode"), got.get("answers")) == (NOERROR, [bench_address("hp-bob.bench.test")]), got
    assert ("udp", "hp-bob.bench.test") in host.names()
    assert not origin_dns.queries(since=mark, qname="hp-bob.bench.test"), "a host-policy query went through the phone"

    got = dig(alice.ns, "hp-alice.bench.test")
    assert (got.get("rcode"), got.get("answers")) == (NOERROR, [bench_address("hp-alice.bench.test")]), got
    q = origin_dns.wait_query("hp-alice.bench.test", timeout=5, since=mark)
    assert (q.source, q.proto) == (phone.origin_ip, "tcp")
    assert not [n for n in host.names() if n[1] == "hp-alice.bench.test"], "a via_device query leaked to the host"


def test_a_truncated_host_answer_is_fetched_again_over_tcp(env):
    """``big.test`` does not fit in UDP: the host resolver is asked again over TCP, and bob's
    TCP query gets all of it (his UDP query a TC=1 reply, as from any resolver)."""
    lab, world, phone, origin_dns, host, daemon, alice, bob = env
    got = dig(bob.ns, "big.test", "tcp")
    assert (got.get("rcode"), sorted(got.get("answers", []))) == (NOERROR, sorted(big_addresses())), got
    protos = [p for p, n in host.names() if n == "big.test"]
    assert protos[:2] == ["udp", "tcp"], protos
    got = dig(bob.ns, "big.test", "udp")
    assert (got.get("rcode"), got.get("tc")) == (NOERROR, 1), got


def test_host_policy_does_not_need_the_phone_and_fails_closed_without_the_host(env):
    """With the phone down bob still resolves (his device's proxy is not used for DNS) while
    alice gets SERVFAIL; with the host resolver down bob gets SERVFAIL within the timeout."""
    lab, world, phone, origin_dns, host, daemon, alice, bob = env
    phone.stop()
    try:
        got = dig(bob.ns, "phone-off.bench.test")
        assert (got.get("rcode"), got.get("answers")) == (NOERROR, [bench_address("phone-off.bench.test")]), got
        assert dig(alice.ns, "phone-off-a.bench.test", timeout=QUERY_TIMEOUT + 5).get("rcode") == SERVFAIL
    finally:
        phone.start()
    host.stop()
    try:
        got = dig(bob.ns, "host-off.bench.test", timeout=QUERY_TIMEOUT + 5)
        assert got.get("rcode") == SERVFAIL and not got["answers"], got
        assert got["seconds"] < QUERY_TIMEOUT + 0.5, got
        assert dig(alice.ns, "host-off-a.bench.test").get("rcode") == NOERROR  # the phone is unaffected
    finally:
        host.start()
    got = dig(bob.ns, "host-back.bench.test", qtype=A)
    assert got.get("rcode") == NOERROR, got
    errors = [line for line in daemon.log_text().splitlines() if any(e in line for e in ERRORS)]
    assert not errors, "\n".join(errors)
