# -*- test-case-name: tests.unit.test_admin, tests.unit.test_statuspage -*-
"""What operators see, as plain data: clients, devices, counters, recent admissions, vitals.

One source for every view: the admin socket's ``pp clients|devices|stats --json`` (and so
``pocketproxyctl --json``) and the status page (:mod:`ovpnmgr.statuspage`) read these, so they
never disagree. Nothing here holds a secret: device upstreams are rendered by
:class:`~proxy.upstream.Upstream`'s ``str``, which hides the password.
"""

import datetime
import os
import resource
import time

__all__ = ["iso", "clients", "devices", "health", "stats", "recent_admissions", "firewall", "vitals"]

_STARTED = time.time()


def iso(t, timespec="seconds"):
    """A Unix time as ISO 8601 UTC, or None."""
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec=timespec)


def clients(operations):
    """``pp clients --json``'s rows: every session, with its tunnel and proxied byte counts."""
    rows = []
    for s in operations.client_list():
        up, down, live = operations.client_traffic(s.address) if s.address is not None else (None, None, 0)
        rows.append(
            {
                "user": s.name,
                "cid": s.cid,
                "vpn_ip": str(s.address) if s.address is not None else None,
                "device": s.user.device.name if s.user is not None else None,
                "connected_since": iso(s.connected_since),
                "live_connections": live,
                "state": s.state.value,
                # OpenVPN's tunnel counters (>BYTECOUNT_CLI, every openvpn.bytecount_interval s):
                # in = from the client, out = to the client; None until the first report.
                "tunnel_bytes_in": s.bytes_in,
                "tunnel_bytes_out": s.bytes_out,
                # Relayed by the proxy for this address since admission (up = client to device).
                "proxied_bytes_up": up,
                "proxied_bytes_down": down,
                # What the client was pushed (ovpnmgr.tunnel): "split" sends all but the pushed
                # routes through the customer's own connection.
                "tunnel": operations.tunnel_mode(s.user) if s.user is not None else None,
            }
        )
    return rows


def health(operations, name):
    """One device's health for ``pp devices`` (None: health off, or a device without users)."""
    snapshot = operations.device_health(name)
    if snapshot is None:
        return None
    rtt, ratio = snapshot["rtt"], snapshot["ratio"]
    return {
        "state": snapshot["state"],
        "since": iso(snapshot["since"], "milliseconds"),
        "rtt_ms": round(rtt * 1000, 1) if rtt is not None else None,
        "success_ratio": round(ratio, 3) if ratio is not None else None,
        "exit_address": snapshot["exit_address"],
        "exit_changed": iso(snapshot["exit_changed"], "milliseconds"),
        "last_error": snapshot["last_error"],
        "target": snapshot["target"],
        "rotation": (snapshot.get("rotation") or {}).get("state", "idle"),
        "rotation_error": (snapshot.get("rotation") or {}).get("error"),
    }


def devices(operations):
    """``pp devices --json``'s rows: each device, its users, who is connected through it, health."""
    connected = {}
    for row in clients(operations):
        if row["device"] is not None:
            connected.setdefault(row["device"], []).append(row)
    out = []
    directory = operations.directory
    for name in sorted(directory.devices):
        device = directory.devices[name]
        out.append(
            {
                "device": name,
                "upstream": str(device.upstream),  # Upstream.__str__ hides the password
                "users": sorted(u.name for u in directory.users.values() if u.device.name == name),
                "connected": [{"user": r["user"], "cid": r["cid"], "vpn_ip": r["vpn_ip"]} for r in connected.get(name, [])],
            }
        )
        if operations.health is not None:  # device health on: None for a device without users
            out[-1]["health"] = health(operations, name)
    return out


def stats(operations, proxy_stats=None, dns_stats=None):
    """``pp stats --json``: admission counts, and the proxy's, DNS's and health's counters."""
    snapshot = {"admission": operations.counts()}
    if proxy_stats is not None:
        snapshot["proxy"] = proxy_stats.snapshot()
    if dns_stats is not None:
        snapshot["dns"] = dns_stats.snapshot()
    if operations.health is not None:
        snapshot["health"] = operations.health.stats()
    return snapshot


def recent_admissions(operations):
    """The latest answered CONNECTs, newest first."""
    return [dict(entry, time=iso(entry["time"])) for entry in reversed(operations.recent_admissions)]


def firewall(operations):
    """The latest kernel check: ``{"checked": bool, "ok": bool, "problems": [...]}``."""
    drift = operations.last_drift
    if drift is None:
        return {"checked": False, "ok": None, "problems": []}
    problems = list(drift.rule_problems)
    if drift.set_missing:
        problems.append("the ipset is missing")
    if drift.missing_members:
        problems.append("%d member(s) missing: %s" % (len(drift.missing_members), ", ".join(sorted(map(str, drift.missing_members)))))
    if drift.extra_members:
        problems.append("%d extra member(s): %s" % (len(drift.extra_members), ", ".join(sorted(map(str, drift.extra_members)))))
    return {"checked": True, "ok": not problems and not drift.missing_chain_rules, "problems": problems}


def vitals(operations):
    """pocketproxy's own state: uptime, memory, descriptors, the management connection."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = None
    return {
        "pid": os.getpid(),
        "started": iso(_STARTED),
        "uptime_s": round(time.time() - _STARTED),
        "max_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "open_fds": fds,
        "management_connected": bool(operations.management_ready),
        "reconciled": bool(operations.reconciled),
        "draining": bool(getattr(operations, "draining", False)),
    }
