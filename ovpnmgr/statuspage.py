# -*- test-case-name: tests.unit.test_statuspage, tests.integration.test_status_page -*-
"""The read-only status page (issue 20): ``GET /status`` beside ``/metrics`` on the same listener.

Server-rendered HTML that refreshes itself (``<meta http-equiv="refresh">``), no JavaScript,
no external assets: devices (health, exit address, users), clients (user, address, device,
since, bytes, live connections), recent admissions, the latest firewall check and pocketproxy's
own vitals. ``GET /status.json`` is the data behind it: the same objects as ``pocketproxyctl
--json`` (:mod:`ovpnmgr.views`). Every value is HTML-escaped; nothing on it is a secret (device
upstreams show ``***`` for their password). With ``metrics.status_password_file`` both need HTTP
Basic authentication (any user name, that password).
"""

import hmac
import html
import json

from twisted.web.resource import Resource

from ovpnmgr import views

__all__ = ["StatusPage", "StatusJSON", "snapshot", "render_html", "REFRESH"]

REFRESH = 10  # seconds between the page's own reloads


def snapshot(operations, proxy_stats=None, dns_stats=None):
    """Everything the page shows, as data (``/status.json``)."""
    return {
        "devices": views.devices(operations),
        "clients": views.clients(operations),
        "recent_admissions": views.recent_admissions(operations),
        "firewall": views.firewall(operations),
        "stats": views.stats(operations, proxy_stats, dns_stats),
        "vitals": views.vitals(operations),
    }


def _bytes(n):
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024.0
    return "%d" % n


def _cell(value):
    return "<td>%s</td>" % html.escape("-" if value is None or value == "" else str(value))


def _table(title, headers, rows, css):
    out = ["<h2>%s</h2>" % html.escape(title), '<table class="%s"><tr>' % css]
    out += ["<th>%s</th>" % html.escape(h) for h in headers]
    out.append("</tr>")
    if not rows:
        out.append('<tr><td colspan="%d" class="none">none</td></tr>' % len(headers))
    for row in rows:
        out.append("<tr>" + "".join(_cell(v) for v in row) + "</tr>")
    out.append("</table>")
    return out


_STYLE = (
    "body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin-bottom:1.5em}"
    "th,td{border:1px solid #bbb;padding:3px 8px;text-align:left;font-size:90%}th{background:#eee}"
    "td.none{color:#888}.up{color:#070}.down{color:#b00}"
)


def render_html(data):
    """The page for a :func:`snapshot` (str)."""
    vitals, firewall = data["vitals"], data["firewall"]
    head = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="%d">' % REFRESH,
        "<title>pocketproxy status</title><style>%s</style></head><body>" % _STYLE,
        "<h1>pocketproxy</h1>",
        "<p>pid %s, up %s s, management %s, %s clients, refreshed every %d s</p>"
        % (vitals["pid"], vitals["uptime_s"], "connected" if vitals["management_connected"] else "NOT connected",
           len(data["clients"]), REFRESH),
    ]
    devices = []
    for d in data["devices"]:
        h = d.get("health") or {}
        devices.append((d["device"], h.get("state"), None if h.get("rtt_ms") is None else "%s ms" % h["rtt_ms"],
                        h.get("exit_address"), h.get("exit_changed"), ", ".join(d["users"]),
                        ", ".join("%s@%s" % (c["user"], c["vpn_ip"]) for c in d["connected"]), d["upstream"]))
    clients = [
        (c["user"], c["vpn_ip"], c["device"], c["connected_since"], c["state"], c["live_connections"],
         _bytes(c["tunnel_bytes_in"]), _bytes(c["tunnel_bytes_out"]), _bytes(c["proxied_bytes_up"]),
         _bytes(c["proxied_bytes_down"]))
        for c in data["clients"]
    ]
    admissions = [(a["time"], a["user"], a["cid"], a["device"], a["result"], a["reason"]) for a in data["recent_admissions"]]
    if not firewall["checked"]:
        fw = "not checked yet"
    elif firewall["ok"]:
        fw = "ok"
    else:
        fw = "DRIFT: " + "; ".join(firewall["problems"])
    body = []
    body += _table("Devices", ("device", "state", "rtt", "exit address", "exit changed", "users", "connected", "upstream"),
                   devices, "devices")
    body += _table("Clients", ("user", "vpn address", "device", "since", "state", "live conns", "tunnel in", "tunnel out",
                               "proxied up", "proxied down"), clients, "clients")
    body += _table("Recent admissions", ("time", "user", "cid", "device", "result", "reason"), admissions, "admissions")
    body += ["<h2>Firewall</h2>", '<p class="firewall">%s</p>' % html.escape(fw)]
    body += _table("Vitals", ("key", "value"), sorted(vitals.items()), "vitals")
    return "\n".join(head + body + ["</body></html>", ""])


class _Guarded(Resource):
    isLeaf = True

    def __init__(self, operations, proxy_stats=None, dns_stats=None, password=None):
        super().__init__()
        self.operations = operations
        self.proxy_stats = proxy_stats
        self.dns_stats = dns_stats
        self.password = password  # bytes, or None: no authentication

    def _allowed(self, request):
        if self.password is None:
            return True
        given = request.getPassword() or b""
        return hmac.compare_digest(given, self.password)

    def render_GET(self, request):
        if not self._allowed(request):
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Basic realm="pocketproxy status"')
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"authentication required\n"
        request.setHeader(b"cache-control", b"no-store")
        return self.body(snapshot(self.operations, self.proxy_stats, self.dns_stats), request)


class StatusPage(_Guarded):
    """``GET /status``: the HTML page."""

    def body(self, data, request):
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return render_html(data).encode("utf-8")


class StatusJSON(_Guarded):
    """``GET /status.json``: the data behind the page."""

    def body(self, data, request):
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(data, sort_keys=True).encode("utf-8")
