# -*- test-case-name: tests.unit.test_metrics -*-
"""Prometheus metrics: text exposition format 0.0.4 over ``twisted.web``.

Values are read at scrape time from the live objects (the controller, the
proxy's :class:`~proxy.stats.ProxyStats`, the :class:`~proxy.splice.SplicePolicy`);
the only bookkeeping that exists for metrics is the controller's admission
counters, its admission latency :class:`Histogram` and its management
reconnect counter.

Families (prefix ``pocketproxy_``):

* ``admissions_total{result="admitted|denied_temporary|denied_final"}`` (counter):
  answered CONNECTs. ``admitted`` counts a confirmed ``client-auth`` once per
  session; re-authentications (REAUTH) are not admissions.
* ``admission_latency_seconds`` (histogram): CONNECT received to
  ``client-auth`` sent, for admitted sessions.
* ``connected_clients`` / ``pending_clients`` (gauges): sessions established /
  still being admitted.
* ``management_connected`` (gauge, 0/1), ``management_reconnects_total`` (counter):
  management connections taken over after the first one.
* ``proxy_connections_accepted_total`` (counter): connections accepted by the
  proxy, whatever happened next.
* ``proxy_connections_active`` (gauge): proxied connections open now (in setup or relaying).
* ``proxy_connections_total{result}`` (counter): how accepted connections
  ended their setup: ``relayed`` (a tunnel was obtained; counted when the relay
  starts, so it includes active relays), ``refused_<reason>`` (refused before
  dialling: ``unmapped``, ``loop``, ``origdst``, ``destination`` (not the
  public internet), ``limit``, ``client-limit``, ``device-share`` (the client's
  fair share of its phone); ``destination-name`` after sniffing a special-use name) or
  ``upstream_<kind>`` (the device handshake failed: ``auth``, ``forbidden``,
  ``unreachable``, ``timeout``, ``malformed``, ``closed``, ``error``, ``internal``).
  Connections the client closed during setup are in none of these.
* ``proxy_upstream_errors_total{kind}`` (counter): the ``upstream_<kind>`` results alone.
* ``proxy_bytes_total{direction="up|down"}`` (counter): bytes relayed by
  *completed* relays (up = client to device); a live connection's bytes are
  added when it closes.
* ``splice_connections_active`` / ``splice_connections_total``: connections
  relayed with splice(2) now / since start (0 when splice is off or unavailable).
* ``ipset_drift{kind="missing|extra"}`` (gauge): ipset members missing from /
  extra in the kernel set at the last rules check (the periodic one every
  ``firewall.verify_interval`` seconds, or ``pp rules check``), and
  ``firewall_drift`` (gauge, 0/1) whether that check found any difference
  (rules included). Both are absent until a check has run. After a repair they
  show the state the repair left.
* With device health on, per device: ``device_state{device,state}`` (gauge, 1 for the current
  state), ``device_probe_rtt_seconds{device}`` (gauge, last successful probe),
  ``device_probe_duration_seconds{device}`` (histogram of successful probes, 0.05-10 s),
  ``device_probes_total{device,result}``, ``device_exit_changes_total{device}`` and
  ``device_rotations_total{device,result="done|failed"}`` (counters); and
  ``device_state_changes_total{state}`` (counter), ``device_probes_in_flight`` /
  ``device_probes_in_flight_max`` (gauges).
* ``firewall_checks_total`` (counter) and ``firewall_repairs_total{action}``
  (counter; ``rules_reinstalled``, ``member_added``, ``member_removed``): the
  periodic verifier's work (absent when it is off).
"""

import math
from collections import Counter

from twisted.application import service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from proxy.stats import Histogram  # noqa: F401 (re-exported: the controller's admission histogram)

PREFIX = "pocketproxy_"
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
ADMISSION_RESULTS = ("admitted", "denied_temporary", "denied_final")
REFUSED_REASONS = ("unmapped", "loop", "origdst", "destination", "destination-name", "limit", "client-limit", "device-share")
DNS_RESULTS = ("ok", "nxdomain", "servfail", "refused", "malformed", "timeout", "truncated", "over_share")
UPSTREAM_KINDS = ("auth", "forbidden", "unreachable", "timeout", "malformed", "closed", "error", "internal")


class Family:
    """One metric family: name (without prefix), type, help and samples."""

    def __init__(self, name, kind, help, samples=()):
        self.name = PREFIX + name
        self.kind = kind
        self.help = help
        self.samples = list(samples)  # (suffix, {label: value}, number)

    def add(self, value, suffix="", **labels):
        self.samples.append((suffix, labels, value))
        return self

    def add_rendered(self, value, suffix, body):
        """A sample whose labels are already rendered (``body``: ``a="x",b="y"``, escaped): the
        per-device families of thousands of phones are written without escaping each time."""
        self.samples.append((suffix, body, value))
        return self


def gauge(name, help, value=None, **labels):
    family = Family(name, "gauge", help)
    if value is not None:
        family.add(value, **labels)
    return family


def counter(name, help, value=None, **labels):
    family = Family(name, "counter", help)
    if value is not None:
        family.add(value, **labels)
    return family


def histogram(name, help, hist, family=None, **labels):
    """``hist``'s samples (with ``labels``) in a new family, or added to ``family``."""
    family = family or Family(name, "histogram", help)
    for le, n in hist.cumulative():
        family.add(n, "_bucket", **labels, le=format_value(le))
    family.add(hist.sum, "_sum", **labels)
    family.add(hist.count, "_count", **labels)
    return family


def format_value(value):
    """A sample value as Prometheus writes it (``+Inf``, ``NaN``, integers without ``.0``)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def escape_label(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text):
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def render(families):
    """The exposition text (str) of ``families``."""
    lines = []
    for f in families:
        lines.append("# HELP %s %s" % (f.name, escape_help(f.help)))
        lines.append("# TYPE %s %s" % (f.name, f.kind))
        for suffix, labels, value in f.samples:
            if labels:
                body = labels if isinstance(labels, str) else ",".join('%s="%s"' % (k, escape_label(v)) for k, v in labels.items())
                lines.append("%s%s{%s} %s" % (f.name, suffix, body, format_value(value)))
            else:
                lines.append("%s%s %s" % (f.name, suffix, format_value(value)))
    return "\n".join(lines) + "\n"


def _seeded(known, counter_):
    """``counter_`` (a Counter) with every ``known`` key present, known keys first."""
    out = {k: counter_.get(k, 0) for k in known}
    for k in sorted(counter_):
        if k not in out:
            out[k] = counter_[k]
    return out


def health_families(monitor):
    """Device health (:class:`proxy.health.HealthMonitor`), per device: state, last probe RTT, the
    probe RTT histogram, probes by result, exit-address changes; and state changes by new state,
    probes in flight now and at most. Labels are rendered once per device (2,000 phones are
    ~40,000 samples: see ``tests/unit/test_metrics.py`` for the cost of a scrape)."""
    from proxy.health import RTT_BUCKETS, STATES

    state = gauge("device_state", "1 for the device's current health state (unknown, up, degraded, down).")
    rtt = gauge("device_probe_rtt_seconds", "Duration of the device's last successful health probe.")
    durations = Family("device_probe_duration_seconds", "histogram", "Durations of the device's successful health probes.")
    probes = counter("device_probes_total", "Health probes of the device by result (ok, or why it did not carry the probe).")
    exits = counter("device_exit_changes_total", "Exit-address changes of the device seen by the health probes.")
    les = [',le="%s"' % format_value(le) for le in RTT_BUCKETS + (math.inf,)]
    state_bodies = [',state="%s"' % s for s in STATES]
    for name, h in sorted(monitor.devices.items()):
        device = 'device="%s"' % escape_label(name)
        for s, body in zip(STATES, state_bodies):
            state.add_rendered(1 if h.state == s else 0, "", device + body)
        if h.rtt is not None:
            rtt.add_rendered(h.rtt, "", device)
        for (_, n), le in zip(h.rtt_histogram.cumulative(), les):
            durations.add_rendered(n, "_bucket", device + le)
        durations.add_rendered(h.rtt_histogram.sum, "_sum", device)
        durations.add_rendered(h.rtt_histogram.count, "_count", device)
        for result, n in _seeded(("ok", "unreachable", "timeout"), h.probes).items():
            probes.add_rendered(n, "", '%s,result="%s"' % (device, escape_label(result)))
        exits.add_rendered(h.exit_changes, "", device)
    changes = counter("device_state_changes_total", "Device health state changes, by the new state.")
    into = Counter()
    for (_, new), n in monitor.transitions.items():
        into[new] += n
    for s in STATES[1:]:
        changes.add(into.get(s, 0), state=s)
    return [
        state,
        rtt,
        durations,
        probes,
        exits,
        changes,
        gauge("device_probes_in_flight", "Health probes running now.", monitor.in_flight),
        gauge("device_probes_in_flight_max", "The most health probes ever running at once (bounded by health.concurrency).", monitor.max_in_flight),
    ]


def rotation_family(rotator, devices):
    """``device_rotations_total{device,result}`` for every watched device (0 until it rotated)."""
    f = counter("device_rotations_total", "Exit-address rotations (pp rotate) of the device by result.")
    for name in sorted(set(devices) | {name for name, _ in rotator.results}):
        for result in ("done", "failed"):
            f.add(rotator.results.get((name, result), 0), device=name, result=result)
    return f


def collect(operations=None, proxy_stats=None, splice=None, verifier=None, dns_stats=None):
    """The metric families, read now from the live objects (any may be None)."""
    families = []
    if dns_stats is not None:
        families.extend(dns_families(dns_stats))
    if verifier is not None:
        from ovpnmgr.verify import REPAIR_ACTIONS

        families.append(counter("firewall_checks_total", "Periodic firewall checks completed.", verifier.checks))
        f = counter("firewall_repairs_total", "Kernel drift fixed by the periodic firewall check, by action.")
        for action, n in _seeded(REPAIR_ACTIONS, verifier.repairs).items():
            f.add(n, action=action)
        families.append(f)
    health = getattr(operations, "health", None)
    if health is not None:
        families.extend(health_families(health))
        rotator = getattr(operations, "rotator", None)
        if rotator is not None:
            families.append(rotation_family(rotator, health.devices))
    if operations is not None:
        f = counter("admissions_total", "Answered OpenVPN CONNECTs by result.")
        for result in ADMISSION_RESULTS:
            f.add(operations.admissions.get(result, 0), result=result)
        families.append(f)
        families.append(
            histogram(
                "admission_latency_seconds",
                "Time from CONNECT to client-auth sent, for admitted clients.",
                operations.admission_latency,
            )
        )
        counts = operations.counts()
        families.append(gauge("connected_clients", "OpenVPN client sessions established.", counts["established"]))
        families.append(gauge("pending_clients", "OpenVPN client sessions being admitted.", counts["pending"]))
        families.append(
            gauge("management_connected", "1 while the OpenVPN management connection is up.", counts["management_connected"])
        )
        families.append(
            counter(
                "management_reconnects_total",
                "OpenVPN management connections taken over after the first one.",
                operations.management_reconnects,
            )
        )
        drift = operations.last_drift
        if drift is not None:
            families.append(
                gauge("ipset_drift", "ipset members differing from the operations's view at the last rules check.")
                .add(len(drift.missing_members), kind="missing")
                .add(len(drift.extra_members), kind="extra")
            )
            families.append(
                gauge("firewall_drift", "1 if the last rules check found any drift (chains, set or members).", not drift.ok)
            )
    if proxy_stats is not None:
        s = proxy_stats
        families.append(counter("proxy_connections_accepted_total", "Connections accepted by the proxy.", s.accepted))
        families.append(gauge("proxy_connections_active", "Proxied connections open now (setup or relaying).", s.active))
        f = counter("proxy_connections_total", "Proxied connections by setup result.")
        f.add(s.relayed, result="relayed")
        for reason, n in _seeded(REFUSED_REASONS, s.refused).items():
            f.add(n, result="refused_" + reason)
        upstream = _seeded(UPSTREAM_KINDS, s.upstream_errors)
        for kind, n in upstream.items():
            f.add(n, result="upstream_" + kind)
        families.append(f)
        f = counter("proxy_upstream_errors_total", "Failed device proxy handshakes by kind.")
        for kind, n in upstream.items():
            f.add(n, kind=kind)
        families.append(f)
        up, down = s.bytes_moved()
        families.append(
            counter("proxy_bytes_total", "Bytes relayed, live connections included.")
            .add(up, direction="up")
            .add(down, direction="down")
        )
    if proxy_stats is not None or splice is not None:
        st = splice.stats() if splice is not None else {"spliced_now": 0, "spliced_total": 0}
        families.append(gauge("splice_connections_active", "Connections relayed with splice(2) now.", st["spliced_now"]))
        families.append(
            counter("splice_connections_total", "Connections switched to splice(2) since start.", st["spliced_total"])
        )
    return families


def dns_families(stats):
    """The DNS service's families from its :class:`~proxy.dnsserver.DNSStats`."""
    snap = stats.snapshot()
    f = counter("dns_queries_total", "Customer DNS queries by result.")
    for result, n in _seeded(DNS_RESULTS, Counter(snap["queries"])).items():
        f.add(n, result=result)
    families = [f]
    families.append(
        histogram("dns_query_latency_seconds", "Customer DNS query to answer, cache hits included.", stats.latency_histogram)
    )
    families.append(counter("dns_cache_hits_total", "DNS answers served from a device's cache.", snap["cache"]["hits"]))
    families.append(counter("dns_cache_misses_total", "DNS queries not in the cache.", snap["cache"]["misses"]))
    families.append(
        counter("dns_coalesced_total", "DNS queries answered by joining an identical one in flight.", snap["coalesced"])
    )
    f = counter("dns_resolved_total", "Cache misses by where they were resolved (device or host).")
    for where, n in _seeded(("device", "host"), Counter(snap["resolved"])).items():
        f.add(n, via=where)
    families.append(f)
    families.append(
        counter("dns_device_connections_total", "DNS connections opened through devices.", snap["upstream"]["opened"])
    )
    f = counter("dns_device_connection_failures_total", "DNS connections through devices that failed, by kind.")
    for kind, n in _seeded(UPSTREAM_KINDS, Counter(snap["upstream"]["failed"])).items():
        f.add(n, kind=kind)
    families.append(f)
    f = counter("dns_tcp_refused_total", "DNS TCP connections reset at accept, by limit (per_client or full).")
    for why, n in _seeded(("per_client", "full"), Counter(snap["tcp"]["refused_by"])).items():
        f.add(n, limit=why)
    families.append(f)
    return families


class MetricsResource(Resource):
    """``GET /metrics``: the exposition text."""

    isLeaf = True

    def __init__(self, operations=None, proxy_stats=None, splice=None, verifier=None, dns_stats=None):
        super().__init__()
        self.dns_stats = dns_stats
        self.operations = operations
        self.proxy_stats = proxy_stats
        self.splice = splice
        self.verifier = verifier

    def render_GET(self, request):
        body = render(collect(self.operations, self.proxy_stats, self.splice, self.verifier, self.dns_stats))
        body = body.encode("utf-8")
        request.setHeader(b"content-type", CONTENT_TYPE)
        return body

    render_HEAD = render_GET


class _QuietSite(Site):
    """No access-log line per scrape (Prometheus scrapes every few seconds)."""

    def log(self, request):
        pass


def site(resource, pages=None):
    """A :class:`Site` serving ``resource`` at ``/metrics`` and ``pages`` (``{b"status": ...}``)
    beside it; everything else 404."""
    root = Resource()
    root.putChild(b"metrics", resource)
    for name, page in (pages or {}).items():
        root.putChild(name, page)
    s = _QuietSite(root)
    s.displayTracebacks = False
    s.noisy = False
    return s


class MetricsService(service.Service):
    """Listens on the endpoint string ``listen`` (e.g. ``tcp:9105:interface=127.0.0.1``).

    A port that cannot be bound is logged and metrics stay off: the admission
    and proxy paths keep running (Prometheus reports the target down).
    """

    _log = Logger()

    def __init__(self, reactor, listen, resource, pages=None):
        self.reactor = reactor
        self.listen = listen
        self.pages = pages or {}
        self.factory = site(resource, self.pages)
        self.port = None
        self._listening = None

    def privilegedStartService(self):
        super().privilegedStartService()
        self._start()

    def startService(self):
        super().startService()
        self._start()

    def _start(self):
        if self._listening is not None:
            return
        self._listening = serverFromString(self.reactor, self.listen).listen(self.factory)
        self._listening.addCallbacks(self._listened, self._failed)

    def _listened(self, port):
        self.port = port
        paths = " ".join(["/metrics"] + ["/" + name.decode() for name in self.pages])
        self._log.info("metrics at {listen} (GET {paths})", listen=self.listen, paths=paths, event="metrics-listening")
        return port

    def _failed(self, failure):
        self._log.error(
            "cannot listen for metrics on {listen}: {error}; metrics disabled",
            listen=self.listen,
            error=failure.getErrorMessage(),
            event="metrics-listen-failed",
        )

    def stopService(self):
        super().stopService()
        d, self._listening = self._listening, None
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        if d is not None:
            d.cancel()
        return None
