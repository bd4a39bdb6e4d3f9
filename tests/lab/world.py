"""The world behind the proxy: "device" namespaces (phones running a real proxy) and an origin.

Topology added next to a :class:`tests.lab.openvpn.Lab` and its internet (device i = 0, 1, 2, ...)::

    server ns ── veth ── device ns i ── bridge ── origin ns
    192.168.(255-i).1    192.168.(255-i).2   │     203.0.113.10, 2001:db8:113::10 (HTTP :80, TLS :443,
                         203.0.113.(2+i)     │     banner :22), 198.51.100.53 (a "public resolver")
                                             │     "origin.test", "api.ipify.org" in phones' /etc/hosts
                             inet ns ────────┘     203.0.113.254, 2001:db8:113::254: the internet
                             (tests.lab.internet)  (customers' ISP and the server's uplink route here)

- A device runs tinyproxy 1.11 (HTTP CONNECT, :8080, no ConnectPort lines, so every port is
  allowed; ``Allow`` only the server's side of the link; optional ``BasicAuth``) or dante
  (SOCKS5, :1080, ``socksmethod: none``). Its proxy connects to the origin from the device's
  own 203.0.113.x address, so the origin's ``/whoami`` names the device that carried a flow.
- The origin is on the internet, as origins are: customers reach it through their own ISP,
  the VPN server through its uplink, the phones directly and through the internet (their
  default route). Devices do not forward (``ip_forward=0``). So what the origin logs is the
  proof: a phone's 203.0.113.(2+i) means the flow went through that phone's proxy; a
  customer's 100.64.0.x / 2001:db8:64::x or the server's 192.168.77.1 means a leak.
- Every world runs an authoritative DNS server for the zone ``test.`` (:attr:`World.dns`,
  :meth:`World.start_dns`) on 203.0.113.10:53, 2001:db8:113::10:53, the "public resolver"
  198.51.100.53:53 and ``1.1.1.1:53`` (UDP and TCP; :mod:`tests.lab.dns_origin`) that logs every query's source, so a test can prove DNS
  reached it through a device's proxy (``origin.test`` has an AAAA record too, so dual-stack
  clients try IPv6 first). With ``doh_port`` it also serves DNS over HTTPS at
  ``https://origin.test:<port>/dns-query`` (the origin certificate, so :attr:`DNSOrigin.ca_cert`
  verifies it) and logs each accepted TLS connection.
- The product's defaults exist in the lab as on the internet: ``1.1.1.1`` (its default
  ``dns.resolver``) and ``api.ipify.org`` (its default device health target; in every phone's
  /etc/hosts, answered by the origin's HTTP service with the caller's address), so a daemon run
  with the shipped defaults resolves through its phones and sees them up with their exit address.
- VPN clients reach the origin through the full tunnel pocketproxy pushes: the lab pushes
  nothing of its own.

Processes are started with ``Namespace.popen`` and stopped by PID; :meth:`World.close`
(also on ``with`` exit) destroys every namespace the world made.
"""

import collections
import ipaddress
import os
import re
import subprocess
import sys
import types

from tests.lab.internet import ORIGIN_SIDE, ORIGIN_SIDE6, route_error
from tests.lab.netns import Namespace, add_bridge, link, read_log, unique_name, wait_for, wait_log
from tests.lab.origin_server import IPIFY_NAME

HERE = os.path.dirname(os.path.abspath(__file__))
ORIGIN_NET = ipaddress.IPv4Network("203.0.113.0/24")
ORIGIN_NET6 = ipaddress.IPv6Network("2001:db8:113::/64")
ORIGIN_IP = "203.0.113.10"
ORIGIN_IP6 = "2001:db8:113::10"
RESOLVER_IP = "198.51.100.53"  # a "public resolver" a customer's app may ask instead of the pushed one
DEFAULT_RESOLVER_IP = "1.1.1.1"  # the product's default dns.resolver (and health target): the lab has one
ORIGIN_NAME = "origin.test"
TINYPROXY = "/usr/bin/tinyproxy"
DANTED = "/usr/sbin/danted"
PORTS = {"http": 8080, "socks5": 1080}
_EXE = {"http": TINYPROXY, "socks5": DANTED}


def missing_tools(kinds=("http", "socks5")):
    """Paths of the device proxy programs (and openssl) that are not installed."""
    needed = [_EXE[k] for k in kinds] + ["/usr/bin/openssl"]
    return [path for path in needed if not os.path.exists(path)]


def _openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


def make_origin_pki(directory):
    """A throwaway CA and an origin certificate for ``origin.test`` (and the origin IP).

    Returns ``(ca_cert, cert, key)`` paths."""
    os.makedirs(directory, exist_ok=True)
    ca_cert, ca_key = os.path.join(directory, "origin-ca.crt"), os.path.join(directory, "origin-ca.key")
    cert, key = os.path.join(directory, "origin.crt"), os.path.join(directory, "origin.key")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2"]
    _openssl(
        "req", "-x509", *ec, "-keyout", ca_key, "-out", ca_cert, "-subj", "/CN=pocketproxy-lab-origin-ca",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )
    _openssl(
        "req", "-x509", *ec, "-keyout", key, "-out", cert, "-subj", "/CN=%s" % ORIGIN_NAME,
        "-CA", ca_cert, "-CAkey", ca_key,
        "-addext", "subjectAltName=DNS:%s,IP:%s" % (ORIGIN_NAME, ORIGIN_IP),
        "-addext", "basicConstraints=critical,CA:FALSE",
        "-addext", "keyUsage=critical,digitalSignature",
        "-addext", "extendedKeyUsage=serverAuth",
    )
    return ca_cert, cert, key


def _wait_listening(ns, address, port, proc, timeout, what):
    """Wait until ``address:port`` listens in ``ns`` (``ss``), failing early if ``proc`` died."""

    def listening():
        if proc.poll() is not None:
            raise AssertionError("%s exited with status %s before listening" % (what, proc.returncode))
        out = ns.run("ss", "-Hltn", "sport = :%d" % port, check=False).stdout
        return ("%s:%d" % (address, port)) in out

    wait_for(listening, timeout, what="%s listening on %s:%d" % (what, address, port))


class Origin:
    """The origin namespace: a bridge holding 203.0.113.10, 2001:db8:113::10 and 198.51.100.53,
    the origin services, and a default route into ``internet``."""

    def __init__(self, directory, internet):
        self.directory = directory
        self.address = ORIGIN_IP
        self.address6 = ORIGIN_IP6
        self.proc = None
        self.ns = Namespace("org")
        try:
            self.bridge = unique_name("ob")
            add_bridge(self.ns, self.bridge)
            self.ns.run("ip", "addr", "add", "%s/%d" % (ORIGIN_IP, ORIGIN_NET.prefixlen), "dev", self.bridge)
            self.ns.run("ip", "addr", "add", "%s/32" % RESOLVER_IP, "dev", self.bridge)
            self.ns.run("ip", "addr", "add", "%s/32" % DEFAULT_RESOLVER_IP, "dev", self.bridge)
            self.ns.run("ip", "-6", "addr", "add", "%s/%d" % (ORIGIN_IP6, ORIGIN_NET6.prefixlen), "dev", self.bridge, "nodad")
            self.ns.run("ip", "link", "set", self.bridge, "up")
            internet.join_bridge(self.ns, self.bridge, ORIGIN_SIDE, ORIGIN_SIDE6)
            internet.route("%s/32" % RESOLVER_IP, ORIGIN_IP)
            internet.route("%s/32" % DEFAULT_RESOLVER_IP, ORIGIN_IP)
            self.ns.run("ip", "route", "replace", "default", "via", ORIGIN_SIDE)
            self.ns.run("ip", "-6", "route", "replace", "default", "via", ORIGIN_SIDE6)
            self.ca_cert, self.cert, self.key = make_origin_pki(os.path.join(directory, "pki"))
        except BaseException:
            self.ns.destroy()
            raise
        self.log_path = os.path.join(directory, "origin.log")

    def attach(self, ns, address):
        """Plug ``ns`` into the origin bridge with ``address``/24 on its end."""
        bridge_side, ns_side = unique_name("ob"), unique_name("oc")
        subprocess.run(
            ["ip", "link", "add", bridge_side, "netns", self.ns.name, "type", "veth",
             "peer", "name", ns_side, "netns", ns.name],
            check=True, timeout=30,
        )
        self.ns.run("ip", "link", "set", bridge_side, "master", self.bridge)
        self.ns.run("ip", "link", "set", bridge_side, "up")
        ns.run("ip", "addr", "add", "%s/%d" % (address, ORIGIN_NET.prefixlen), "dev", ns_side)
        ns.run("ip", "link", "set", ns_side, "up")

    def start(self, timeout=15):
        ready = os.path.join(self.directory, "origin.ready")
        if os.path.exists(ready):
            os.unlink(ready)
        argv = [
            sys.executable, os.path.join(HERE, "origin_server.py"),
            "--address", ORIGIN_IP, "--address", ORIGIN_IP6, "--cert", self.cert, "--key", self.key, "--ready", ready,
        ]
        with open(self.log_path, "ab") as log:
            self.proc = self.ns.popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

        def up():
            if self.proc.poll() is not None:
                raise AssertionError("origin server exited (%s):\n%s" % (self.proc.returncode, self.log_text()))
            return os.path.exists(ready)

        wait_for(up, timeout, what="origin services")
        return self

    def log_text(self):
        return read_log(self.log_path)

    def sources(self, since=0):
        """The peer address of every request or connection the origin logged (after offset ``since``)."""
        return [m.group(2) for m in _ORIGIN_LINE.finditer(self.log_text(), since)]


_ORIGIN_LINE = re.compile(r"(?m)^(http|tls|banner) (\S+) ")


class DNSOrigin:
    """The origin's authoritative DNS server (:mod:`tests.lab.dns_origin`, zone ``test.``) on
    ``203.0.113.10:53`` UDP and TCP, a process in the origin namespace, so it is reachable only
    through a device (the server namespace has no route to the origin).

    With ``doh_port`` it also serves DNS over HTTPS (RFC 8484) at :attr:`doh_url`
    (``https://origin.test:8443/dns-query``), TLS with the origin's certificate, which chains to
    :attr:`ca_cert`. ``doh_idle_timeout``: seconds before the server closes an idle DoH
    connection (None: Twisted's default, hours).

    Made by :meth:`World.start_dns`; stopped by PID with the world. Every query it receives
    is one line ``<source ip> <udp|tcp|doh> <qname> <qtype>`` in :attr:`log_path`, and every
    TCP connection the DoH listener accepts one line ``<source ip> doh-connect``
    (:meth:`doh_connections`).
    """

    Query = collections.namedtuple("Query", "source proto qname qtype")
    DOH_PATH = "/dns-query"

    def __init__(self, origin, ttl=300, negative_ttl=30, port=53, doh_port=None, doh_idle_timeout=None):
        self.origin = origin
        self.addresses = (ORIGIN_IP, ORIGIN_IP6, RESOLVER_IP, DEFAULT_RESOLVER_IP)
        self.port = port
        self.doh_port = doh_port
        self.doh_idle_timeout = doh_idle_timeout
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.log_path = os.path.join(origin.directory, "dns-queries.log")
        self.stderr_path = os.path.join(origin.directory, "dns-origin.stderr")
        self.proc = None

    @property
    def address(self):
        """The first listening address (DoH listens only there)."""
        return self.addresses[0]

    @address.setter
    def address(self, value):
        self.addresses = (value,)

    @property
    def doh_url(self):
        """``https://origin.test:<doh_port>/dns-query`` for ``dns.resolver``; None without DoH."""
        if self.doh_port is None:
            return None
        return "https://%s:%d%s" % (ORIGIN_NAME, self.doh_port, self.DOH_PATH)

    @property
    def ca_cert(self):
        """The CA file (PEM) the DoH certificate chains to (the origin's throwaway CA)."""
        return self.origin.ca_cert

    def argv(self, ready):
        argv = [
            sys.executable, os.path.join(HERE, "dns_origin.py"),
            *[arg for address in self.addresses for arg in ("--address", address)],
            "--port", str(self.port), "--log", self.log_path, "--ready", ready,
            "--ttl", str(self.ttl), "--negative-ttl", str(self.negative_ttl),
        ]
        if self.doh_port is not None:
            argv += ["--doh-port", str(self.doh_port), "--doh-path", self.DOH_PATH,
                     "--cert", self.origin.cert, "--key", self.origin.key]
            if self.doh_idle_timeout is not None:
                argv += ["--doh-idle-timeout", str(self.doh_idle_timeout)]
        return argv

    def start(self, timeout=15):
        ready = os.path.join(self.origin.directory, "dns-origin.ready")
        if os.path.exists(ready):
            os.unlink(ready)
        with open(self.stderr_path, "ab") as err:
            self.proc = self.origin.ns.popen(
                self.argv(ready), stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT)

        def up():
            if self.proc.poll() is not None:
                raise AssertionError("DNS origin exited (%s):\n%s" % (self.proc.returncode, read_log(self.stderr_path)))
            return os.path.exists(ready)

        what = "DNS origin on %s:%d" % (self.address, self.port)
        if self.doh_port is not None:
            what += " and DoH :%d" % self.doh_port
        wait_for(up, timeout, what=what)
        return self

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        """Stop the server by PID; the query log stays."""
        if self.proc is None:
            return None
        return self.origin.ns.stop(self.proc, timeout=5)

    def log_text(self):
        return read_log(self.log_path)

    def log_mark(self):
        """An offset for ``since=``: only queries logged after this call count."""
        return len(self.log_text())

    def log_lines(self, since=0):
        """The raw log lines (queries and ``doh-connect``), oldest first."""
        return self.log_text()[since:].splitlines()

    def queries(self, since=0, qname=None):
        """Parsed :class:`DNSOrigin.Query` tuples (optionally only ``qname``, no final dot);
        ``proto`` is ``udp``, ``tcp`` or ``doh``."""
        out = []
        for line in self.log_lines(since):
            parts = line.split()
            if len(parts) == 4 and (qname is None or parts[2] == qname.lower().rstrip(".")):
                out.append(self.Query(*parts))
        return out

    def query_sources(self, since=0, qname=None):
        """The set of source addresses queries arrived from."""
        return {q.source for q in self.queries(since, qname)}

    def doh_connections(self, since=0):
        """The source address of each TCP connection the DoH listener accepted, oldest first
        (one entry per connection; TLS handshakes that then fail count too)."""
        return [parts[0] for parts in map(str.split, self.log_lines(since)) if parts[1:] == ["doh-connect"]]

    def before_sentinel(self, ask, qname, since=0, timeout=10):
        """The raw log lines written after ``since`` and before the sentinel query for ``qname``.

        ``ask()`` must send a query for ``qname`` (a name asked nowhere else) along the same
        path as whatever must *not* have reached the origin, after it. The server logs in
        arrival order, so once the sentinel is logged anything sent along that path before it
        is on record too: absence proven by a query that is waited for, not by a fixed sleep."""
        ask()
        self.wait_query(qname, timeout, since)
        name = qname.lower().rstrip(".")
        lines = self.log_lines(since)
        first = next(i for i, parts in enumerate(map(str.split, lines)) if len(parts) == 4 and parts[2] == name)
        return lines[:first]

    def wait_query(self, qname, timeout=10, since=0):
        """Wait until a query for ``qname`` was logged after ``since``; returns its Query."""
        regex = r"(?m)^(\S+) (udp|tcp|doh) %s (\S+)$" % re.escape(qname.lower().rstrip("."))
        match = wait_log(self.log_path, regex, timeout, since)
        return self.Query(match.group(1), match.group(2), qname.lower().rstrip("."), match.group(3))


def resolver_at(ns, directory, *addresses):
    """A :class:`DNSOrigin` (zone ``test.``, every query's source logged) listening on ``addresses``
    in namespace ``ns`` instead of the origin, e.g. a customer's ISP router: a query that reaches
    it did not go through the phone. Stopped with ``ns``."""
    host = types.SimpleNamespace(ns=ns, directory=str(directory))
    os.makedirs(host.directory, exist_ok=True)
    server = DNSOrigin(host)
    server.addresses = tuple(addresses)
    return server.start()


class Device:
    """One phone: a namespace linked to the server and the origin, running a real proxy."""

    def __init__(
        self, world, name, index, kind="http", username=None, password=None, link_with=None, max_clients=200, hosts=None
    ):
        if kind not in PORTS:
            raise ValueError("device kind must be one of %s" % sorted(PORTS))
        if kind == "socks5" and username:
            # danted's username method checks system accounts; the lab creates none.
            raise ValueError("the lab's dante device runs without authentication")
        self.name = name
        self.kind = kind
        self.username = username
        self.password = password
        self.max_clients = max_clients  # tinyproxy's MaxClients: beyond it, connections wait in its backlog
        self.port = PORTS[kind]
        net = 255 - index
        self.server_ip = "192.168.%d.1" % net
        self.ip = "192.168.%d.2" % net
        self.origin_ip = str(ORIGIN_NET.network_address + 2 + index)
        self.directory = os.path.join(world.directory, "device-%s" % name)
        os.makedirs(self.directory, exist_ok=True)
        self.config_path = os.path.join(self.directory, "tinyproxy.conf" if kind == "http" else "danted.conf")
        self.log_path = os.path.join(self.directory, "%s.log" % ("tinyproxy" if kind == "http" else "danted"))
        self.stdout_path = os.path.join(self.directory, "stdout.txt")
        self.proc = None
        self.ns = Namespace("dev", hosts={ORIGIN_NAME: ORIGIN_IP, IPIFY_NAME: ORIGIN_IP, **(hosts or {})})
        try:
            self.ns.run("sysctl", "-qw", "net.ipv4.ip_forward=0")
            # ``link_with``: same signature as netns.link, e.g. tests.lab.wan.WanLink.link (emulated WAN)
            (link_with or link)(world.server_ns, self.server_ip, self.ns, self.ip)
            world.origin.attach(self.ns, self.origin_ip)
            self.ns.run("ip", "route", "replace", "default", "via", ORIGIN_SIDE)  # a phone reaches the internet
            with open(self.config_path, "w") as f:
                f.write(self.config_text())
        except BaseException:
            self.ns.destroy()
            raise

    @property
    def url(self):
        """The upstream URL for users.yaml (``http://user:pass@ip:8080`` or ``socks5://ip:1080``)."""
        auth = "%s:%s@" % (self.username, self.password) if self.username else ""
        return "%s://%s%s:%d" % (self.kind, auth, self.ip, self.port)

    def config_text(self):
        if self.kind == "http":
            lines = [
                "# pocketproxy lab device %s (tinyproxy; no ConnectPort lines: CONNECT to every port)" % self.name,
                "Port %d" % self.port,
                "Listen %s" % self.ip,
                "Timeout 600",
                'LogFile "%s"' % self.log_path,
                "LogLevel Info",
                "MaxClients %d" % self.max_clients,
                "Allow %s" % self.server_ip,
                "DisableViaHeader Yes",
            ]
            if self.username:
                lines.append("BasicAuth %s %s" % (self.username, self.password))
        else:
            lines = [
                "# pocketproxy lab device %s (dante SOCKS5, no authentication)" % self.name,
                "logoutput: %s" % self.log_path,
                "internal: %s port = %d" % (self.ip, self.port),
                "external: %s" % self.origin_ip,
                "socksmethod: none",
                "clientmethod: none",
                "user.privileged: root",
                "user.unprivileged: nobody",
                "client pass {\n  from: %s/32 to: 0.0.0.0/0\n  log: connect error\n}" % self.server_ip,
                "socks pass {\n  from: %s/32 to: 0.0.0.0/0\n  command: connect\n  log: connect error\n}"
                % self.server_ip,
                "socks block {\n  from: 0.0.0.0/0 to: 0.0.0.0/0\n  log: connect error\n}",
            ]
        return "\n".join(lines) + "\n"

    def argv(self):
        if self.kind == "http":
            return [TINYPROXY, "-d", "-c", self.config_path]
        return [DANTED, "-f", self.config_path, "-N", "2"]

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout=15):
        """Start the proxy (foreground) and wait until it listens."""
        if self.running:
            return self
        with open(self.stdout_path, "ab") as out:
            self.proc = self.ns.popen(self.argv(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        what = "%s proxy of device %s" % (self.kind, self.name)
        _wait_listening(self.ns, self.ip, self.port, self.proc, timeout, what)
        return self

    def stop(self):
        """Stop the proxy by PID (SIGTERM, then SIGKILL); the device's address stays up."""
        if self.proc is None:
            return None
        return self.ns.stop(self.proc, timeout=5)

    def log_text(self):
        return read_log(self.log_path)

    def log_mark(self):
        return len(self.log_text())

    def wait_log(self, regex, timeout=10, since=0):
        """Wait for ``regex`` in the proxy's log after offset ``since``; returns the match."""
        return wait_log(self.log_path, regex, timeout, since)


class World:
    """Devices and an origin attached to ``server_ns``, the origin on ``internet`` (a
    :class:`tests.lab.internet.Internet`, normally ``lab.internet``); a context manager that
    always tears down."""

    def __init__(self, server_ns, directory, internet):
        self.server_ns = server_ns
        self.directory = str(directory)
        self.internet = internet
        os.makedirs(self.directory, exist_ok=True)
        self.devices = {}
        self.origin = None
        self.dns = None
        try:
            self.origin = Origin(self.directory, internet)
            self.origin.start()
            self.dns = DNSOrigin(self.origin).start()  # 1.1.1.1 answers from the start, as on the internet
        except BaseException:
            self.close()
            raise

    def add_device(self, name, kind="http", username=None, password=None, start=True, link_with=None, **options):
        """A new device namespace (next free subnet) running its proxy unless ``start=False``.

        ``link_with``: how the server reaches the device, ``netns.link`` (a veth) by default;
        ``options``: ``max_clients`` (tinyproxy's MaxClients, 200), ``hosts`` (extra
        ``{name: address}`` lines for the phone's /etc/hosts, i.e. what the phone resolves)."""
        if len(self.devices) >= 8:
            raise ValueError("too many lab devices")
        device = Device(self, name, len(self.devices), kind, username, password, link_with, **options)
        self.devices[name] = device
        if start:
            device.start()
        return device

    def start_dns(self, ttl=300, negative_ttl=30, doh_port=None, doh_idle_timeout=None):
        """The origin's DNS server (:class:`DNSOrigin`, zone ``test.``), which every world runs from
        the start (it is the internet's ``1.1.1.1`` too). Asked for other TTLs, or for DoH (e.g.
        ``doh_port=8443``: also DNS over HTTPS at its ``doh_url``) with other settings than it runs
        with, it is restarted with them (the query log stays); otherwise the running one is returned."""
        d = self.dns
        same_ttls = (d.ttl, d.negative_ttl) == (ttl, negative_ttl)
        same_doh = doh_port is None or (d.doh_port, d.doh_idle_timeout) == (doh_port, doh_idle_timeout)
        if d.running and same_ttls and same_doh:
            return d
        d.stop()
        self.dns = DNSOrigin(
            self.origin, ttl=ttl, negative_ttl=negative_ttl, doh_port=doh_port, doh_idle_timeout=doh_idle_timeout
        ).start()
        return self.dns

    def server_reaches_origin(self):
        """True: the server namespace has a route to the origin (its uplink), as a real server
        does. What the origin logs, not unreachability, proves which path a flow took."""
        return route_error(self.server_ns, ORIGIN_IP) is None

    def phone_addresses(self):
        """The origin-side addresses of every device: the only sources the origin may ever log."""
        return {device.origin_ip for device in self.devices.values()}

    def origin_sources(self):
        """Every source address the origin's services and DNS server have logged so far."""
        sources = set(self.origin.sources())
        if self.dns is not None:
            sources |= {q.source for q in self.dns.queries()} | set(self.dns.doh_connections())
        return sources

    def logs(self, lines=30):
        parts = []
        if self.origin is not None:
            parts.append("==== origin ====\n" + "\n".join(self.origin.log_text().splitlines()[-lines:]))
        if self.dns is not None:
            parts.append("==== origin DNS queries ====\n" + "\n".join(self.dns.log_lines()[-lines:]))
        for device in self.devices.values():
            tail = "\n".join(device.log_text().splitlines()[-lines:])
            parts.append("==== device %s (%s) ====\n%s" % (device.name, device.kind, tail))
        return "\n".join(parts)

    def close(self):
        """Stop every process by PID and delete the device and origin namespaces. Safe twice."""
        errors = []
        for device in reversed(list(self.devices.values())):
            try:
                device.ns.destroy()
            except Exception as e:
                errors.append(e)
        self.devices = {}
        if self.dns is not None:
            try:
                self.dns.stop()
            except Exception as e:
                errors.append(e)
            self.dns = None
        if self.origin is not None:
            try:
                self.origin.ns.destroy()
            except Exception as e:
                errors.append(e)
            self.origin = None
        if errors:
            raise errors[0]

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            try:
                print(self.logs())
            except Exception:
                pass
        self.close()
