"""Metrics: the exposition text parsed back, the controller's observations, a real loopback scrape."""

import math
import socket

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from ovpnmgr.firewall import Drift
from ovpnmgr.ipset import IPSetError
from ovpnmgr.metrics import (
    CONTENT_TYPE,
    Family,
    Histogram,
    MetricsResource,
    MetricsService,
    collect,
    escape_label,
    render,
)
from proxy.splice import SplicePolicy
from proxy.stats import ProxyStats
from tests.lab.prometheus import parse, value
from tests.unit.controller_world import World

# --- Histogram and text rendering ---


def test_histogram_buckets_are_cumulative_with_inf():
    """Upper bounds are inclusive; +Inf holds everything; sum and count follow observations."""
    h = Histogram((0.1, 1))
    for v in (0.05, 0.1, 0.5, 3):
        h.observe(v)
    assert h.cumulative() == [(0.1, 2), (1.0, 3), (math.inf, 4)]
    assert h.count == 4 and h.sum == pytest.approx(3.65)
    with pytest.raises(ValueError):
        Histogram((1, 1))


def test_render_escapes_and_parses_back():
    """Label values with quotes, backslashes and newlines are escaped and read back intact."""
    nasty = 'a"b\\c\nd'
    assert escape_label(nasty) == 'a\\"b\\\\c\\nd'
    f = Family("x_total", "counter", "help with \\ and\nnewline").add(3, kind=nasty).add(1.5, kind="plain")
    text = render([f])
    assert "# HELP pocketproxy_x_total help with \\\\ and\\nnewline\n" in text
    fams = parse(text)
    assert value(fams, "pocketproxy_x_total", kind=nasty) == 3
    assert value(fams, "pocketproxy_x_total", kind="plain") == 1.5


# --- collected from live objects ---


def _proxy_stats():
    s = ProxyStats()
    s.accepted, s.relayed, s.completed, s.active = 20, 9, 7, 3
    s.finished_up, s.finished_down = 900, 240000
    s.live = lambda: [(100, 10000)]  # a connection still relaying counts at once
    s.refused.update({"unmapped": 4, "client-limit": 1, "odd\"reason": 1})
    s.upstream_errors.update({"timeout": 2, "auth": 1})
    return s


def test_scrape_of_controller_proxy_and_splice():
    """Every family is present once, values come from the live objects, histograms are consistent."""
    w = World()
    w.connect(0, kid=1)  # admitted
    w.connect(1, kid=1, password="wrong")  # denied, final
    splice = SplicePolicy(available=True, soft_pages=0, cap_eff=0, pipe_max_size=1 << 20)
    assert splice.acquire()
    fams = parse(render(collect(w.ops, _proxy_stats(), splice)))
    p = "pocketproxy_"
    assert value(fams, p + "admissions_total", result="admitted") == 1
    assert value(fams, p + "admissions_total", result="denied_final") == 1
    assert value(fams, p + "admissions_total", result="denied_temporary") == 0
    assert fams[p + "admission_latency_seconds"]["type"] == "histogram"
    assert value(fams, p + "admission_latency_seconds_count") == 1
    assert value(fams, p + "pending_clients") == 1  # authorized, not yet ESTABLISHED
    assert value(fams, p + "connected_clients") == 0
    assert value(fams, p + "management_connected") == 1
    assert value(fams, p + "management_reconnects_total") == 0
    assert fams[p + "proxy_connections_active"]["type"] == "gauge"
    assert value(fams, p + "proxy_connections_active") == 3
    assert value(fams, p + "proxy_connections_accepted_total") == 20
    total = p + "proxy_connections_total"
    assert fams[total]["type"] == "counter"
    assert value(fams, total, result="relayed") == 9
    assert value(fams, total, result="refused_unmapped") == 4
    assert value(fams, total, result="refused_client-limit") == 1
    assert value(fams, total, result='refused_odd"reason') == 1
    assert value(fams, total, result="refused_loop") == 0  # known reasons always exported
    assert value(fams, total, result="upstream_timeout") == 2
    assert value(fams, p + "proxy_upstream_errors_total", kind="auth") == 1
    assert value(fams, p + "proxy_upstream_errors_total", kind="unreachable") == 0
    assert value(fams, p + "proxy_bytes_total", direction="up") == 1000
    assert value(fams, p + "proxy_bytes_total", direction="down") == 250000
    assert value(fams, p + "splice_connections_active") == 1
    assert value(fams, p + "splice_connections_total") == 1
    assert p + "ipset_drift" not in fams  # no rules check yet
    for name, fam in fams.items():
        assert name.startswith(p)
        if fam["type"] == "counter":
            assert name.endswith("_total"), name


def test_values_are_read_at_scrape_time():
    """No copy is kept: a second scrape sees the objects' new values."""
    w = World()
    stats = ProxyStats()
    resource = MetricsResource(w.ops, stats, None)
    collect_now = lambda: parse(render(collect(resource.operations, resource.proxy_stats, resource.splice)))
    assert value(collect_now(), "pocketproxy_proxy_connections_active") == 0
    stats.active = 5
    w.controller.draining = True
    w.connect(0)
    fams = collect_now()
    assert value(fams, "pocketproxy_proxy_connections_active") == 5
    assert value(fams, "pocketproxy_admissions_total", result="denied_temporary") == 1
    assert value(fams, "pocketproxy_splice_connections_active") == 0  # splice off: exported as 0


# --- the controller's observations ---


def test_admission_latency_is_observed_once_per_session():
    """CONNECT to client-auth: the time spent authenticating lands in the right bucket, once."""
    w = World()
    pending = []

    def slow(f, *args):
        d = defer.Deferred()
        pending.append((d, f, args))
        return d

    w.controller.run_blocking = slow
    w.connect(0, kid=1)
    assert w.controller.admissions["admitted"] == 0
    w.clock.advance(0.3)
    d, f, args = pending.pop()
    d.callback(f(*args))
    assert w.controller.admissions["admitted"] == 1
    hist = w.controller.admission_latency
    assert hist.count == 1 and hist.sum == pytest.approx(0.3)
    assert dict(hist.cumulative())[0.25] == 0 and dict(hist.cumulative())[0.5] == 1
    # A reconnect re-approves the pending client (client-auth again): not a second admission.
    w.script.disconnect()
    w.attach(status_clients=[{"cid": 0, "pending": True, "real_address": "198.51.100.7:40000"}])
    assert w.commands("client-auth")
    assert w.controller.admissions["admitted"] == 1 and hist.count == 1


def test_denials_are_counted_by_kind():
    """Bad credentials are final; draining and rollbacks are temporary."""
    w = World()
    w.connect(0, password="wrong")
    w.ops.set_draining(True)
    w.connect(1)
    w.ops.set_draining(False)
    w.ipset.fail_next_add = IPSetError("add", "pocketproxy-clients", "10.9.0.2", 28, "set is full")
    w.connect(2)
    assert dict(w.controller.admissions) == {"denied_final": 1, "denied_temporary": 2}


def test_management_reconnects_are_counted():
    """The first management connection is not a reconnect; each later one is."""
    w = World()
    assert w.controller.management_reconnects == 0
    w.script.disconnect()
    w.attach()
    w.script.disconnect()
    w.attach()
    assert w.controller.management_reconnects == 2
    fams = parse(render(collect(w.ops)))
    assert value(fams, "pocketproxy_management_reconnects_total") == 2


def test_last_rules_check_sets_ipset_drift():
    """check_rules() passes the Drift through and keeps it for the ipset_drift gauges."""
    import ipaddress

    w = World()
    drift = Drift(missing_members=frozenset({ipaddress.IPv4Address("10.9.0.5")}))

    class Checking:
        def check(self, expected):
            return defer.succeed(drift)

    w.controller.ledger.firewall = Checking()
    got = []
    w.ops.check_rules().addCallback(got.append)
    assert got == [drift]
    fams = parse(render(collect(w.ops)))
    assert value(fams, "pocketproxy_ipset_drift", kind="missing") == 1
    assert value(fams, "pocketproxy_ipset_drift", kind="extra") == 0
    assert value(fams, "pocketproxy_firewall_drift") == 1


# --- wiring and a real scrape ---


def _config(tmp_path, extra=""):
    from ovpnmgr.config import parse_config

    (tmp_path / "users.yaml").write_text("devices: {}\nusers: {}\n")
    text = (
        "openvpn: {management: 'unix:/x', subnet: 10.9.0.0/24, server_address: 10.9.0.1}\n"
        "directory: {file: users.yaml}\nproxy: {splice: false}\n" + extra
    )
    return parse_config(text, tmp_path / "pocketproxy.yaml")


def test_tap_wires_metrics_unless_disabled(tmp_path):
    """build(): a MetricsService on metrics.listen over the controller and the proxy's stats; none when null."""
    from ovpnmgr.directory import Directory
    from ovpnmgr.ipset import FakeIPSet
    from ovpnmgr.tap import build

    directory = Directory.parse("devices: {}\nusers: {}\n", "users.yaml")
    top, controller = build(MemoryReactorClock(), _config(tmp_path), directory, None, ipset=FakeIPSet())
    svcs = [s for s in top if isinstance(s, MetricsService)]
    assert len(svcs) == 1 and svcs[0].listen == "tcp:9105:interface=127.0.0.1"
    resource = svcs[0].factory.resource.children[b"metrics"]
    assert resource.operations.c is controller and isinstance(resource.proxy_stats, ProxyStats)
    top, _ = build(MemoryReactorClock(), _config(tmp_path, "metrics: {listen: null}\n"), directory, None, ipset=FakeIPSet())
    assert not [s for s in top if isinstance(s, MetricsService)]


def test_service_listens_on_the_loopback_interface_by_default(tmp_path):
    """The default endpoint string binds 127.0.0.1 only."""
    reactor = MemoryReactorClock()
    svc = MetricsService(reactor, "tcp:9105:interface=127.0.0.1", MetricsResource())
    svc.privilegedStartService()
    svc.startService()
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [(9105, "127.0.0.1")]
    svc.stopService()


def _http_get(port, path):
    """A plain HTTP/1.0 GET on 127.0.0.1 (run in a thread): ``(status, headers, body)``."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" % path)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers.setdefault(k.strip().lower(), []).append(v.strip())
    return int(lines[0].split()[1]), headers, body


@pytest_twisted.inlineCallbacks
def test_real_scrape_over_loopback():
    """GET /metrics on a real loopback port: 200, the 0.0.4 content type, a parseable body; / is 404."""
    from twisted.internet import reactor, threads

    w = World()
    w.connect(0)
    svc = MetricsService(reactor, "tcp:0:interface=127.0.0.1", MetricsResource(w.ops, _proxy_stats(), None))
    svc.startService()
    try:
        host = svc.port.getHost()
        assert host.host == "127.0.0.1"
        status, headers, body = yield threads.deferToThread(_http_get, host.port, b"/metrics")
        assert status == 200
        assert headers[b"content-type"] == [CONTENT_TYPE]
        fams = parse(body.decode("utf-8"))
        assert value(fams, "pocketproxy_admissions_total", result="admitted") == 1
        assert value(fams, "pocketproxy_proxy_bytes_total", direction="down") == 250000
        status, _, _ = yield threads.deferToThread(_http_get, host.port, b"/")
        assert status == 404
    finally:
        yield svc.stopService()


@pytest_twisted.inlineCallbacks
def test_busy_port_is_logged_and_not_fatal():
    """A metrics port that cannot be bound leaves metrics off without stopping the daemon."""
    from twisted.internet import reactor
    from twisted.logger import globalLogPublisher

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        svc = MetricsService(reactor, "tcp:%d:interface=127.0.0.1" % holder.getsockname()[1], MetricsResource())
        svc.startService()
        assert svc.port is None
        assert [e for e in events if e.get("event") == "metrics-listen-failed"]
        yield svc.stopService()
    finally:
        globalLogPublisher.removeObserver(events.append)
        holder.close()


def test_the_strict_parser_checks_each_labelled_series_of_a_histogram():
    """Per-device histograms (device_probe_duration_seconds{device}) are several series in one
    family: each must be cumulative and end at its own _count; a broken one is caught."""
    good = "\n".join([
        "# HELP pocketproxy_h h", "# TYPE pocketproxy_h histogram",
        'pocketproxy_h_bucket{device="a",le="1"} 1', 'pocketproxy_h_bucket{device="a",le="+Inf"} 2',
        'pocketproxy_h_sum{device="a"} 3', 'pocketproxy_h_count{device="a"} 2',
        'pocketproxy_h_bucket{device="b",le="1"} 0', 'pocketproxy_h_bucket{device="b",le="+Inf"} 5',
        'pocketproxy_h_sum{device="b"} 9', 'pocketproxy_h_count{device="b"} 5', "",
    ])
    parse(good)
    with pytest.raises(AssertionError):
        parse(good.replace('pocketproxy_h_count{device="b"} 5', 'pocketproxy_h_count{device="b"} 4'))
