"""Customer DNS over HTTPS (RFC 8484) through the device: real OpenVPN 2.6, the real daemon, a
tinyproxy phone and the origin's DoH endpoint, all in namespaces.

One lab for the module (torn down at the end, also on failure), as in ``test_dns.py``::

    alice ── OpenVPN ── server ns ─────── phone (tinyproxy, BasicAuth) ── origin 203.0.113.10
    (VPN client)        pocketproxy:                         HTTP :80, DNS :53, DoH
                        DNS 10.9.0.1:53 UDP+TCP              https://origin.test:8443/dns-query

The daemon runs with ``dns: {resolver: https://origin.test:8443/dns-query, ca_file: <the
origin's lab CA>, query_timeout: 2}``: it asks the origin with HTTP/1.1 GETs over TLS,
tunnelled through alice's phone (which resolves ``origin.test`` from its own hosts file), on
kept-alive connections. The origin logs each DoH query as ``<src> doh <qname> <qtype>`` and each
accepted connection as ``<src> doh-connect`` (:class:`tests.lab.world.DNSOrigin`), so a query
it saw from the phone's address came through the phone. The query stub is
:func:`tests.lab.dnsclient.dig`, the ``resolv_conf`` fixture is in
``tests/integration/conftest.py`` and :class:`Env` (shared with ``test_dns.py``) in
``tests/integration/helpers.py``. That nothing reached the origin is proven with a sentinel, a
later exchange along the same path that is waited for, never a fixed sleep.
"""

import os
import re
import sys

import pytest

from tests.integration.helpers import DNSEnv as Env
from tests.lab.daemon import Daemon
from tests.lab.dns_origin import bench_address
from tests.lab.dnsclient import NOERROR, NXDOMAIN, SERVFAIL, dig
from tests.lab.netns import require_root, require_tools, wait_for
from tests.lab.openvpn import OPENVPN, SERVER_UNDERLAY_IP, Lab
from tests.lab.probes import NETCLIENT, run_json
from tests.lab.world import TINYPROXY, World

DNS_IP = "10.9.0.1"
QUERY_TIMEOUT = 2.0
DOH_PORT = 8443
KEEPALIVE_LOOKUPS = 10
TLS_PROBLEM = re.compile(r"(?i)certificate|\btls\b|\bssl\b|verif")
ERRORS = ("Unhandled Error", "Traceback", "#critical]")


def start_daemon(lab, directory, phone, dns_origin, ca_file):
    """pocketproxy with DNS on 10.9.0.1:53 resolving over DoH (``ca_file``) through ``phone``;
    returns once it listens and has reconciled with OpenVPN."""
    daemon = Daemon(
        lab.server_ns,
        directory,
        lab.server.mgmt_socket,
        {"alice": {"password": "alice-pw"}},
        devices={"phone": phone.url},
       
        proxy={"bind": ["0.0.0.0"]},
        dns={"resolver": dns_origin.doh_url, "ca_file": ca_file, "query_timeout": QUERY_TIMEOUT},
    ).start()
    try:
        daemon.wait_log(r"DNS listening on %s port 53" % DNS_IP, timeout=30)
        daemon.wait_log(r"reconciled with OpenVPN", timeout=30)
    except BaseException:
        print(daemon.tail(60))
        daemon.stop()
        raise
    return daemon


def log_errors(daemon):
    return [line for line in daemon.log_text().splitlines() if any(e in line for e in ERRORS)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Lab, one phone, the origin with DNS and DoH, pocketproxy resolving over DoH, alice."""
    require_root()
    require_tools(OPENVPN, "ipset", "iptables", "ss", "openssl", "curl", TINYPROXY)
    base = tmp_path_factory.mktemp("dnsdoh")
    with Lab(base / "lab") as lab, World(lab.server_ns, base / "world", lab.internet) as world:
        phone = world.add_device("phone", username="dev", password="devpw")
        origin_dns = world.start_dns(doh_port=DOH_PORT)
        e = Env(lab, world, None, phone, origin_dns, None, None)
        try:
            e.daemon = start_daemon(lab, base / "daemon", phone, origin_dns, origin_dns.ca_cert)
            e.alice = lab.add_client("alice", username="alice", password="alice-pw")
            e.alice.wait_connected(timeout=30)
            e.daemon.wait_log(r"admitted user alice ", timeout=20)
            yield e
        except BaseException:
            print(e.logs() if e.daemon is not None else world.logs())
            raise
        finally:
            if e.daemon is not None:
                e.daemon.stop()


def test_the_lab_doh_endpoint_answers_the_phone_only(env):
    """The lab itself, without the daemon: from the phone's namespace curl gets an answer from
    the DoH endpoint, verified against the origin CA, two queries on one connection."""
    wire = "AAABAAABAAAAAAAABm9yaWdpbgR0ZXN0AAABAAE"  # ID 0, RD, origin.test A
    url = "%s?dns=%s" % (env.dns.doh_url, wire)
    mark = env.dns.log_mark()
    out = env.phone.ns.run(
        "curl", "-sS", "-m", "5", "--cacert", env.dns.ca_cert, "-H", "accept: application/dns-message",
        "-o", "/dev/null", "-o", "/dev/null", "-w", "%{http_code} %{content_type} %{num_connects}\n", url, url,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["200 application/dns-message 1", "200 application/dns-message 0"], out.stdout
    assert [(q.source, q.proto) for q in env.dns.queries(since=mark)] == [(env.phone.origin_ip, "doh")] * 2
    assert env.dns.doh_connections(since=mark) == [env.phone.origin_ip]


def test_resolves_over_doh_through_the_device_and_fetches_by_name(env, resolv_conf):
    """http://origin.test/whoami, resolved by alice's libc through 10.9.0.1, is fetched through
    the phone; the lookup reached the origin over DoH from the phone's address. Uncached names
    over UDP and TCP, and a missing name, are answered the same way."""
    mark = env.dns.log_mark()
    fetched = run_json(env.alice.ns, sys.executable, NETCLIENT, "--timeout", "10", "fetch", "http://origin.test/whoami")
    assert fetched.get("status") == 200, "%s\n%s" % (fetched, env.logs())
    assert fetched["body"].strip() == env.phone.origin_ip, fetched
    query = env.dns.wait_query("origin.test", timeout=5, since=mark)
    assert (query.source, query.proto) == (env.phone.origin_ip, "doh"), query

    for proto in ("udp", "tcp"):
        name = "%s-first.bench.test" % proto
        mark = env.dns.log_mark()
        got = dig(env.alice.ns, name, proto)
        assert "error" not in got and got["id_ok"], got
        assert (got["rcode"], got["tc"], got["answers"]) == (NOERROR, 0, [bench_address(name)]), got
        assert [(q.source, q.proto) for q in env.dns.queries(since=mark, qname=name)] == [(env.phone.origin_ip, "doh")]
    got = dig(env.alice.ns, "nosuchname.test")
    assert (got.get("rcode"), got.get("answers")) == (NXDOMAIN, []), got


def test_sequential_lookups_reuse_one_tls_connection(env):
    """Ten sequential uncached lookups of distinct names each reach the origin once over DoH,
    on at most two TLS connections between them (keep-alive), all from the phone."""
    names = ["ka%d.bench.test" % i for i in range(KEEPALIVE_LOOKUPS)]
    mark = env.dns.log_mark()
    for name in names:
        got = dig(env.alice.ns, name)
        assert (got.get("rcode"), got.get("answers")) == (NOERROR, [bench_address(name)]), got
    queries = env.dns.queries(since=mark)
    assert sorted(q.qname for q in queries) == sorted(names), env.dns.log_lines(mark)
    assert {(q.source, q.proto) for q in queries} == {(env.phone.origin_ip, "doh")}
    connections = env.dns.doh_connections(since=mark)
    print("%d lookups over %d new DoH connection(s)" % (len(names), len(connections)))
    assert len(connections) <= 2, env.dns.log_lines(mark)
    assert set(env.dns.doh_connections()) == {env.phone.origin_ip}


def test_origin_sees_only_the_device_over_doh(env):
    """Every query the origin ever logged came from the phone over DoH (none over plain DNS,
    none from a server address), every DoH connection from the phone, although the server
    namespace has a route to the origin (its uplink)."""
    dig(env.alice.ns, "sources.bench.test")
    queries = env.dns.queries()
    assert queries, "the origin saw no query at all"
    assert {(q.source, q.proto) for q in queries} == {(env.phone.origin_ip, "doh")}, queries
    sources = env.dns.query_sources() | set(env.dns.doh_connections())
    assert sources == {env.phone.origin_ip}
    assert not sources & {DNS_IP, SERVER_UNDERLAY_IP, env.phone.server_ip}
    assert env.world.server_reaches_origin(), "the server namespace has no uplink: the check above proves nothing"


def test_device_down_servfail_within_the_query_timeout_then_recovers(env):
    """With the phone's proxy stopped (its kept-alive tunnel to the origin cut with it), an
    uncached name gets SERVFAIL within the query timeout and never reaches the origin; once the
    phone is back, the name resolves over a new DoH connection."""
    assert dig(env.alice.ns, "warm-doh.bench.test").get("rcode") == NOERROR  # a live connection to cut
    env.phone.stop()
    assert not env.phone.running
    try:
        mark = env.dns.log_mark()
        for proto, name in (("udp", "down1.bench.test"), ("tcp", "down2.bench.test")):
            got = dig(env.alice.ns, name, proto, timeout=QUERY_TIMEOUT + 5)
            assert got.get("rcode") == SERVFAIL and not got["answers"], got
            assert got["seconds"] < QUERY_TIMEOUT + 0.5, got
            print("device down: %s SERVFAIL after %.2f s" % (proto, got["seconds"]))
    finally:
        env.phone.start()
    # Absence, proven by a sentinel: an uncached name asked through the phone, now back, reaches
    # the origin after anything the lookups while it was down sent. Before its query the origin
    # logged exactly one connection: the sentinel's own, new one, from the phone.
    sentinel = "down-sentinel.bench.test"
    back = env.dns.log_mark()
    logged = env.dns.before_sentinel(lambda: dig(env.alice.ns, sentinel, timeout=QUERY_TIMEOUT + 5), sentinel, since=mark)
    assert logged == ["%s doh-connect" % env.phone.origin_ip], logged
    got = dig(env.alice.ns, "down1.bench.test", timeout=QUERY_TIMEOUT + 5)
    assert (got.get("rcode"), got.get("answers")) == (NOERROR, [bench_address("down1.bench.test")]), (
        "%s\n%s" % (got, env.daemon.tail()))
    # The sentinel and down1, each once, from the phone, on the one new connection.
    assert [(q.source, q.proto, q.qname) for q in env.dns.queries(since=back)] == [
        (env.phone.origin_ip, "doh", sentinel), (env.phone.origin_ip, "doh", "down1.bench.test")]
    assert env.dns.doh_connections(since=back) == [env.phone.origin_ip]


def test_daemon_log_has_no_errors_and_no_query_names(env):
    """After everything above the daemon logged no traceback, and (``log_names: false``) none of
    the names asked. ``origin.test`` is not checked: it is the resolver's own name."""
    assert not log_errors(env.daemon), "errors in the daemon log:\n%s" % "\n".join(log_errors(env.daemon))
    text = env.daemon.log_text()
    for name in ("bench.test", "nosuchname", "ka0."):
        assert name not in text, "query name %r in the daemon log" % name


def test_wrong_ca_servfail_fast_and_names_the_tls_problem(env, tmp_path):
    """Last (it replaces the daemon): restarted with ``ca_file`` the OpenVPN lab CA, which did
    not sign the origin's certificate, a query gets SERVFAIL fast (the TLS handshake fails, no
    waiting for the timeout), the connection did go through the phone but no query reached the
    origin, and the daemon log names a TLS/certificate problem, without a traceback."""
    env.daemon.kill()  # SIGKILL: alice stays connected; the new daemon rebuilds her mapping
    env.daemon = start_daemon(env.lab, tmp_path / "daemon", env.phone, env.dns, env.lab.pki.ca_cert)
    assert os.path.exists(env.lab.pki.ca_cert)
    mark = env.dns.log_mark()
    daemon_mark = env.daemon.log_mark()
    for proto, name in (("udp", "wrongca1.bench.test"), ("tcp", "wrongca2.bench.test")):
        got = dig(env.alice.ns, name, proto, timeout=QUERY_TIMEOUT + 5)
        assert got.get("rcode") == SERVFAIL and not got["answers"], "%s\n%s" % (got, env.daemon.tail())
        assert got["seconds"] < 1.0, got
        print("wrong CA: %s SERVFAIL after %.2f s" % (proto, got["seconds"]))
    # Absence, proven by a sentinel: one more lookup's TLS connection through the phone is logged
    # by the origin after anything the two before sent (each lookup opens a connection that its
    # TLS handshake then fails).
    opened = len(env.dns.doh_connections(since=mark))
    got = dig(env.alice.ns, "wrongca3.bench.test", timeout=QUERY_TIMEOUT + 5)
    assert got.get("rcode") == SERVFAIL and not got["answers"], got
    wait_for(lambda: len(env.dns.doh_connections(since=mark)) > opened, 10, what="the sentinel lookup's DoH connection")
    assert not env.dns.queries(since=mark), env.dns.log_lines(mark)
    assert env.dns.doh_connections(since=mark), "no DoH connection reached the origin (via the phone)"
    assert set(env.dns.doh_connections(since=mark)) == {env.phone.origin_ip}
    tail = env.daemon.log_text()[daemon_mark:]
    assert TLS_PROBLEM.search(tail), "no TLS/certificate problem in the daemon log:\n%s" % tail
    assert not log_errors(env.daemon), "errors in the daemon log:\n%s" % "\n".join(log_errors(env.daemon))
