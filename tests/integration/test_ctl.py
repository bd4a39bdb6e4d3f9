"""pocketproxyctl against the real daemon's admin socket, with a real OpenVPN 2.6 server and client.

Root only (the netns lab). Every wait is bounded.
"""

import json
import subprocess
import sys

from tests.lab.daemon import ROOT, Daemon

USERS = {"alice": {"password": "alice-pw"}}


def ctl(*argv):
    return subprocess.run(
        [sys.executable, "-m", "ovpnmgr.ctl", *argv], cwd=str(ROOT), capture_output=True, text=True, timeout=30
    )


def test_ctl_against_the_real_daemon(lab, tmp_path, admin_path):
    """clients (table and JSON), status 3 relayed, rules check ok, drain round trip; exit 3 once stopped."""
    daemon = Daemon(lab.server_ns, tmp_path / "daemon", lab.server.mgmt_socket, USERS, admin={"socket": admin_path})
    daemon.start()
    try:
        daemon.wait_log(r"reconciled with OpenVPN", timeout=20)
        daemon.wait_log(r"admin socket listening on", timeout=10)
        alice = lab.add_client("alice", username="alice", password="alice-pw")
        alice.wait_connected(timeout=20)
        ip = alice.vpn_ip()

        proc = ctl("--socket", admin_path, "clients")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].split()[:7] == ["USER", "CID", "VPN_IP", "DEVICE", "CONNECTED_SINCE", "LIVE", "STATE"]
        assert lines[0].split()[7:] == ["TUN_IN", "TUN_OUT", "PROXY_UP", "PROXY_DOWN", "TUNNEL"]
        row = lines[1].split()
        assert row[0] == "alice" and row[2] == ip and row[3] == "phone" and row[-1] == "full", proc.stdout

        proc = ctl("--socket", admin_path, "--json", "clients")
        assert proc.returncode == 0, proc.stderr
        (client,) = json.loads(proc.stdout)["clients"]
        assert client["user"] == "alice" and client["vpn_ip"] == ip

        proc = ctl("--socket", admin_path, "--json", "status")
        assert proc.returncode == 0, proc.stderr
        status = json.loads(proc.stdout)
        assert status["title"].startswith("OpenVPN 2.6")
        assert [c["Virtual Address"] for c in status["CLIENT_LIST"]] == [ip]

        proc = ctl("--socket", admin_path, "rules", "check")
        assert (proc.returncode, proc.stdout) == (0, "rules: firewall ok\n"), proc.stderr
        assert ctl("--socket", admin_path, "drain", "on").stdout.startswith("drain: on")
        assert ctl("--socket", admin_path, "--json", "drain").stdout == '{"draining":true}\n'
        assert ctl("--socket", admin_path, "drain", "off").stdout.startswith("drain: off")
    finally:
        daemon.stop()
    proc = ctl("--socket", admin_path, "clients")
    assert proc.returncode == 3 and "not found (is pocketproxy running?" in proc.stderr
