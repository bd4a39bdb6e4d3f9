"""Customer DNS (issue 7) against real OpenVPN 2.6, the real daemon, a tinyproxy phone and the
origin's authoritative DNS server, all in namespaces.

One lab for the module (torn down at the end, also on failure)::

    alice ── OpenVPN ── server ns ──────── phone (tinyproxy, BasicAuth) ── origin 203.0.113.10
    (VPN client)        pocketproxy: proxy :12345,            HTTP :80 and DNS :53 (zone test.)
                        DNS 10.9.0.1:53 UDP+TCP, admin socket, metrics on 127.0.0.1
    customer ns 192.168.77.2: on the underlay bridge, not a VPN client

The daemon pushes ``dhcp-option DNS 10.9.0.1`` and resolves each client's queries with DNS
over TCP through that client's phone to 1.1.1.1:53 (the default ``dns.resolver``; the lab's
internet has it: the origin's DNS server), with
``query_timeout: 2``. The origin's DNS server logs every query's source, so a query it saw
from the phone's address came through the phone (the server namespace could reach the origin
over its uplink: :func:`test_origin_sees_only_the_device` checks that it never does). Queries
are sent by :func:`tests.lab.dnsclient.dig` run in a namespace; every wait is bounded. That a
query did *not* reach the origin is proven with a sentinel (:meth:`DNSOrigin.before_sentinel`):
a later query along the same path that is waited for, never a fixed sleep.
"""

import os
import shutil
import signal
import sys
import tempfile

import pytest
import yaml

from tests.integration.helpers import DNSEnv as Env
from tests.integration.helpers import sample, scrape
from tests.lab.daemon import Daemon
from tests.lab.dnsclient import NOERROR, NXDOMAIN, REFUSED, SERVFAIL, dig
from tests.lab.netns import require_root, require_tools, wait_for
from tests.lab.openvpn import OPENVPN, SERVER_UNDERLAY_IP, Lab
from tests.lab.probes import NETCLIENT, run_json
from tests.lab.world import ORIGIN_IP, TINYPROXY, World

DNS_IP = "10.9.0.1"
QUERY_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Lab, one phone, the origin with its DNS server, pocketproxy with DNS on 10.9.0.1:53, alice."""
    require_root()
    require_tools(OPENVPN, "ipset", "iptables", "ss", "openssl", TINYPROXY)
    base = tmp_path_factory.mktemp("dns")
    sockdir = tempfile.mkdtemp(prefix="ppdns-")  # unix socket paths must stay short
    admin_path = os.path.join(sockdir, "admin.sock")
    try:
        with Lab(base / "lab") as lab, World(lab.server_ns, base / "world", lab.internet) as world:
            phone = world.add_device("phone", username="dev", password="devpw")
            origin_dns = world.start_dns()
            daemon = Daemon(
                lab.server_ns,
                base / "daemon",
                lab.server.mgmt_socket,
                {"alice": {"password": "alice-pw"}},
                devices={"phone": phone.url},
                admin={"socket": admin_path},
               
                proxy={"bind": ["0.0.0.0"]},
                dns={"query_timeout": QUERY_TIMEOUT},
            ).start()
            try:
                daemon.wait_log(r"DNS listening on %s port 53" % DNS_IP, timeout=30)
                daemon.wait_log(r"reconciled with OpenVPN", timeout=30)
                alice = lab.add_client("alice", username="alice", password="alice-pw")
                alice.wait_connected(timeout=30)
                daemon.wait_log(r"admitted user alice ", timeout=20)
                e = Env(lab, world, daemon, phone, origin_dns, alice, admin_path)
                yield e
            except BaseException:
                print(Env(lab, world, daemon, phone, origin_dns, None, admin_path).logs())
                raise
            finally:
                daemon.stop()
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def test_client_received_pushed_dns_option(env):
    """The PUSH_REPLY alice received carries ``dhcp-option DNS 10.9.0.1`` and the full tunnel."""
    replies = [line for line in env.alice.log_text().splitlines() if "PUSH_REPLY" in line]
    assert replies, "no PUSH_REPLY in alice's log:\n%s" % env.alice.log_tail()
    assert any("dhcp-option DNS %s" % DNS_IP in line for line in replies), replies
    assert any("redirect-gateway def1 ipv6,block-ipv6" in line for line in replies), replies


def test_resolves_through_the_device_and_fetches_by_name(env, resolv_conf):
    """origin.test resolves via 10.9.0.1 (UDP and TCP), the first lookup reaching the origin's DNS
    from the phone over TCP; http://origin.test/whoami, resolved by the client's own libc through
    10.9.0.1, is fetched through the full path and the origin sees the phone."""
    mark = env.dns.log_mark()
    fetched = run_json(env.alice.ns, sys.executable, NETCLIENT, "--timeout", "10", "fetch", "http://origin.test/whoami")
    assert fetched.get("status") == 200, "%s\n%s" % (fetched, env.logs())
    assert fetched["body"].strip() == env.phone.origin_ip, fetched
    query = env.dns.wait_query("origin.test", timeout=5, since=mark)
    assert (query.source, query.proto) == (env.phone.origin_ip, "tcp"), query

    for proto in ("udp", "tcp"):
        got = dig(env.alice.ns, "origin.test", proto)
        assert "error" not in got and got["id_ok"] and got["qr"] == 1, got
        assert (got["rcode"], got["tc"], got["answers"]) == (NOERROR, 0, [ORIGIN_IP]), got

    # Uncached names too, over each transport, each seen at the origin once, from the phone.
    for proto in ("udp", "tcp"):
        name = "%s-first.bench.test" % proto
        mark = env.dns.log_mark()
        got = dig(env.alice.ns, name, proto)
        assert got.get("rcode") == NOERROR and len(got["answers"]) == 1, got
        assert [(q.source, q.proto) for q in env.dns.queries(since=mark, qname=name)] == [(env.phone.origin_ip, "tcp")]
    got = dig(env.alice.ns, "nosuchname.test")
    assert (got.get("rcode"), got.get("answers")) == (NXDOMAIN, []), got


def test_origin_sees_only_the_device(env):
    """Every query the origin's DNS server ever logged came from the phone's address over TCP;
    none from a server address, although the server namespace has a route to the origin (its uplink)."""
    dig(env.alice.ns, "sources.bench.test")  # at least one query in the log whatever ran before
    queries = env.dns.queries()
    assert queries, "the origin's DNS server saw no query at all"
    sources = {q.source for q in queries}
    assert sources == {env.phone.origin_ip}, "origin DNS queries from %s" % sources
    assert {q.proto for q in queries} == {"tcp"}, [q for q in queries if q.proto != "tcp"]
    server_addresses = {DNS_IP, SERVER_UNDERLAY_IP, env.phone.server_ip}
    assert not sources & server_addresses
    assert env.world.server_reaches_origin(), "the server namespace has no uplink: the check above proves nothing"


def test_truncation_over_udp_and_full_answer_over_tcp(env):
    """big.test (40 A records, about 670 bytes) over plain UDP comes back TC=1; over TCP it is whole."""
    from tests.lab.dns_origin import BIG_COUNT, big_addresses

    udp = dig(env.alice.ns, "big.test", "udp")
    assert "error" not in udp and udp["id_ok"], udp
    assert udp["rcode"] == NOERROR and udp["tc"] == 1 and udp["size"] <= 512, udp
    tcp = dig(env.alice.ns, "big.test", "tcp")
    assert tcp.get("rcode") == NOERROR and tcp["tc"] == 0, tcp
    assert len(tcp["answers"]) == BIG_COUNT and sorted(tcp["answers"]) == sorted(big_addresses()), tcp


def test_cache_answers_without_asking_again(env):
    """A repeated query is answered from the device's cache: no new query at the origin; pp stats
    counts one miss then one hit; /metrics shows the hits, misses, results and latency."""
    name = "cached.bench.test"
    before = env.stats()
    mark = env.dns.log_mark()
    first = dig(env.alice.ns, name)
    assert first.get("rcode") == NOERROR and len(first["answers"]) == 1, first
    env.dns.wait_query(name, timeout=5, since=mark)
    after_first = env.stats()
    seen = len(env.dns.queries(since=mark, qname=name))
    assert seen == 1

    second = dig(env.alice.ns, name, "tcp")  # the cache is per device, not per transport
    third = dig(env.alice.ns, name)
    for again in (second, third):
        assert again.get("rcode") == NOERROR and again["answers"] == first["answers"], again
        assert 0 < again["ttls"][0] <= first["ttls"][0], (first, again)
    after = env.stats()  # before the sentinel below, which is one more miss
    # Absence, proven by a sentinel: an uncached name asked now through the same phone reaches the
    # origin after any query the two cached answers sent.
    sentinel = "cached-sentinel.bench.test"
    logged = env.dns.before_sentinel(lambda: dig(env.alice.ns, sentinel), sentinel, since=mark)
    assert len([line for line in logged if line.split()[2:3] == [name]]) == seen, logged

    assert after_first["cache"]["misses"] == before["cache"]["misses"] + 1, (before, after_first)
    assert after_first["cache"]["hits"] == before["cache"]["hits"], (before, after_first)
    assert after["cache"]["hits"] == after_first["cache"]["hits"] + 2, (after_first, after)
    assert after["cache"]["misses"] == after_first["cache"]["misses"], (after_first, after)
    assert after["queries"].get("ok", 0) == before["queries"].get("ok", 0) + 3, (before, after)

    fams = scrape(env.lab)
    hits = sample(fams, "pocketproxy_dns_cache_hits_total")
    misses = sample(fams, "pocketproxy_dns_cache_misses_total")
    assert hits >= after["cache"]["hits"] >= 2 and misses >= after["cache"]["misses"] >= 1, (hits, misses)
    assert sample(fams, "pocketproxy_dns_queries_total", result="ok") >= after["queries"]["ok"]
    assert sample(fams, "pocketproxy_dns_queries_total", result="truncated") >= 1  # big.test over UDP
    count = sample(fams, "pocketproxy_dns_query_latency_seconds_count")
    buckets = [(labels["le"], v) for n, labels, v in fams["pocketproxy_dns_query_latency_seconds"]["samples"]
               if n.endswith("_bucket")]
    assert buckets and buckets[-1] == ("+Inf", count) and count >= hits + 1, (buckets, count)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)


def test_not_an_open_resolver_and_other_udp_fails_closed(env):
    """From a namespace that is not a VPN client (routed to 10.9.0.1 over the underlay) and from
    the server namespace itself, queries get REFUSED or nothing, never an answer, and never reach
    the origin. From the VPN client, UDP to any other port of 10.9.0.1 is refused at once."""
    customer = env.lab.customer_ns
    customer.run("ip", "route", "replace", "10.9.0.0/24", "via", SERVER_UNDERLAY_IP)
    mark = env.dns.log_mark()
    outsiders = [(customer, "udp"), (customer, "tcp"), (env.lab.server_ns, "udp"), (env.lab.server_ns, "tcp")]
    for i, (ns, proto) in enumerate(outsiders):
        name = "open%d.bench.test" % i
        got = dig(ns, name, proto, timeout=3)
        assert not got.get("answers"), got
        assert got.get("rcode") == REFUSED or got.get("error") in ("timeout", "refused", "reset"), got
        assert got.get("rcode") is None or got.get("id_ok"), got
    # The kernel refuses the underlay query before the daemon sees it (firewall POCKETPROXY-UL:
    # the DNS service answers only the tunnel), at once rather than by a timeout.
    got = dig(customer, "open-check.bench.test", timeout=3)
    assert got.get("error") == "refused" and got["seconds"] < 1.0, got
    # Absence, proven by a sentinel: alice's uncached name, through the daemon and her phone,
    # reaches the origin after anything the outsiders' queries sent.
    sentinel = "outsider-sentinel.bench.test"
    logged = env.dns.before_sentinel(lambda: dig(env.alice.ns, sentinel), sentinel, since=mark)
    leaked = [line for line in logged if line.split()[2:3] and line.split()[2].startswith("open")]
    assert not leaked, leaked

    for port in (54, 443, 5353, 12345):
        got = dig(env.alice.ns, "origin.test", "udp", port=port, timeout=3)
        assert got.get("error") == "refused" and got["seconds"] < 1.0, (port, got)


def test_device_down_servfail_fast_then_recovers(env):
    """With the phone's proxy stopped (connection refused), an uncached name gets SERVFAIL at once,
    never an answer, and never reaches the origin; a cached one is still answered. Once the phone
    is back, the same name resolves and a fetch works again."""
    warm = "warm.bench.test"
    assert dig(env.alice.ns, warm).get("rcode") == NOERROR
    env.phone.stop()
    assert not env.phone.running
    try:
        mark = env.dns.log_mark()
        for proto, name in (("udp", "down1.bench.test"), ("tcp", "down2.bench.test")):
            got = dig(env.alice.ns, name, proto, timeout=QUERY_TIMEOUT + 5)
            assert got.get("rcode") == SERVFAIL and not got["answers"], got
            # The stopped proxy refuses the connection: SERVFAIL at once, not at the query timeout.
            assert got["seconds"] < 1.0, got
            print("device down: %s SERVFAIL after %.2f s" % (proto, got["seconds"]))
        cached = dig(env.alice.ns, warm)
        assert cached.get("rcode") == NOERROR and cached["answers"], cached
    finally:
        env.phone.start()
    # Absence, proven by a sentinel: an uncached name asked through the phone, now back, reaches
    # the origin after anything the lookups while it was down sent.
    sentinel = "down-sentinel.bench.test"
    logged = env.dns.before_sentinel(lambda: dig(env.alice.ns, sentinel, timeout=QUERY_TIMEOUT + 5), sentinel, since=mark)
    assert not logged, logged
    mark = env.dns.log_mark()
    got = dig(env.alice.ns, "down1.bench.test", timeout=QUERY_TIMEOUT + 5)
    assert got.get("rcode") == NOERROR and len(got["answers"]) == 1, "%s\n%s" % (got, env.daemon.tail())
    assert [(q.source, q.proto) for q in env.dns.queries(since=mark, qname="down1.bench.test")] == [
        (env.phone.origin_ip, "tcp")
    ]
    fetched = run_json(env.alice.ns, sys.executable, NETCLIENT, "--timeout", "10", "fetch", "http://%s/whoami" % ORIGIN_IP)
    assert fetched.get("status") == 200 and fetched["body"].strip() == env.phone.origin_ip, fetched


def test_daemon_log_has_no_query_names(env):
    """With the default ``log_names: false`` the daemon logs DNS events (refusals, device
    failures) but none of the names asked."""
    text = env.daemon.log_text()
    assert "refused DNS query from" in text, env.daemon.tail()  # the events are logged...
    for name in ("origin.test", "big.test", "bench.test", "nosuchname"):
        assert name not in text, "query name %r in the daemon log" % name  # ...without names


def test_daemon_log_has_no_errors(env):
    """After everything above (device dropped and refused, outsiders refused), the daemon logged no
    traceback: every DNS failure path is an ordinary, logged SERVFAIL or REFUSED."""
    text = env.daemon.log_text()
    bad = [line for line in text.splitlines() if "Unhandled Error" in line or "Traceback" in line or "#critical]" in line]
    assert not bad, "errors in the daemon log:\n%s" % "\n".join(bad)


def test_a_remapped_device_loses_its_dns_tunnel_and_the_next_query_uses_the_new_proxy(env):
    """A reload that gives device "phone" another proxy URL closes the DNS tunnel through the
    old proxy at once (before: it lived until the daemon stopped, its route key held the old URL)
    and the next query is resolved through the new one. Runs last: it moves alice's device."""
    phone2 = env.world.add_device("phone2")

    def tunnels_to(device):
        out = env.lab.server_ns.run("ss", "-Htn", "state", "established", "dst", "%s:%d" % (device.ip, device.port)).stdout
        return len(out.splitlines())

    # Precondition, not the subject: a DNS tunnel through the phone.
    got = dig(env.alice.ns, "remap-before.bench.test")
    assert got.get("rcode") == NOERROR, "%s\n%s" % (got, env.daemon.tail())
    assert tunnels_to(env.phone) >= 1  # the DNS tunnel through the phone stays open (idle timeout 60 s)
    users = yaml.safe_load(env.daemon.users_path.read_text())
    users["devices"]["phone"]["upstream"] = phone2.url
    env.daemon.users_path.write_text(yaml.safe_dump(users))
    mark = env.daemon.log_mark()
    os.kill(env.daemon.proc.pid, signal.SIGHUP)
    env.daemon.wait_log(r"reloaded users file .*remapped 1\)", timeout=20, since=mark)
    wait_for(lambda: tunnels_to(env.phone) == 0, 5, what="the DNS tunnel through the old proxy to close")
    mark = env.dns.log_mark()
    got = dig(env.alice.ns, "remap-after.bench.test")
    assert got.get("rcode") == NOERROR, "%s\n%s" % (got, env.daemon.tail())
    assert [q.source for q in env.dns.queries(since=mark, qname="remap-after.bench.test")] == [phone2.origin_ip]
