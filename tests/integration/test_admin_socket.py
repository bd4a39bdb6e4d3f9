"""The admin socket of the real daemon, against a real OpenVPN 2.6 server and clients.

Root only: the lab (namespaces, OpenVPN, ipset/iptables) and twistd pocketproxy
with ``admin.socket`` set. Every wait is bounded. The ``lab`` and ``admin_path`` fixtures
are in ``tests/integration/conftest.py``, the admin client in ``tests/integration/helpers.py``.
"""

import ipaddress
import json
import os
import stat
import subprocess
import sys
import time

import pytest

from tests.integration.helpers import IPSET, AdminClient, members, sample, scrape
from tests.lab.daemon import Daemon
from tests.lab.netns import require_root, wait_for
from tests.lab.openvpn import Lab
from tests.lab.probes import NETCLIENT, run_json

USERS = {"alice": {"password": "alice-pw"}, "bob": {"password": "bob-pw"}}
BANNER = b">INFO:pocketproxy admin interface version 1 -- type 'help' for more info\r\n"


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


def socat(admin_path, text, timeout=15):
    """What an operator's one-line probe prints: ``printf TEXT | socat - UNIX-CONNECT:PATH``
    (socat half-closes after stdin's end and exits when the daemon closes)."""
    return subprocess.run(["socat", "-t", "%d" % timeout, "-", "UNIX-CONNECT:%s" % admin_path], input=text.encode(),
                          capture_output=True, timeout=timeout + 10)


def daemon_with_alice(lab, tmp_path, admin_path):
    """The daemon with its admin socket, and alice connected through the real OpenVPN."""
    daemon = Daemon(lab.server_ns, tmp_path / "daemon", lab.server.mgmt_socket, USERS, admin={"socket": admin_path})
    daemon.start()
    daemon.wait_log(r"reconciled with OpenVPN", timeout=20)
    daemon.wait_log(r"admin socket listening on", timeout=10)
    lab.add_client("alice", username="alice", password="alice-pw").wait_connected(timeout=20)
    return daemon


def test_one_line_probes_get_every_reply_then_the_close(lab, tmp_path, admin_path):
    """printf 'status 3\\n' | socat - UNIX-CONNECT:...: the full reply of each command relayed to
    the real OpenVPN (and of pp verbs), then the connection ends cleanly, as with OpenVPN itself."""
    daemon = daemon_with_alice(lab, tmp_path, admin_path)
    for command, last in (("status 3", "END"), ("version", "END"), ("state", "END"), ("pp stats", "END")):
        started = time.monotonic()
        got = socat(admin_path, command + "\n")
        lines = got.stdout.decode().split("\r\n")
        assert got.returncode == 0 and lines[0] == BANNER.decode().strip() and lines[-2:] == [last, ""], (command, got)
        assert time.monotonic() - started < 5, "the daemon did not close after answering %r" % command
    status = socat(admin_path, "status 3\n").stdout.decode()
    assert "CLIENT_LIST\talice\t" in status and status.startswith(BANNER.decode())
    load = socat(admin_path, "load-stats\n").stdout.decode().split("\r\n")
    assert load[1].startswith("SUCCESS: nclients=1,") and load[2:] == [""], load
    several = socat(admin_path, "pid\nload-stats\nhelp\n").stdout.decode()
    assert "SUCCESS: pid=%d" % lab.server.pid in several and "SUCCESS: nclients=1," in several
    assert "pp rotate DEVICE" in several and several.endswith("END\r\n")
    daemon.stop()


def test_openvpn_monitor_reads_the_admin_socket_as_it_reads_openvpn(lab, tmp_path, admin_path):
    """openvpn-monitor 2.0.4's own collector (version, state, load-stats and status 3 on one
    connection, its parsers unmodified) against the admin socket of a daemon with a real client."""
    openvpn_monitor = pytest.importorskip(
        "openvpn_monitor", reason="openvpn-monitor is not installed here (make test-pypi installs it in its venv)")
    daemon = daemon_with_alice(lab, tmp_path, admin_path)
    here = os.path.dirname(openvpn_monitor.__file__)
    sys.path.insert(0, here)  # it imports its modules as top-level "util" and "vpns", as its app runs
    try:
        from vpns.openvpn.data_collector import VPNDataCollector
    finally:
        sys.path.remove(here)
    vpns = {"pp": {"name": "pp", "socket": admin_path}}
    VPNDataCollector(vpns, None)
    vpn = vpns["pp"]
    assert vpn["management_connection_successful"] and "error" not in vpn, vpn
    assert vpn["release"].startswith("OpenVPN 2.6") and vpn["state"]["connected"] == "CONNECTED", vpn
    assert vpn["stats"]["nclients"] == 1, vpn["stats"]
    sessions = list(vpn["sessions"].values())
    assert [x["username"] for x in sessions] == ["alice"] and sessions[0]["bytes_recv"] > 0, sessions
    daemon.stop()


# --- bytes per client, the metrics endpoint, periodic firewall repair ------------------------


@pytest.fixture
def world_lab(tmp_path):
    from tests.lab.netns import require_tools
    from tests.lab.openvpn import OPENVPN
    from tests.lab.world import TINYPROXY, World

    require_root()
    require_tools(OPENVPN, "ipset", "iptables", "ss", "openssl", TINYPROXY)
    with Lab(tmp_path / "lab") as lab, World(lab.server_ns, tmp_path / "world", lab.internet) as world:
        yield lab, world


def test_bytes_metrics_and_periodic_repair_on_a_real_daemon(world_lab, tmp_path, admin_path):
    """A real client fetches through the device: pp clients shows its tunnel and proxied bytes;
    /metrics parses strictly and counts the admission, the client, the relayed connection, bytes and
    a consistent latency histogram; an ipset member deleted behind the daemon's back is re-added by
    the periodic check, logged and counted."""
    from tests.lab.world import ORIGIN_IP

    lab, world = world_lab
    phone = world.add_device("phone", username="dev", password="devpw")
    daemon = Daemon(
        lab.server_ns,
        tmp_path / "daemon",
        lab.server.mgmt_socket,
        {"alice": {"password": "alice-pw"}},
        devices={"phone": phone.url},
        admin={"socket": admin_path},
        openvpn={"bytecount_interval": 1},
        proxy={"bind": ["0.0.0.0"]},
        firewall={"verify_interval": 1},
    ).start()
    daemon.wait_log(r"reconciled with OpenVPN", timeout=30)
    alice = lab.add_client("alice", username="alice", password="alice-pw")
    ip = ipaddress.IPv4Address(alice.wait_connected(timeout=30))
    daemon.wait_log(r"admitted user alice ", timeout=20)

    fetched = run_json(alice.ns, sys.executable, NETCLIENT, "--timeout", "20", "fetch", "http://%s/blob/100000" % ORIGIN_IP)
    assert fetched.get("status") == 200 and fetched["length"] == 100000, "%s\n%s" % (fetched, daemon.tail())

    admin = AdminClient(admin_path)
    try:

        def row():
            lines = admin.multi("pp clients --json")
            [client] = json.loads(lines[0])["clients"]
            return client

        wait_for(lambda: (row()["tunnel_bytes_out"] or 0) > 100000, 10, what="a BYTECOUNT_CLI after the fetch")
        client = row()
        assert client["vpn_ip"] == str(ip) and client["tunnel_bytes_in"] > 0
        # The relay is finished (Connection: close): its bytes stay with the client.
        assert client["proxied_bytes_down"] > 100000 and client["proxied_bytes_up"] > 0, client
        table = admin.multi("pp clients")
        assert table[0].endswith("\ttunnel_bytes_in\ttunnel_bytes_out\tproxied_bytes_up\tproxied_bytes_down\ttunnel")
    finally:
        admin.close()

    fams = scrape(lab)
    assert sample(fams, "pocketproxy_admissions_total", result="admitted") >= 1
    assert sample(fams, "pocketproxy_connected_clients") == 1
    assert sample(fams, "pocketproxy_proxy_connections_total", result="relayed") >= 1
    assert sample(fams, "pocketproxy_proxy_bytes_total", direction="down") > 100000
    assert sample(fams, "pocketproxy_proxy_bytes_total", direction="up") > 0
    buckets = [(labels["le"], v) for n, labels, v in fams["pocketproxy_admission_latency_seconds"]["samples"] if n.endswith("_bucket")]
    count = sample(fams, "pocketproxy_admission_latency_seconds_count")
    assert buckets[-1] == ("+Inf", count) and count >= 1
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    assert sample(fams, "pocketproxy_firewall_drift") == 0

    # Periodic verification: a member deleted behind our back comes back within an interval or two.
    mark = daemon.log_mark()
    lab.server_ns.run("ipset", "del", IPSET, str(ip))
    daemon.wait_log(r"firewall drift: 1 missing member\(s\): %s" % ip, timeout=10, since=mark)
    daemon.wait_log(r"re-added missing ipset member %s of user alice" % ip, timeout=10, since=mark)
    assert ip in members(lab)
    fams = scrape(lab)
    assert sample(fams, "pocketproxy_firewall_repairs_total", action="member_added") >= 1
    assert sample(fams, "pocketproxy_ipset_drift", kind="missing") == 0
    # ... and the client's traffic flows again.
    again = run_json(alice.ns, sys.executable, NETCLIENT, "--timeout", "20", "fetch", "http://%s/whoami" % ORIGIN_IP)
    assert again.get("status") == 200, again
    daemon.stop()
