"""Helpers several integration test modules share (not tests): talking to a real daemon's admin
socket and metrics endpoint, reading the lab's ipset, and the DNS modules' environment.

The shared pytest fixtures (``lab``, ``admin_path``, ``resolv_conf``) are in
``tests/integration/conftest.py``; netclient probes and the recording :class:`Listener` are in
``tests/lab/probes.py``.
"""

import ipaddress
import json
import socket
import sys
from dataclasses import dataclass

from tests.lab.daemon import Daemon
from tests.lab.openvpn import Lab
from tests.lab.prometheus import parse, value
from tests.lab.world import World

IPSET = "pocketproxy-clients"
METRICS_PORT = 9105  # metrics.listen by default: tcp:9105 on the server namespace's loopback
_SCRAPE = (
    "import sys, urllib.request\n"
    "sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:%d/metrics', timeout=10).read().decode())\n"
    % METRICS_PORT
)


class AdminClient:
    """A blocking admin-socket client with a deadline on every read."""

    def __init__(self, path, timeout=20):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buffer = b""
        self.banner = self._line() + b"\r\n"

    def _line(self):
        while b"\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("admin socket closed; pending %r" % self.buffer)
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def single(self, command):
        self.sock.sendall(command.encode() + b"\n")
        return self._line().decode()

    def multi(self, command):
        self.sock.sendall(command.encode() + b"\n")
        lines = []
        while True:
            line = self._line().decode()
            lines.append(line)
            if line == "END" or (len(lines) == 1 and line.startswith("ERROR:")):
                return lines

    def close(self):
        self.sock.close()


def pp_json(admin_path, verb):
    """``pp <verb> --json`` from the admin socket, parsed."""
    admin = AdminClient(admin_path)
    try:
        lines = admin.multi("pp %s --json" % verb)
    finally:
        admin.close()
    assert lines[-1] == "END", lines
    return json.loads(lines[0])


def pp_stats(admin_path):
    """``pp stats --json`` from the admin socket, parsed."""
    return pp_json(admin_path, "stats")


def members(lab):
    """The addresses in the server namespace's ``pocketproxy-clients`` ipset."""
    out = lab.server_ns.run("ipset", "list", IPSET).stdout
    return {ipaddress.IPv4Address(line.strip()) for line in out.split("Members:")[1].split()} if "Members:" in out else set()


def scrape(lab):
    """The daemon's /metrics (it listens on the server namespace's loopback), strictly parsed."""
    return parse(lab.server_ns.run(sys.executable, "-c", _SCRAPE, timeout=30).stdout)


def sample(families, name, **labels):
    """The one sample of ``name`` with exactly ``labels`` in a :func:`scrape`."""
    return value(families, name, **labels)


@dataclass
class DNSEnv:
    """The DNS modules' lab (``test_dns.py``, ``test_dns_doh.py``): OpenVPN, the world, the
    daemon, alice's phone, the origin's DNS server (:class:`tests.lab.world.DNSOrigin`), alice,
    and the admin socket (None when the module runs without one)."""

    lab: Lab
    world: World
    daemon: Daemon
    phone: object
    dns: object
    alice: object
    admin_path: str

    def logs(self):
        return "%s\n%s\n==== pocketproxy ====\n%s" % (self.lab.logs(20), self.world.logs(20), self.daemon.tail(60))

    def stats(self):
        """``pp stats --json`` ["dns"] from the admin socket."""
        return pp_stats(self.admin_path)["dns"]
