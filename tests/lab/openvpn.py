"""Real OpenVPN 2.6 server and clients inside lab network namespaces.

Topology built by :class:`Lab` around its :class:`tests.lab.internet.Internet` (nothing is
routed or NATed to the real uplink)::

    server ns (192.168.77.1/24, 2001:db8:77::1/64; default routes via the internet; forwards)
      openvpn server, UDP 192.168.77.1:1194, dev tunpp0, 10.9.0.1/24 (topology subnet)
      management <lab.tmpdir>/server/mgmt.sock (or /tmp/pplab-sock-*/mgmt.sock if too deep)
        │
    inet ns ── "dc" segment: the server, the underlay neighbour (customer ns, 192.168.77.2)
            ── "isp" segment: client ns i at 100.64.0.(10+i)/24 and 2001:db8:64::(10+i)/64,
               default routes (v4 and v6) via the ISP router 100.64.0.1: their own internet

Every client runs in its own namespace (one tun device and one set of routes per namespace,
so several clients never fight over routes or source addresses). Customers reach the VPN
server only through the internet, as in the world; whatever the tunnel does not carry leaves
through their ISP, where :meth:`Internet.leaked` and the origin's logs see it. The server
namespace forwards IPv4 and IPv6 (a real VPN server is a router), so only pocketproxy's own
chains stand between a customer and the server's uplink. The server has ``server 10.9.0.0
255.255.255.0 nopool`` and ``management-client-auth``: nothing is admitted and no address is
assigned unless a controller on the management socket says so.

Processes are started with ``Namespace.popen`` (``ip netns exec`` execs, so the Popen PID is
the openvpn PID) and stopped by that PID. ``Lab`` tears everything down on exit, including
when the body raised.

Run ``python3 -m tests.lab.openvpn`` as root for an interactive lab that prints its paths.
"""

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from tests.lab.internet import DC_NET, Internet, customer_address
from tests.lab.netns import Namespace, read_log, wait_for, wait_log
from tests.lab.pki import session_pki

OPENVPN = "/usr/sbin/openvpn"
UNDERLAY_NET = DC_NET  # the server's segment of the lab internet
SERVER_UNDERLAY_IP = "192.168.77.1"
SERVER_UNDERLAY_IP6 = "2001:db8:77::1"
CUSTOMER_UNDERLAY_IP = "192.168.77.2"  # a neighbour on the server's segment, not a VPN client
MAX_CLIENTS = 240  # client i gets 100.64.0.(10 + i) (tests.lab.internet.customer_address)
VPN_SUBNET = ipaddress.IPv4Network("10.9.0.0/24")
SERVER_PORT = 1194
SERVER_DEV = "tunpp0"

# "net_addr_v4_add: 10.9.0.10/24 dev tunppc0" (iproute/netlink path, verb >= 1)
_ADDR_LINE = re.compile(r"net_addr_v4_add: (\d+\.\d+\.\d+\.\d+)/(\d+) dev (\S+)")
# fallback: "PUSH: Received control message: 'PUSH_REPLY,...,ifconfig 10.9.0.10 255.255.255.0,...'"
_PUSH_IFCONFIG = re.compile(r"PUSH_REPLY,.*?ifconfig (\d+\.\d+\.\d+\.\d+) ")


class OpenVPNProcess:
    """One openvpn process in a namespace: config file, log file, pid file, start/stop by PID."""

    role = "openvpn"

    def __init__(self, ns, directory):
        self.ns = ns
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.config_path = os.path.join(directory, "openvpn.conf")
        self.log_path = os.path.join(directory, "openvpn.log")
        self.stdout_path = os.path.join(directory, "openvpn.stdout")
        self.pid_path = os.path.join(directory, "openvpn.pid")
        self.proc = None
        self.started_at = None  # time.monotonic() of the last start()

    # --- to be provided by subclasses ---

    def config_lines(self):
        raise NotImplementedError

    # --- process control ---

    def write_config(self):
        with open(self.config_path, "w") as f:
            f.write("\n".join(self.config_lines()) + "\n")

    @property
    def pid(self):
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self):
        """Write the config and start openvpn (foreground, logging to ``log_path``)."""
        if self.running:
            raise RuntimeError("%s already running (pid %d)" % (self.role, self.pid))
        self.write_config()
        with open(self.stdout_path, "ab") as out:
            self.started_at = time.monotonic()
            self.proc = self.ns.popen(
                [OPENVPN, "--config", self.config_path],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )
        return self

    def signal(self, sig):
        """Send ``sig`` to our openvpn process by PID."""
        if not self.running:
            raise RuntimeError("%s is not running" % self.role)
        os.kill(self.proc.pid, sig)

    def stop(self, timeout=10):
        """SIGTERM by PID and wait (SIGKILL after ``timeout``). Returns the exit status."""
        if self.proc is None:
            return None
        return self.ns.stop(self.proc, signal.SIGTERM, timeout=timeout)

    def kill(self):
        """SIGKILL by PID (a crash, as far as peers can tell) and reap."""
        if self.proc is None:
            return None
        return self.ns.stop(self.proc, signal.SIGKILL, timeout=5)

    # --- logs ---

    def log_text(self):
        return read_log(self.log_path)

    def log_mark(self):
        """Current log length; pass as ``since`` to only match lines written after now."""
        return len(self.log_text())

    def log_tail(self, lines=40):
        text = self.log_text()
        try:
            with open(self.stdout_path, errors="replace") as f:
                extra = f.read()
        except FileNotFoundError:
            extra = ""
        tail = "\n".join(text.splitlines()[-lines:])
        if extra.strip():
            tail += "\n[stdout/stderr]\n" + "\n".join(extra.splitlines()[-lines:])
        return tail

    def wait_log(self, regex, timeout, since=0):
        """Wait until ``regex`` matches the log (from offset ``since``); return the match.

        Fails at once if the process has exited, with the log tail in the message."""

        def exited():
            if not self.running:
                return "%s exited (status %s)" % (self.role, self.proc and self.proc.returncode)
            return None

        return wait_log(self.log_path, regex, timeout, since, exited, self.log_tail)


class OpenVPNServer(OpenVPNProcess):
    """An OpenVPN 2.6 UDP server with ``management-client-auth`` on a unix socket."""

    role = "server"

    def __init__(
        self,
        ns,
        directory,
        pki,
        address=SERVER_UNDERLAY_IP,
        port=SERVER_PORT,
        subnet=VPN_SUBNET,
        dev=SERVER_DEV,
        mgmt_socket=None,
        mgmt_password=None,
        auth_user_pass_optional=False,
        management_hold=False,
        explicit_exit_notify=False,
        extra=(),
    ):
        super().__init__(ns, directory)
        self.pki = pki
        self.address = address
        self.port = port
        self.subnet = ipaddress.IPv4Network(subnet)
        self.dev = dev
        self.mgmt_socket = mgmt_socket or os.path.join(directory, "mgmt.sock")
        if len(self.mgmt_socket.encode()) >= 100:  # sun_path is 108 bytes
            raise ValueError("management socket path too long for AF_UNIX: %s" % self.mgmt_socket)
        self.mgmt_password = mgmt_password
        self.mgmt_password_file = os.path.join(directory, "mgmt.pw") if mgmt_password else None
        self.auth_user_pass_optional = auth_user_pass_optional
        self.management_hold = management_hold
        self.explicit_exit_notify = explicit_exit_notify
        self.extra = list(extra)

    @property
    def vpn_ip(self):
        """The server's own tun address (first host of the subnet), e.g. 10.9.0.1."""
        return str(next(self.subnet.hosts()))

    @property
    def netmask(self):
        return str(self.subnet.netmask)

    def config_lines(self):
        management = "management %s unix" % self.mgmt_socket
        if self.mgmt_password_file:
            with open(self.mgmt_password_file, "w") as f:
                f.write(self.mgmt_password + "\n")
            os.chmod(self.mgmt_password_file, 0o600)
            management += " " + self.mgmt_password_file
        lines = [
            "# pocketproxy lab server (generated)",
            "proto udp",
            "local %s" % self.address,
            "port %d" % self.port,
            "dev %s" % self.dev,
            "dev-type tun",
            "topology subnet",
            "server %s %s nopool" % (self.subnet.network_address, self.netmask),
            "ca %s" % self.pki.ca_cert,
            "cert %s" % self.pki.server_cert,
            "key %s" % self.pki.server_key,
            "tls-crypt %s" % self.pki.tls_crypt_key,
            "dh none",
            "data-ciphers AES-256-GCM",
            management,
            "management-client-auth",
            "hand-window 30",
            "disable-dco",
            "keepalive 2 10",
            "verb 4",
            "log-append %s" % self.log_path,
            "writepid %s" % self.pid_path,
        ]
        if self.auth_user_pass_optional:
            lines.append("auth-user-pass-optional")
        if self.management_hold:
            lines.append("management-hold")
        if self.explicit_exit_notify:
            lines.append("explicit-exit-notify 1")
        lines.extend(self.extra)
        return lines

    def start(self):
        # A stale socket from a SIGKILLed run must not fool wait_ready().
        if not self.running and os.path.lexists(self.mgmt_socket):
            os.unlink(self.mgmt_socket)
        return super().start()

    def wait_ready(self, timeout=10):
        """Wait until the management socket exists (OpenVPN listens before the tun is up)."""
        wait_for(
            lambda: os.path.exists(self.mgmt_socket) or not self.running,
            timeout,
            what="management socket %s" % self.mgmt_socket,
        )
        if not self.running:
            raise AssertionError("server exited at start; log tail:\n%s" % self.log_tail())
        return self

    def wait_initialized(self, timeout=10, since=0):
        """Wait for 'Initialization Sequence Completed' (needs a hold release with management-hold)."""
        return self.wait_log(r"Initialization Sequence Completed", timeout, since)

    def sighup(self):
        self.signal(signal.SIGHUP)

    def restart(self, timeout=10):
        """Full process restart (SIGTERM, wait, start again): new PID, new epoch, fresh socket."""
        self.stop(timeout=timeout)
        self.start()
        return self.wait_ready()


class OpenVPNClient(OpenVPNProcess):
    """An OpenVPN 2.6 UDP client in its own namespace."""

    role = "client"

    def __init__(
        self,
        ns,
        directory,
        pki,
        name,
        remote,
        port=SERVER_PORT,
        cert_cn=None,
        username=None,
        password=None,
        dev="tunppc0",
        connect_retry=(1, 1),
        connect_retry_max=60,
        explicit_exit_notify=True,
        extra=(),
    ):
        super().__init__(ns, directory)
        self.pki = pki
        self.name = name
        self.remote = remote
        self.port = port
        self.cert_cn = cert_cn or name
        self.username = username
        self.password = password
        self.dev = dev
        # (initial, max) seconds between attempts. NB: the max also caps a server's
        # "TEMP[backoff N]" (socket_restart_pause), so raise it to observe real backoffs.
        self.connect_retry = tuple(connect_retry)
        self.connect_retry_max = connect_retry_max
        self.explicit_exit_notify = explicit_exit_notify
        self.extra = list(extra)
        self.role = "client %s" % name
        self.connected_at = None  # monotonic time wait_connected() saw the tunnel come up
        self.connect_seconds = None  # start() -> "Initialization Sequence Completed"

    def config_lines(self):
        cert, key = self.pki.client(self.cert_cn)
        lines = [
            "# pocketproxy lab client %s (generated)" % self.name,
            "client",
            "dev %s" % self.dev,
            "dev-type tun",
            "remote %s %d udp" % (self.remote, self.port),
            "nobind",
            "ca %s" % self.pki.ca_cert,
            "cert %s" % cert,
            "key %s" % key,
            "tls-crypt %s" % self.pki.tls_crypt_key,
            "remote-cert-tls server",
            "data-ciphers AES-256-GCM",
            "disable-dco",
            "connect-retry %d %d" % self.connect_retry,
            "connect-retry-max %d" % self.connect_retry_max,
            "auth-retry nointeract",
            "verb 3",
            "log-append %s" % self.log_path,
            "writepid %s" % self.pid_path,
        ]
        if self.explicit_exit_notify:
            lines.append("explicit-exit-notify 1")
        if self.username is not None:
            auth_path = os.path.join(self.directory, "auth.txt")
            with open(auth_path, "w") as f:
                f.write("%s\n%s\n" % (self.username, self.password or ""))
            os.chmod(auth_path, 0o600)
            lines.append("auth-user-pass %s" % auth_path)
        lines.extend(self.extra)
        return lines

    def start(self):
        self.connected_at = self.connect_seconds = None
        return super().start()

    def wait_connected(self, timeout=15, since=0):
        """Wait for 'Initialization Sequence Completed'; return the VPN IP (a str)."""
        self.wait_log(r"Initialization Sequence Completed", timeout, since)
        self.connected_at = time.monotonic()
        self.connect_seconds = self.connected_at - self.started_at
        ip = self._ip_from_log(since)
        return ip or self.vpn_ip()

    def wait_auth_failed(self, timeout=40, since=0):
        """Wait for the server's AUTH_FAILED; return the full control message (with reason)."""
        match = self.wait_log(r"AUTH: Received control message: (AUTH_FAILED[^\n]*)", timeout, since)
        return match.group(1).strip()

    def _ip_from_log(self, since=0):
        text = self.log_text()[since:]
        found = [m.group(1) for m in _ADDR_LINE.finditer(text) if m.group(3) == self.dev]
        if not found:
            found = [m.group(1) for m in _PUSH_IFCONFIG.finditer(text)]
        return found[-1] if found else None

    def vpn_ip(self):
        """The IPv4 address currently on the client's tun device, or None."""
        out = self.ns.run("ip", "-4", "-o", "addr", "show", "dev", self.dev, check=False).stdout
        match = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", out)
        return match.group(1) if match else None

    def ping(self, address, count=1, timeout=3):
        """ICMP echo ``address`` from the client's namespace; True if every echo was answered."""
        return icmp_ping(self.ns, address, count, timeout)


# iputils ping is not installed everywhere (it is not on the dev VM): a raw-socket echo instead.
_PING_SCRIPT = r"""
import os, select, socket, struct, sys, time
target, count, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def csum(b):
    b += b"\0" * (len(b) % 2)
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident = os.getpid() & 0xFFFF
answered = 0
for seq in range(1, count + 1):
    payload = b"pocketproxy-lab-ping"
    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    sock.sendto(struct.pack("!BBHHH", 8, 0, csum(hdr + payload), ident, seq) + payload, (target, 0))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not select.select([sock], [], [], max(0, deadline - time.monotonic()))[0]:
            break
        data, (src, _) = sock.recvfrom(65535)
        ihl = (data[0] & 0x0F) * 4
        typ, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
        if typ == 0 and rid == ident and rseq == seq and src == target:
            answered += 1
            break
print("%d/%d answered" % (answered, count))
sys.exit(0 if answered == count else 1)
"""


def icmp_ping(ns, address, count=1, timeout=3):
    """Send ``count`` ICMP echoes to ``address`` from ``ns`` (raw socket, root); True if all answered."""
    result = ns.run(
        sys.executable, "-c", _PING_SCRIPT, address, str(count), str(timeout),
        check=False, timeout=timeout * count + 10,
    )
    return result.returncode == 0


class Lab:
    """Server namespace + customer namespace + PKI + OpenVPN server; clients on demand.

    Use as a context manager (or call ``close()``); teardown always runs. Attributes the
    daemon's integration tests need: ``server_ns``, ``server`` (``mgmt_socket``, ``subnet``,
    ``vpn_ip``, ``pid``), ``customer_ns``, ``internet`` (:class:`tests.lab.internet.Internet`,
    for :class:`tests.lab.world.World` and the leak counters), ``tmpdir``, ``pki``, ``clients``.

    Timing facts (OpenVPN 2.6.14 here): a client is up 0.05-1.2 s after start when the
    controller answers at once; a stopped client's DISCONNECT arrives 4-6 s later; after a
    server SIGHUP clients notice only via ping-restart (~10 s) unless the lab is built with
    ``explicit_exit_notify=True`` (then ~3-5 s, but SIGHUP/SIGTERM handling waits 2 s).
    Clients use ``auth-retry nointeract``, which makes every restart pause 10 s, and any
    ``TEMP[backoff N]`` applies, both capped by the client's ``connect_retry`` maximum (1 s
    by default here, for fast tests).
    """

    def __init__(
        self,
        tmpdir=None,
        *,
        mgmt_password=None,
        auth_user_pass_optional=False,
        management_hold=False,
        explicit_exit_notify=False,
        server_extra=(),
        start_server=True,
        pki=None,
    ):
        self._own_tmpdir = tmpdir is None
        self.tmpdir = str(tmpdir) if tmpdir is not None else tempfile.mkdtemp(prefix="pplab-")
        self.namespaces = []
        self.clients = []
        self.server_ns = self.customer_ns = self.server = None
        self._socket_dir = None
        try:
            self.pki = pki or session_pki()
            self.internet = Internet(SERVER_UNDERLAY_IP, SERVER_UNDERLAY_IP6)
            self.namespaces.append(self.internet.ns)  # destroyed last
            self.server_ns = self._namespace("srv")
            self.internet.join(self.server_ns, "dc", SERVER_UNDERLAY_IP, SERVER_UNDERLAY_IP6)
            # A real VPN server forwards (operators turn it on for OpenVPN): only pocketproxy's
            # fail-closed chains may stand between a customer and the server's uplink.
            self.server_ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
            self.server_ns.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
            self.customer_ns = self._namespace("cus")
            self.internet.join(self.customer_ns, "dc", CUSTOMER_UNDERLAY_IP, "2001:db8:77::2")
            server_dir = os.path.join(self.tmpdir, "server")
            mgmt_socket = os.path.join(server_dir, "mgmt.sock")
            if len(mgmt_socket.encode()) >= 100:  # a deep tmpdir: keep the socket path short
                self._socket_dir = tempfile.mkdtemp(prefix="pplab-sock-")
                mgmt_socket = os.path.join(self._socket_dir, "mgmt.sock")
            self.server = OpenVPNServer(
                self.server_ns,
                server_dir,
                self.pki,
                mgmt_socket=mgmt_socket,
                mgmt_password=mgmt_password,
                auth_user_pass_optional=auth_user_pass_optional,
                management_hold=management_hold,
                explicit_exit_notify=explicit_exit_notify,
                extra=server_extra,
            )
            if start_server:
                self.server.start().wait_ready()
        except BaseException:
            self.close(print_logs=True, keep_tmpdir=True)
            raise

    def _namespace(self, role):
        ns = Namespace(role)
        self.namespaces.append(ns)
        return ns

    def add_client(self, name, username=None, password=None, cert_cn=None, start=True, **kwargs):
        """A new client in its own namespace on the customers' ISP segment, with its own IPv4 and
        IPv6 default routes (:func:`tests.lab.internet.customer_address`); started unless
        ``start=False``.

        ``cert_cn`` defaults to ``name`` (a certificate is issued on demand). Without
        ``username`` the client is certificate-only (needs ``auth_user_pass_optional``)."""
        index = len(self.clients)
        if index >= MAX_CLIENTS:
            raise ValueError("too many lab clients")
        ns = self._namespace("cli")
        self.internet.join(ns, "isp", *customer_address(index))
        client = OpenVPNClient(
            ns,
            os.path.join(self.tmpdir, "client-%s" % name),
            self.pki,
            name,
            remote=self.server.address,
            port=self.server.port,
            cert_cn=cert_cn,
            username=username,
            password=password,
            dev="tunppc%d" % index,
            **kwargs,
        )
        self.clients.append(client)
        if start:
            client.start()
        return client

    def logs(self, lines=40):
        """Tails of the server and client logs, for failure messages."""
        parts = []
        for proc in [self.server, *self.clients]:
            if proc is not None:
                parts.append("==== %s (%s) ====\n%s" % (proc.role, proc.log_path, proc.log_tail(lines)))
        return "\n".join(parts)

    def close(self, print_logs=False, keep_tmpdir=False, timeout=10):
        """Stop every process (SIGTERM by PID, SIGKILL if slow), delete namespaces and tmpdir.

        Safe to call twice. ``print_logs`` prints log tails first (pytest shows them for
        failed tests); a tmpdir the lab created itself is removed unless ``keep_tmpdir``."""
        if print_logs:
            try:
                print("==== lab tmpdir %s ====" % self.tmpdir)
                print(self.logs())
            except Exception:
                pass
        # Clients first and all at once (each takes ~1 s to send its exit notification). Then
        # the namespaces: Namespace.destroy() stops what was started in it in reverse start
        # order, so a daemon started after the server goes before OpenVPN does.
        procs = [c.proc for c in self.clients if c.running]
        for proc in procs:
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        errors = []
        for ns in reversed(self.namespaces):
            try:
                ns.destroy()
            except Exception as e:  # keep tearing down the others
                errors.append(e)
        self.namespaces = []
        if self._socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        if self._own_tmpdir and not keep_tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        if errors:
            raise errors[0]

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        failed = exc_type is not None
        self.close(print_logs=failed, keep_tmpdir=failed)


def _demo():
    """Interactive lab: prints paths, waits for Ctrl-C, tears down."""
    if os.geteuid() != 0:
        sys.exit("needs root")
    with Lab() as lab:
        print("tmpdir       ", lab.tmpdir)
        print("server ns    ", lab.server_ns.name, "pid", lab.server.pid)
        print("mgmt socket  ", lab.server.mgmt_socket)
        print("server log   ", lab.server.log_path)
        print("customer ns  ", lab.customer_ns.name)
        alice = lab.add_client("alice", username="alice", password="secret")
        print("client alice ", alice.ns.name, "log", alice.log_path)
        print("answer it, e.g.: python3 -m tests.lab.manual_controller", lab.server.mgmt_socket)
        print("Ctrl-C to tear down")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    _demo()
