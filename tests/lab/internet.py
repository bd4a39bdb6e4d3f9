"""The lab's internet: one router namespace every other lab namespace reaches the world through.

A real customer has their own internet connection (IPv4 and IPv6 default routes) and a real VPN
server has an uplink; a lab without them hides leaks, missing routes and bypasses behind
"unreachable". So every :class:`tests.lab.openvpn.Lab` builds one :class:`Internet`::

                     ┌───────────── inet ns (forwards v4 and v6) ──────────────┐
    server ns ──veth─┤ bridge "dc"   192.168.77.254/24  2001:db8:77::254/64    │
    (192.168.77.1,   │   (the server's uplink; the underlay neighbour .2)      │
     2001:db8:77::1) │ bridge "isp"  100.64.0.1/24      2001:db8:64::1/64      ├──veth── origin bridge
    client ns i ─veth┤   (customers: 100.64.0.(10+i), 2001:db8:64::(10+i))     │   203.0.113.254/24
                     └─────────────────────────────────────────────────────────┘   2001:db8:113::254/64

- Customers are not on the server's segment: their tunnel packets are routed by the internet,
  so OpenVPN's ``redirect-gateway`` must keep a host route to the server through the customer's
  own gateway, as on a real network.
- :class:`tests.lab.world.World` joins the origin's bridge (``203.0.113.0/24``, the
  "public resolver" ``198.51.100.53`` on the origin host) to this router, and gives the origin
  and the phones default routes through it.
- Counting rules (:meth:`leaked`) in the router's ``FORWARD`` chains: anything a customer's own
  address sends through the internet other than its tunnel to the VPN server, and anything that
  enters from the server's segment other than tunnel packets back to customers (the server's own
  traffic, or a customer's VPN-addressed packet the server forwarded raw), is a leak. Packets are
  counted, never dropped: a leak shows as a number and at the origin's logs, not as a timeout.

Everything lives in namespaces the lab made; nothing is routed or NATed to the real uplink.
"""

import ipaddress
import subprocess

from tests.lab.netns import Namespace, add_bridge, unique_name

DC_NET = ipaddress.IPv4Network("192.168.77.0/24")
DC_NET6 = ipaddress.IPv6Network("2001:db8:77::/64")
DC_GATEWAY, DC_GATEWAY6 = "192.168.77.254", "2001:db8:77::254"
ISP_NET = ipaddress.IPv4Network("100.64.0.0/24")
ISP_NET6 = ipaddress.IPv6Network("2001:db8:64::/64")
ISP_GATEWAY, ISP_GATEWAY6 = "100.64.0.1", "2001:db8:64::1"
ORIGIN_SIDE, ORIGIN_SIDE6 = "203.0.113.254", "2001:db8:113::254"

TAG = "pp-test-inet"
VPN_PORT = 1194


def customer_address(index):
    """Customer ``index``'s own ISP addresses: ``(100.64.0.(10+i), 2001:db8:64::(10+i))``."""
    return str(ISP_NET.network_address + 10 + index), str(ISP_NET6.network_address + 10 + index)


def _v6(address):
    return ":" in str(address)


class Internet:
    """The router namespace and its two segments (server side, customers' ISP); see the module doc."""

    def __init__(self, server_address="192.168.77.1", server_address6="2001:db8:77::1", vpn_port=VPN_PORT):
        self.ns = Namespace("net")
        self.server_address = server_address
        self.server_address6 = server_address6
        self.vpn_port = vpn_port
        self.bridges = {}
        try:
            self.ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
            self.ns.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
            self.bridges["dc"] = self._bridge("dc", "%s/%d" % (DC_GATEWAY, DC_NET.prefixlen),
                                              "%s/%d" % (DC_GATEWAY6, DC_NET6.prefixlen))
            self.bridges["isp"] = self._bridge("isp", "%s/%d" % (ISP_GATEWAY, ISP_NET.prefixlen),
                                               "%s/%d" % (ISP_GATEWAY6, ISP_NET6.prefixlen))
            self._install_counters()
        except BaseException:
            self.ns.destroy()
            raise

    def _bridge(self, role, address, address6):
        name = unique_name(role)
        add_bridge(self.ns, name)
        self.ns.run("ip", "addr", "add", address, "dev", name)
        self.ns.run("ip", "-6", "addr", "add", address6, "dev", name, "nodad")
        self.ns.run("ip", "link", "set", name, "up")
        return name

    def join(self, ns, segment, address, address6=None, default_route=True):
        """Plug ``ns`` into ``segment`` ("dc" or "isp") with a veth pair; address its end (v4 /24,
        v6 /64, no DAD wait) and, with ``default_route``, route the world through this router."""
        bridge = self.bridges[segment]
        router_side, ns_side = unique_name("ib"), unique_name("ic")
        subprocess.run(
            ["ip", "link", "add", router_side, "netns", self.ns.name, "type", "veth",
             "peer", "name", ns_side, "netns", ns.name],
            check=True, timeout=30,
        )
        self.ns.run("ip", "link", "set", router_side, "master", bridge)
        self.ns.run("ip", "link", "set", router_side, "up")
        net, net6, gateway, gateway6 = (
            (DC_NET, DC_NET6, DC_GATEWAY, DC_GATEWAY6) if segment == "dc" else (ISP_NET, ISP_NET6, ISP_GATEWAY, ISP_GATEWAY6)
        )
        ns.run("ip", "addr", "add", "%s/%d" % (address, net.prefixlen), "dev", ns_side)
        if address6 is not None:
            ns.run("ip", "-6", "addr", "add", "%s/%d" % (address6, net6.prefixlen), "dev", ns_side, "nodad")
        ns.run("ip", "link", "set", ns_side, "up")
        if default_route:
            ns.run("ip", "route", "replace", "default", "via", gateway)
            if address6 is not None:
                ns.run("ip", "-6", "route", "replace", "default", "via", gateway6)
        return ns_side

    def join_bridge(self, bridge_ns, bridge, address, address6):
        """Plug this router into a bridge owned by another namespace (the origin's), as ``address``/24
        and ``address6``/64 on that segment."""
        bridge_side, router_side = unique_name("ob"), unique_name("ir")
        subprocess.run(
            ["ip", "link", "add", bridge_side, "netns", bridge_ns.name, "type", "veth",
             "peer", "name", router_side, "netns", self.ns.name],
            check=True, timeout=30,
        )
        bridge_ns.run("ip", "link", "set", bridge_side, "master", bridge)
        bridge_ns.run("ip", "link", "set", bridge_side, "up")
        self.ns.run("ip", "addr", "add", "%s/24" % address, "dev", router_side)
        self.ns.run("ip", "-6", "addr", "add", "%s/64" % address6, "dev", router_side, "nodad")
        self.ns.run("ip", "link", "set", router_side, "up")
        return router_side

    def route(self, destination, via):
        """A static route in the router (v4 or v6 by the destination's family)."""
        family = "-6" if _v6(destination) else "-4"
        self.ns.run("ip", family, "route", "replace", str(destination), "via", via)

    # --- leak counters -------------------------------------------------------------------

    def _install_counters(self):
        """Count (never drop) what crosses the router; see :meth:`leaked`. One ``*-restore`` per family."""
        for tool, customers, server in (
            ("iptables", str(ISP_NET), self.server_address),
            ("ip6tables", str(ISP_NET6), self.server_address6),
        ):
            icmp = "icmpv6" if tool == "ip6tables" else "icmp"
            rules = [
                # the tunnel itself, both ways: allowed, and counted so a test can show the watch sees traffic
                ["-s", customers, "-d", server, "-p", "udp", "--dport", str(self.vpn_port), "tunnel"],
                ["-s", server, "-d", customers, "-p", "udp", "--sport", str(self.vpn_port), "tunnel"],
                # ICMP errors about the tunnel, both ways (port unreachable while either OpenVPN restarts)
                ["-s", server, "-d", customers, "-p", icmp, "tunnel"],
                ["-s", customers, "-d", server, "-p", icmp, "tunnel"],
                # everything else from a customer's own address, or from the server's segment
                # (whatever its source: the server's, or a VPN address forwarded raw): a leak
                # (frames bridged within one segment are not routed anywhere: with br_netfilter
                # loaded they traverse FORWARD too, hence the ``! -o`` of the segment's own bridge)
                ["-s", customers, "!", "-o", self.bridges["isp"], "customer"],
                ["-i", self.bridges["dc"], "!", "-o", self.bridges["dc"], "server"],
            ]
            lines = ["*filter"]
            for *match, name in rules:
                verdict = " -j RETURN" if name == "tunnel" else ""
                lines.append("-A FORWARD %s -m comment --comment %s:%s%s" % (" ".join(match), TAG, name, verdict))
            self.ns.run(tool + "-restore", "-w", "--noflush", input="\n".join(lines + ["COMMIT", ""]))

    def _count(self, tool, name):
        out = self.ns.run(tool, "-w", "-v", "-x", "-n", "-L", "FORWARD").stdout
        total = 0
        for line in out.splitlines():
            if "%s:%s " % (TAG, name) in line + " ":
                total += int(line.split()[0])
        return total

    def counters(self):
        """``{"tunnel", "customer", "server"}`` packets forwarded (v4 + v6)."""
        return {name: self._count("iptables", name) + self._count("ip6tables", name)
                for name in ("tunnel", "customer", "server")}

    def leaked(self):
        """Packets a customer's own address or the server's uplink sent into the internet that were
        not the tunnel: ``{"customer": n, "server": n}``, both must stay 0."""
        counts = self.counters()
        return {"customer": counts["customer"], "server": counts["server"]}

    def destroy(self):
        self.ns.destroy()


def route_error(ns, address):
    """The kernel's answer to ``ip route get <address>`` in ``ns``: an error text when there is
    no route, ``None`` if one exists."""
    out = ns.run("ip", "route", "get", address, check=False)
    return None if out.returncode == 0 else (out.stderr.strip() or "exit %d" % out.returncode)
