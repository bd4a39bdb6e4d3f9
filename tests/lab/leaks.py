"""Leak counters: proof that no VPN packet left the server except through a device proxy.

Test-owned iptables rules, only ever in lab namespaces (every command runs through
``Namespace.run``, i.e. ``ip netns exec <pp…>``; the namespaces and their rules go with the lab):

server namespace
  ``filter FORWARD`` (appended, after pocketproxy's ``-i tun+ -j POCKETPROXY`` jump at position 1):
  a target-less counting rule ``-i tun+``. pocketproxy's chain ends in REJECT for every protocol,
  so a packet counted here got PAST the fail-closed chain: a leak.
  ``mangle POSTROUTING``: ``-s <vpn subnet> ! -o tun+``. Proxied flows leave from the server's own
  device-link address, so a packet still carrying a VPN source on a non-tun interface is raw egress
  (mangle POSTROUTING sees every packet, before any SNAT in nat POSTROUTING).
origin namespace
  ``raw PREROUTING`` jumps to a chain ``PPTEST-ORIGIN`` that RETURNs (and counts) packets from each
  device's origin-facing address and counts everything else addressed to the origin itself
  (``addrtype --dst-type LOCAL``): the origin may only ever see devices. Only what is addressed to
  it: with ``br_netfilter`` (as on this kernel) frames the origin's bridge merely switches between
  other hosts cross its ``PREROUTING`` too, e.g. the internet router's ICMP redirects to a phone
  that reached ``1.1.1.1`` through it; those are not the origin seeing anyone. The sources of what
  was counted are in an ``xt_recent`` list and in the failure message.

:meth:`LeakWatch.rejected` reads the REJECT counters of pocketproxy's own ``filter POCKETPROXY``
chain, so a test that sends deliberately unproxied traffic can show the fail-closed rules fired while
the leak counters stayed at 0.

internet namespace (:mod:`tests.lab.internet`, after :meth:`LeakWatch.attach_world`)
  ``FORWARD`` counters of anything a customer's own address or the server's uplink sends through
  the internet other than the tunnel itself (``customer`` and ``server``).

The lab's server namespace is a router the way a real OpenVPN server is one (``ip_forward=1``, a
default route through its uplink), so an unproxied packet really would leave, and the fail-closed
chain is really exercised; the origin and the internet would see and count it.
"""

import re
import sys

from tests.lab.openvpn import VPN_SUBNET

TAG = "pp-test-leak"
ORIGIN_CHAIN = "PPTEST-ORIGIN"
ORIGIN_RECENT = "pp-origin-leak"  # xt_recent list of the sources the origin counter counted
_COUNTS = re.compile(r" -c (\d+) (\d+)(?= |$)")  # iptables-nft puts it before "-j …"


def _rules(ns, table, chain):
    """``[(rule text without counters, packets, bytes)]`` of ``chain`` (``iptables -v -S``)."""
    out = ns.run("iptables", "-w", "-t", table, "-v", "-S", chain, timeout=30).stdout
    rules = []
    for line in out.splitlines():
        if not line.startswith("-A "):
            continue
        m = _COUNTS.search(line)
        if m is None:
            raise AssertionError("no counters in iptables -v -S line: %r" % line)
        rules.append((line[: m.start()] + line[m.end():], int(m.group(1)), int(m.group(2))))
    return rules


def _tagged(ns, table, chain, tag):
    """Packets counted by the rule(s) of ``chain`` whose comment is ``tag``."""
    pattern = re.compile(r'--comment "?%s"?(?: |$)' % re.escape(tag))
    found = [pkts for text, pkts, _ in _rules(ns, table, chain) if pattern.search(text)]
    if not found:
        raise AssertionError("leak counter %s missing from %s %s" % (tag, table, chain))
    return sum(found)


def _lab_namespace(ns):
    # Never the root namespace: Namespace.run always prefixes "ip netns exec <name>".
    if not getattr(ns, "name", "").startswith("pp"):
        raise ValueError("leak counters belong in a lab namespace, not %r" % ns)
    return ns


class LeakWatch:
    """Counting rules in the server and origin namespaces; readers for them and for pocketproxy's REJECTs."""

    def __init__(self, server_ns, subnet=VPN_SUBNET, tun="tun+"):
        self.server_ns = _lab_namespace(server_ns)
        self.subnet = str(subnet)
        self.tun = tun
        self.origin_ns = None
        self.internet = None
        self.allowed = []  # device addresses the origin may see

    # --- install ---------------------------------------------------------------------------

    def install(self):
        ns = self.server_ns
        ns.run("iptables", "-w", "-t", "filter", "-A", "FORWARD", "-i", self.tun,
               "-m", "comment", "--comment", TAG + ":forward")
        ns.run("iptables", "-w", "-t", "mangle", "-A", "POSTROUTING", "-s", self.subnet, "!", "-o", self.tun,
               "-m", "comment", "--comment", TAG + ":egress")
        return self

    def attach_world(self, world):
        """Count the origin's non-device packets (call once the devices exist), and read the
        internet's counters (see module docstring)."""
        devices = list(world.devices.values())
        if not devices:
            raise ValueError("attach_world() needs the devices first")
        self.origin_ns = ns = _lab_namespace(world.origin.ns)
        ns.run("iptables", "-w", "-t", "raw", "-N", ORIGIN_CHAIN)
        for device in devices:
            ns.run("iptables", "-w", "-t", "raw", "-A", ORIGIN_CHAIN, "-s", device.origin_ip,
                   "-m", "comment", "--comment", TAG + ":device", "-j", "RETURN")
            self.allowed.append(device.origin_ip)
        ns.run("iptables", "-w", "-t", "raw", "-A", ORIGIN_CHAIN, "-m", "addrtype", "--dst-type", "LOCAL",
               "-m", "recent", "--name", ORIGIN_RECENT, "--set", "-m", "comment", "--comment", TAG + ":origin")
        ns.run("iptables", "-w", "-t", "raw", "-A", "PREROUTING", "-j", ORIGIN_CHAIN)
        self.internet = world.internet
        return self

    # --- read ------------------------------------------------------------------------------

    def leaked(self):
        """``{"forward": n, "egress": n, "origin": n}`` packets; every value must stay 0."""
        counts = {
            "forward": _tagged(self.server_ns, "filter", "FORWARD", TAG + ":forward"),
            "egress": _tagged(self.server_ns, "mangle", "POSTROUTING", TAG + ":egress"),
        }
        if self.origin_ns is not None:
            counts["origin"] = _tagged(self.origin_ns, "raw", ORIGIN_CHAIN, TAG + ":origin")
        if self.internet is not None:
            counts.update(("internet-" + k, v) for k, v in self.internet.leaked().items())
        return counts

    def device_packets(self):
        """Packets the origin received from device addresses (proves its counter sees traffic)."""
        if self.origin_ns is None:
            return 0
        return _tagged(self.origin_ns, "raw", ORIGIN_CHAIN, TAG + ":device")

    def rejected(self, chain="POCKETPROXY"):
        """pocketproxy's fail-closed REJECT counters in ``filter <chain>``: ``{"tcp", "udp", "other"}``."""
        counts = {"tcp": 0, "udp": 0, "other": 0}
        for text, pkts, _ in _rules(self.server_ns, "filter", chain):
            if "-j REJECT" not in text:
                continue
            proto = "tcp" if " -p tcp " in text else "udp" if " -p udp " in text else "other"
            counts[proto] += pkts
        return counts

    def snapshot(self):
        return {"leaked": self.leaked(), "rejected": self.rejected(), "device": self.device_packets()}

    def assert_no_leak(self, since=None, world=None):
        """Every leak counter is 0 (or unchanged since the ``since`` snapshot); with ``world``, every
        device is allowed at the origin (a device added after attach_world would count as a leak)."""
        if world is not None:
            missing = {d.origin_ip for d in world.devices.values()} - set(self.allowed)
            assert not missing, "devices added after attach_world(): %s" % sorted(missing)
        now = self.leaked()
        base = since["leaked"] if since else {k: 0 for k in now}
        grown = {k: now[k] - base.get(k, 0) for k in now if now[k] != base.get(k, 0)}
        assert not grown, "packets leaked past the fail-closed rules: %s (counters %s)%s" % (grown, now, self._sources())
        return now

    def _sources(self):
        """The source addresses the origin's counter counted (its xt_recent list), for the message."""
        if self.origin_ns is None:
            return ""
        listed = self.origin_ns.run("cat", "/proc/net/xt_recent/" + ORIGIN_RECENT, check=False).stdout.strip()
        return "; sources at the origin: %s" % (" ".join(line.split()[0] for line in listed.splitlines()) or "none")


# A connected UDP socket: each datagram answered by ICMP port-unreachable (REJECT) raises ECONNREFUSED.
_UDP_SCRIPT = r"""
import json, socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
s.connect((host, port))
refused = silent = 0
for i in range(count):
    try:
        s.send(b"pocketproxy-leak-probe %d" % i)
        s.recv(2048)
    except ConnectionRefusedError:
        refused += 1
    except socket.timeout:
        silent += 1
    except OSError:
        silent += 1
print(json.dumps({"sent": count, "refused": refused, "silent": silent}))
"""


def send_udp(ns, host, port, count=5):
    """Send ``count`` UDP datagrams from ``ns`` to ``host:port``; ``{"sent", "refused", "silent"}``."""
    import json

    out = ns.run(sys.executable, "-c", _UDP_SCRIPT, host, str(port), str(count), timeout=count * 2 + 20)
    return json.loads(out.stdout.strip().splitlines()[-1])
