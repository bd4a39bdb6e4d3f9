"""Live reload of the users file in the real daemon: SIGHUP and ``pp reload``, real OpenVPN clients.

Root only: the lab (namespaces, OpenVPN 2.6, ipset/iptables) and twistd
pocketproxy. Every wait is bounded. The ``lab`` and ``admin_path`` fixtures are in
``tests/integration/conftest.py``.
"""

import ipaddress
import os
import re
import signal

import yaml

from tests.integration.helpers import AdminClient, members
from tests.lab.daemon import DEFAULT_DEVICES, Daemon
from tests.lab.netns import wait_for

USERS = {"alice": {"password": "alice-pw"}, "bob": {"password": "bob-pw"}}
DEVICES = dict(DEFAULT_DEVICES, phone2="http://192.168.255.3:8080")


def test_sighup_kicks_removed_and_remaps_changed_users(lab, tmp_path, admin_path):
    """SIGHUP: bob (removed) is disconnected for real, alice (device changed) stays and is remapped; a bad file is refused."""
    daemon = Daemon(
        lab.server_ns, tmp_path / "daemon", lab.server.mgmt_socket, USERS, devices=DEVICES, admin={"socket": admin_path}
    )
    daemon.start()
    daemon.wait_log(r"reconciled with OpenVPN", timeout=20)
    alice = lab.add_client("alice", username="alice", password="alice-pw")
    bob = lab.add_client("bob", username="bob", password="bob-pw")
    alice_ip = ipaddress.IPv4Address(alice.wait_connected(timeout=30))
    bob_ip = ipaddress.IPv4Address(bob.wait_connected(timeout=30))
    wait_for(lambda: {alice_ip, bob_ip} <= members(lab), 10, what="both members")

    # Edit the users file in place (same hashes): bob removed, alice moved to phone2.
    users = yaml.safe_load(daemon.users_path.read_text())
    del users["users"]["bob"]
    users["users"]["alice"]["device"] = "phone2"
    daemon.users_path.write_text(yaml.safe_dump(users))

    mark, a_mark, b_mark = daemon.log_mark(), alice.log_mark(), bob.log_mark()
    os.kill(daemon.proc.pid, signal.SIGHUP)  # the twistd process itself (ip netns exec execs it)
    daemon.wait_log(
        r"reloaded users file \S+: 1 users \(added 0, removed 1, changed 1, kicked 1, remapped 1\)", timeout=20, since=mark
    )
    daemon.wait_log(r"remapped user alice cid \d+ vpn_ip %s to device phone2" % re.escape(str(alice_ip)), 5, since=mark)
    daemon.wait_log(r"reload: kicking user bob cid \d+ vpn_ip %s: user removed" % re.escape(str(bob_ip)), 5, since=mark)
    bob.wait_log(r"SIGUSR1\[soft,server-pushed-connection-reset\]", timeout=20, since=b_mark)
    daemon.wait_log(r"denied cid \d+ user bob: unknown user 'bob' \(final\)", timeout=30, since=mark)
    wait_for(lambda: bob_ip not in members(lab), 10, what="bob's member gone")
    assert alice_ip in members(lab)
    assert "server-pushed-connection-reset" not in alice.log_text()[a_mark:]

    admin = AdminClient(admin_path)
    clients = admin.multi("pp clients")
    rows = [line.split("\t") for line in clients if line.startswith("CLIENT\t")]
    assert [(r[1], r[3], r[4]) for r in rows] == [("alice", str(alice_ip), "phone2")], clients

    # A bad file: refused by SIGHUP and by pp reload; alice and her mapping stay.
    daemon.users_path.write_text(daemon.users_path.read_text().replace("device: phone2", "device: nosuch"))
    mark = daemon.log_mark()
    os.kill(daemon.proc.pid, signal.SIGHUP)
    daemon.wait_log(
        r"reload refused: %s: users\.alice\.device: no such device 'nosuch'; previous users stay in force"
        % re.escape(str(daemon.users_path)),
        timeout=20,
        since=mark,
    )
    assert admin.single("pp reload") == (
        "ERROR: reload refused: %s: users.alice.device: no such device 'nosuch'; previous users stay in force"
        % daemon.users_path
    )
    rows = [line.split("\t") for line in admin.multi("pp clients") if line.startswith("CLIENT\t")]
    assert [(r[1], r[4]) for r in rows] == [("alice", "phone2")]
    assert alice_ip in members(lab)
    admin.close()

    daemon.stop()
    assert "alice-pw" not in daemon.log_text() and "bob-pw" not in daemon.log_text()
