"""The daemon against a real OpenVPN 2.6 server and client, real ipset/iptables, in namespaces.

Each test builds a lab (server namespace with OpenVPN and pocketproxy under
twistd; one namespace per client), asserts on what the kernel, OpenVPN and the
daemon really did, and tears everything down.
"""

import ipaddress
import re

import pytest

from tests.lab.daemon import Daemon
from tests.lab.netns import require_root, wait_for
from tests.lab.openvpn import Lab

IPSET = "pocketproxy-clients"
USERS = {
    "alice": {"password": "alice-pw"},
    "bob": {"password": "bob-pw"},
    "carol": {"password": "carol-pw", "address": "10.9.0.77"},
}


@pytest.fixture
def lab(tmp_path):
    require_root()
    with Lab(tmp_path / "lab") as lab:
        yield lab


def start_daemon(lab, tmp_path, users=USERS, wait=True, **sections):
    daemon = Daemon(lab.server_ns, tmp_path / "daemon", lab.server.mgmt_socket, users, **sections)
    daemon.start()
    if wait:
        daemon.wait_log(r"reconciled with OpenVPN", timeout=20)
    return daemon


def members(lab):
    out = lab.server_ns.run("ipset", "list", IPSET).stdout
    return {ipaddress.IPv4Address(line.strip()) for line in out.split("Members:")[1].split()} if "Members:" in out else set()


def test_admitted_only_after_ipset_member_and_rules(lab, tmp_path):
    """(a) A real client is admitted; its address was in the ipset before client-auth was sent."""
    daemon = start_daemon(lab, tmp_path)
    nat = lab.server_ns.run("iptables", "-t", "nat", "-S", "PREROUTING").stdout.splitlines()
    assert nat[1] == "-A PREROUTING -i tun+ -j POCKETPROXY", nat
    alice = lab.add_client("alice", username="alice", password="alice-pw")
    alice.wait_connected(timeout=20)
    ip = ipaddress.IPv4Address(alice.vpn_ip())
    assert ip in lab.server.subnet and ip != ipaddress.IPv4Address("10.9.0.1")
    assert members(lab) == {ip}
    log = daemon.log_text()
    added = re.search(r"ipset member added %s for cid (\d+) user alice" % re.escape(str(ip)), log)
    assert added, log
    sent = re.search(r"client-auth sent for cid %s kid \d+ user alice vpn_ip %s" % (added.group(1), re.escape(str(ip))), log)
    assert sent, log
    assert added.start() < sent.start(), "client-auth was written before the ipset member was added"
    daemon.wait_log(r"admitted user alice cid %s vpn_ip %s device phone" % (added.group(1), re.escape(str(ip))))
    assert alice.ping(lab.server.vpn_ip), "tunnel does not carry traffic after admission"
    assert "alice-pw" not in log


def test_ipset_failure_denies_temporarily_and_leaves_nothing(lab, tmp_path):
    """(b) The kernel refuses the ipset add (set full): TEMP deny, nothing left; admitted once space frees."""
    daemon = start_daemon(lab, tmp_path, firewall={"maxelem": 1}, openvpn={"temp_backoff": 2})
    lab.server_ns.run("ipset", "add", IPSET, "10.9.0.250")
    alice = lab.add_client("alice", username="alice", password="alice-pw")
    daemon.wait_log(r"denied cid \d+ user alice: .*(full|FirewallError).* \(temporary\)", timeout=20)
    alice.wait_log(r"AUTH_FAILED,TEMP\[backoff 2,advance no\]", timeout=20)
    assert members(lab) == {ipaddress.IPv4Address("10.9.0.250")}
    mark = daemon.log_mark()
    lab.server_ns.run("ipset", "del", IPSET, "10.9.0.250")
    alice.wait_connected(timeout=30)
    daemon.wait_log(r"admitted user alice", since=mark)
    assert members(lab) == {ipaddress.IPv4Address(alice.vpn_ip())}


def test_wrong_password_is_denied_plainly(lab, tmp_path):
    """(c) Wrong password: a final deny, the client sees AUTH_FAILED, the kernel set stays empty."""
    daemon = start_daemon(lab, tmp_path)
    mallory = lab.add_client("alice", username="alice", password="not-alices")
    daemon.wait_log(r"denied cid \d+ user alice: wrong password for user alice \(final\)", timeout=20)
    mallory.wait_log(r"AUTH_FAILED", timeout=20)
    assert "TEMP" not in mallory.log_text().split("AUTH_FAILED", 1)[1].splitlines()[0]
    assert members(lab) == set()
    assert "not-alices" not in daemon.log_text()


def test_sigkill_and_restart_keeps_clients_and_rebuilds_state(lab, tmp_path):
    """(d) pocketproxy SIGKILLed and restarted: clients stay connected; members and mappings rebuilt, stale evicted."""
    daemon = start_daemon(lab, tmp_path)
    alice = lab.add_client("alice", username="alice", password="alice-pw")
    carol = lab.add_client("carol", username="carol", password="carol-pw")
    alice.wait_connected(timeout=20)
    carol.wait_connected(timeout=20)
    a_ip, c_ip = ipaddress.IPv4Address(alice.vpn_ip()), ipaddress.IPv4Address(carol.vpn_ip())
    assert c_ip == ipaddress.IPv4Address("10.9.0.77")
    assert members(lab) == {a_ip, c_ip}
    daemon.kill()
    # Behind its back: a member vanishes and a stale one appears.
    lab.server_ns.run("ipset", "del", IPSET, str(a_ip))
    lab.server_ns.run("ipset", "add", IPSET, "10.9.0.99")
    mark = daemon.log_mark()
    daemon.start()
    daemon.wait_log(r"reconciled with OpenVPN: 2 clients \(0 pending\)", since=mark)
    assert members(lab) == {a_ip, c_ip}
    restarted = daemon.log_text()[mark:]
    assert "re-added missing ipset member %s" % a_ip in restarted
    assert "removing stale ipset member 10.9.0.99" in restarted
    assert alice.ping(lab.server.vpn_ip) and carol.ping(lab.server.vpn_ip)
    assert alice.log_text().count("Initialization Sequence Completed") == 1


def test_openvpn_sighup_starts_new_epoch_without_stale_members(lab, tmp_path):
    """(e) OpenVPN SIGHUP (CIDs restart at 0): old state evicted, clients readmitted, set equals connected clients."""
    daemon = start_daemon(lab, tmp_path)
    alice = lab.add_client("alice", username="alice", password="alice-pw")
    bob = lab.add_client("bob", username="bob", password="bob-pw")
    alice.wait_connected(timeout=20)
    bob.wait_connected(timeout=20)
    mark = daemon.log_mark()
    a_mark, b_mark = alice.log_mark(), bob.log_mark()
    lab.server.sighup()
    daemon.wait_log(r"OpenVPN is restarting \(SIGHUP\); new epoch", since=mark)
    alice.wait_connected(timeout=40, since=a_mark)
    bob.wait_connected(timeout=40, since=b_mark)
    wait_for(lambda: len(re.findall(r"admitted user (alice|bob)", daemon.log_text()[mark:])) >= 2, 20, what="readmission")
    readmitted = daemon.log_text()[mark:]
    assert re.search(r"admitted user \w+ cid 0 ", readmitted), "CIDs did not restart at 0 after SIGHUP"
    expected = {ipaddress.IPv4Address(alice.vpn_ip()), ipaddress.IPv4Address(bob.vpn_ip())}
    wait_for(lambda: members(lab) == expected, 10, what="ipset == connected clients")
    assert alice.ping(lab.server.vpn_ip) and bob.ping(lab.server.vpn_ip)


def test_management_socket_absent_at_start_retries_with_backoff(tmp_path):
    """(f) No OpenVPN yet: the daemon retries with backoff and attaches when OpenVPN appears."""
    require_root()
    with Lab(tmp_path / "lab", start_server=False) as lab:
        daemon = start_daemon(lab, tmp_path, wait=False)
        daemon.wait_log(r"cannot reach OpenVPN management .*", timeout=20)
        daemon.wait_log(r"Scheduling retry 3 to connect", timeout=20)
        assert daemon.proc.poll() is None
        lab.server.start().wait_ready()
        daemon.wait_log(r"reconciled with OpenVPN: 0 clients", timeout=20)
        alice = lab.add_client("alice", username="alice", password="alice-pw")
        alice.wait_connected(timeout=20)
        assert members(lab) == {ipaddress.IPv4Address(alice.vpn_ip())}


def test_management_password_right_and_wrong(tmp_path):
    """(g) With a management password file the daemon logs in; a wrong one is reported and retried, never admitted."""
    require_root()
    with Lab(tmp_path / "lab", mgmt_password="mgmt-secret") as lab:
        wrong = tmp_path / "wrong.pw"
        wrong.write_text("not-it\n")
        daemon = start_daemon(lab, tmp_path / "wrong", wait=False, openvpn={"password_file": str(wrong)})
        daemon.wait_log(r"management handshake failed: .*password", timeout=20)
        daemon.wait_log(r"Scheduling retry 2 to connect", timeout=20)
        assert "reconciled with OpenVPN" not in daemon.log_text()
        assert "not-it" not in daemon.log_text()
        daemon.stop()
        right = tmp_path / "right.pw"
        right.write_text("mgmt-secret\n")
        daemon = start_daemon(lab, tmp_path / "right", openvpn={"password_file": str(right)})
        alice = lab.add_client("alice", username="alice", password="alice-pw")
        alice.wait_connected(timeout=20)
        assert members(lab) == {ipaddress.IPv4Address(alice.vpn_ip())}
        assert "mgmt-secret" not in daemon.log_text()
