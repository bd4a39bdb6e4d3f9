"""Audit lines and secrets in the real daemon's log, in text and in JSON format.

Root only: a lab OpenVPN server with a management password, a tinyproxy device
with BasicAuth, a dante device given SOCKS5 credentials it does not accept,
pocketproxy under twistd with an admin password. Clients log in with right
and wrong passwords, fetch through the devices and are kicked; then the log
must hold one structured line per admission, denial, upstream failure and
disconnect, and none of the secrets.
"""

import base64
import json
import os
import re
import shutil
import socket
import sys
import tempfile

import pytest

from tests.lab.daemon import Daemon
from tests.lab.netns import require_root, require_tools
from tests.lab.openvpn import OPENVPN, Lab
from tests.lab.world import DANTED, ORIGIN_IP, TINYPROXY, World

NETCLIENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lab", "netclient.py")
MGMT_PW = "MGMT-pw-SECRET-1"
DEVICE_PW = "DEVPW-SECRET-2"
SOCKS_PW = "SOCKSPW-SECRET-3"
ADMIN_PW = "ADMIN-pw-SECRET-4"
ADMIN_WRONG = "ADMIN-wrong-SECRET-8"
ALICE_PW = "ALICE-pw-SECRET-5"
CAROL_PW = "CAROL-pw-SECRET-6"
WRONG_PW = "WRONG-pw-SECRET-7"
SECRETS = [MGMT_PW, DEVICE_PW, SOCKS_PW, ADMIN_PW, ADMIN_WRONG, ALICE_PW, CAROL_PW, WRONG_PW]
SECRETS += [base64.b64encode(("%s:%s" % pair).encode()).decode() for pair in (("dev", DEVICE_PW), ("sockuser", SOCKS_PW))]


def fetch(client, path, timeout=20):
    out = client.ns.run(
        sys.executable, NETCLIENT, "--timeout", str(timeout), "fetch", "http://%s%s" % (ORIGIN_IP, path),
        check=False, timeout=timeout + 30,
    )
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {"stderr": out.stderr}


def admin_login(path):
    """A wrong admin password, then the right one; returns the connected socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect(path)
    buf = b""

    def until(marker):
        nonlocal buf
        while marker not in buf:
            data = sock.recv(4096)
            assert data, "admin socket closed: %r" % buf
            buf += data
        head, _, buf = buf.partition(marker)
        return head

    until(b"ENTER PASSWORD:")
    sock.sendall(ADMIN_WRONG.encode() + b"\n")
    until(b"ENTER PASSWORD:")
    sock.sendall(ADMIN_PW.encode() + b"\n")
    until(b"SUCCESS: password is correct\r\n")
    until(b"\r\n")  # banner
    sock.sendall(b"pp kick alice\n")
    assert until(b"\r\n") == b"SUCCESS: kicked 1 session(s) of alice"
    sock.close()


@pytest.fixture
def admin_dir():
    directory = tempfile.mkdtemp(prefix="pplog-")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_audit_lines_present_and_secrets_absent(tmp_path, admin_dir, log_format):
    """Admission, denial, upstream failure and disconnect each leave one line with their fields;
    no password, Proxy-Authorization token or management/admin password appears anywhere."""
    require_root()
    require_tools(OPENVPN, "ipset", "iptables", "ss", "openssl", TINYPROXY, DANTED)
    with Lab(tmp_path / "lab", mgmt_password=MGMT_PW) as lab, World(lab.server_ns, tmp_path / "world", lab.internet) as world:
        phone = world.add_device("phone", username="dev", password=DEVICE_PW)
        sock = world.add_device("sockphone", kind="socks5")
        admin_pw = os.path.join(admin_dir, "admin.pw")
        with open(admin_pw, "w") as f:
            f.write(ADMIN_PW + "\n")
        admin_path = os.path.join(admin_dir, "admin.sock")
        sections = {}
        daemon_dir = tmp_path / "daemon"
        if log_format == "json":
            sections["log"] = {"format": "json", "file": str(daemon_dir / "pocketproxy.log")}
        daemon = Daemon(
            lab.server_ns,
            daemon_dir,
            lab.server.mgmt_socket,
            {"alice": {"password": ALICE_PW, "device": "phone"}, "carol": {"password": CAROL_PW, "device": "sockphone"}},
            devices={"phone": phone.url, "sockphone": "socks5://sockuser:%s@%s:%d" % (SOCKS_PW, sock.ip, sock.port)},
            openvpn={"password_file": lab.server.mgmt_password_file},
            proxy={"bind": ["0.0.0.0"]},
            admin={"socket": admin_path, "password_file": admin_pw},
            **sections,
        ).start()
        daemon.wait_log(r"reconciled with OpenVPN", timeout=30)

        alice = lab.add_client("alice", username="alice", password=ALICE_PW)
        carol = lab.add_client("carol", username="carol", password=CAROL_PW)
        alice.wait_connected(timeout=30)
        carol.wait_connected(timeout=30)
        mallory = lab.add_client("mallory", username="alice", password=WRONG_PW)
        mallory.wait_auth_failed(timeout=30)
        mallory.stop()

        assert fetch(alice, "/whoami").get("status") == 200  # Proxy-Authorization sent to tinyproxy
        assert "status" not in fetch(carol, "/whoami", timeout=10)  # dante refuses our SOCKS5 credentials
        daemon.wait_log(r"upstream failed for \S+ via socks5://sockuser:\*\*\*@", timeout=20)
        admin_login(admin_path)
        daemon.wait_log(r"disconnected user alice cid", timeout=20)
        daemon.stop()

        text = daemon.log_text()
        for extra in ("stdout.txt", "stderr.txt"):
            try:
                text += (daemon_dir / extra).read_text(errors="replace")
            except FileNotFoundError:
                pass
        leaked = [s for s in SECRETS if s in text]
        assert not leaked, "secrets in the %s log: %s" % (log_format, leaked)

        if log_format == "text":
            log = daemon.log_text()
            assert re.search(r"admitted user alice cid \d+ vpn_ip 10\.9\.0\.\d+ device phone", log)
            assert re.search(r"admitted user carol cid \d+ vpn_ip 10\.9\.0\.\d+ device sockphone", log)
            assert re.search(r"denied cid \d+ user alice: wrong password for user alice \(final\)", log)
            assert re.search(r"upstream failed for 10\.9\.0\.\d+ via socks5://sockuser:\*\*\*@\S+ to \S+: auth: ", log)
            assert re.search(r"wrong admin password \(attempt 1 of 3\)", log)
            return
        records = [json.loads(line) for line in daemon.log_text().splitlines() if line.strip()]
        assert all({"time", "level", "namespace", "message"} <= set(r) for r in records)
        by_event = {}
        for r in records:
            by_event.setdefault(r.get("event"), []).append(r)
        admitted = {}
        for r in by_event["admitted"]:
            admitted.setdefault(r["user"], r)  # the first admission (alice comes back after the kick)
        assert set(admitted) == {"alice", "carol"}
        assert admitted["carol"]["device"] == "sockphone" and admitted["alice"]["vpn_ip"].startswith("10.9.0.")
        assert isinstance(admitted["alice"]["cid"], int)
        denied = by_event["denied"][0]
        assert (denied["user"], denied["reason"], denied["kind"]) == ("alice", "wrong password for user alice", "final")
        [failed] = by_event["upstream-failed"]
        assert (failed["user"], failed["device"], failed["kind"]) == ("carol", "sockphone", "auth")
        assert failed["vpn_ip"] == admitted["carol"]["vpn_ip"] and failed["dest"].startswith(ORIGIN_IP)
        gone = [r for r in by_event["disconnected"] if r["user"] == "alice"]
        assert gone and gone[0]["vpn_ip"] == admitted["alice"]["vpn_ip"] and gone[0]["level"] == "info"
        assert records[0]["time"].endswith("Z")
