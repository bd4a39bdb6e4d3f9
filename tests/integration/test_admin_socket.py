"""The admin socket of the real daemon, against a real OpenVPN 2.6 server and clients.

Root only: the lab (namespaces, OpenVPN, ipset/iptables) and twistd pocketproxy
with ``admin.socket`` set. Every wait is bounded.
"""

import ipaddress
import os
import shutil
import socket
import stat
import tempfile
import time

import pytest

from tests.lab.daemon import Daemon
from tests.lab.netns import require_root, wait_for
from tests.lab.openvpn import Lab

IPSET = "pocketproxy-clients"
USERS = {"alice": {"password": "alice-pw"}, "bob": {"password": "bob-pw"}}
BANNER = b">INFO:pocketproxy admin interface version 1 -- type 'help' for more info\r\n"


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


@pytest.fixture
def lab(tmp_path):
    require_root()
    with Lab(tmp_path / "lab") as lab:
        yield lab


@pytest.fixture
def admin_path():
    directory = tempfile.mkdtemp(prefix="ppadm-")  # unix socket paths must stay short
    yield os.path.join(directory, "admin.sock")
    shutil.rmtree(directory, ignore_errors=True)


def members(lab):
    out = lab.server_ns.run("ipset", "list", IPSET).stdout
    return {ipaddress.IPv4Address(line.strip()) for line in out.split("Members:")[1].split()} if "Members:" in out else set()


def test_admin_socket_against_real_openvpn(lab, tmp_path, admin_path):
    """Banner, status 3 passthrough, rules check drift, kick, drain TEMP deny, quit, socket removed at stop."""
    daemon = Daemon(
        lab.server_ns,
        tmp_path / "daemon",
        lab.server.mgmt_socket,
        USERS,
        admin={"socket": admin_path, "mode": "0660"},
        openvpn={"temp_backoff": 2},
    )
    daemon.start()
    daemon.wait_log(r"reconciled with OpenVPN", timeout=20)
    daemon.wait_log(r"admin socket listening on", timeout=10)
    assert stat.S_ISSOCK(os.stat(admin_path).st_mode) and (os.stat(admin_path).st_mode & 0o777) == 0o660

    alice = lab.add_client("alice", username="alice", password="alice-pw")
    alice.wait_connected(timeout=20)
    ip = ipaddress.IPv4Address(alice.vpn_ip())

    admin = AdminClient(admin_path)
    other = AdminClient(admin_path)  # several admin clients at once
    assert admin.banner == BANNER and other.banner == BANNER

    # status 3 from the real OpenVPN, relayed to the end.
    status = admin.multi("status 3")
    assert status[0].startswith("TITLE\tOpenVPN 2.6") and status[-1] == "END"
    rows = [line.split("\t") for line in status if line.startswith("CLIENT_LIST\t")]
    assert len(rows) == 1 and rows[0][3] == str(ip) and rows[0][9] == "alice", status
    assert other.single("pid") == "SUCCESS: pid=%d" % lab.server.pid
    assert other.single("load-stats").startswith("SUCCESS: nclients=1,")
    assert admin.single("client-deny 0 1 no") == "ERROR: command not allowed"
    assert admin.single("signal SIGTERM") == "ERROR: command not allowed"
    clients = admin.multi("pp clients")
    assert clients[1].startswith("CLIENT\talice\t") and "\t%s\tphone\t" % ip in clients[1] and clients[-1] == "END"

    # rules check: ok, then an admitted member removed behind pocketproxy's back.
    assert admin.single("pp rules check") == "SUCCESS: firewall ok"
    lab.server_ns.run("ipset", "del", IPSET, str(ip))
    assert admin.single("pp rules check") == "ERROR: drift: 1 missing member(s): %s" % ip

    # kick: the real client is disconnected (it reconnects on its own: RESTART).
    mark, a_mark = daemon.log_mark(), alice.log_mark()
    assert admin.single("pp kick alice") == "SUCCESS: kicked 1 session(s) of alice"
    daemon.wait_log(r"disconnected user alice cid \d+ vpn_ip %s" % ip, timeout=20, since=mark)
    alice.wait_log(r"SIGUSR1\[soft,server-pushed-connection-reset\]", timeout=20, since=a_mark)
    alice.wait_connected(timeout=30, since=a_mark)

    # drain: a new client's CONNECT is denied with TEMP; after drain off it is admitted.
    assert admin.single("pp drain on") == "SUCCESS: drain=on"
    mark = daemon.log_mark()
    bob = lab.add_client("bob", username="bob", password="bob-pw")
    daemon.wait_log(r"denied cid \d+ user bob: draining: new admissions paused \(temporary\)", timeout=20, since=mark)
    bob.wait_log(r"AUTH_FAILED,TEMP\[backoff 2,advance no\]", timeout=20)
    assert admin.single("pp drain off") == "SUCCESS: drain=off"
    bob.wait_connected(timeout=40)
    wait_for(lambda: ipaddress.IPv4Address(bob.vpn_ip() or "0.0.0.0") in members(lab), 10, what="bob's member")

    # quit closes only the admin session.
    admin.sock.sendall(b"quit\n")
    deadline = time.monotonic() + 10
    while admin.sock.recv(100) and time.monotonic() < deadline:
        pass
    assert other.single("pid").startswith("SUCCESS: pid=")
    other.close()
    admin.close()

    daemon.stop()
    assert not os.path.exists(admin_path), "admin socket left behind at stop"
    assert "alice-pw" not in daemon.log_text() and "bob-pw" not in daemon.log_text()
