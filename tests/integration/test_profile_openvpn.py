"""The shipped OpenVPN server config and ``pocketproxyctl client-config`` profiles, for real.

OpenVPN 2.6 runs ``conf/openvpn/server.conf`` with only the lab's paths swapped in
(PKI files, management socket, log) and without ``management-client-user/-group``:
here the daemon runs as root from the checkout, and there may be no pocketproxy user
(``tests/package/smoke.py`` runs the installed daemon as that user with the peer check
on). The clients run nothing but profiles printed by ``pocketproxyctl client-config``
(their ``auth-user-pass`` line pointed at a file): a password user and a
certificate-only user are admitted by the daemon, and the password user's TCP fetch
reaches the origin through the phone.
"""

import ipaddress
import json
import os
import sys

from tests.lab.daemon import Daemon
from tests.lab.netns import require_root, require_tools
from tests.lab.openvpn import OPENVPN, VPN_SUBNET, Lab
from tests.lab.world import ORIGIN_IP, TINYPROXY, World
from tests.package.shipped import PEER_CHECK, SOURCE_SERVER_CONF, add_profile_client, install_shipped_server
from tests.package.shipped import profiles as shipped_profiles

NETCLIENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lab", "netclient.py")


def test_shipped_server_config_admits_generated_profiles(tmp_path):
    """Password and certificate-only users connect with generated profiles to the shipped server config,
    get addresses pushed by pocketproxy, and the password user's fetch leaves through the phone."""
    require_root()
    require_tools(OPENVPN, TINYPROXY, "openssl")
    with Lab(tmp_path / "lab", start_server=False) as lab, World(lab.server_ns, tmp_path / "world", lab.internet) as world:
        server = install_shipped_server(lab, SOURCE_SERVER_CONF, lab.server.mgmt_socket, drop=PEER_CHECK)
        config_text = open(server.config_path).read()
        assert "server 10.9.0.0 255.255.255.0 nopool" in config_text and "management-client-auth" in config_text
        phone = world.add_device("phone", username="dev", password="devpw")
        users = {"alice": {"password": "alice-pw"}, "carol": {"cn": "carol"}}
        daemon = Daemon(
            lab.server_ns, tmp_path / "daemon", server.mgmt_socket, users,
            devices={"phone": phone.url},
        ).start()
        try:
            daemon.wait_log(r"reconciled with OpenVPN", timeout=30)
            profiles = shipped_profiles(daemon.config_path, ("alice", "carol"), lab.pki)
            assert "auth-user-pass" in profiles["alice"].splitlines()
            assert "auth-user-pass" not in profiles["carol"].splitlines()

            alice = add_profile_client(lab, "alice", profiles["alice"], "alice", "alice-pw")
            carol = add_profile_client(lab, "carol", profiles["carol"])
            ips = {"alice": alice.wait_connected(timeout=40), "carol": carol.wait_connected(timeout=40)}
            for name, ip in ips.items():
                assert ip is not None and ip != server.vpn_ip, (name, ip)
                daemon.wait_log(r"admitted user %s cid \d+ vpn_ip %s" % (name, ip.replace(".", r"\.")), timeout=10)
            assert len(set(ips.values())) == 2
            assert all(ipaddress.IPv4Address(ip) in VPN_SUBNET for ip in ips.values())

            out = alice.ns.run(sys.executable, NETCLIENT, "--timeout", "15", "fetch", "http://%s/whoami" % ORIGIN_IP, check=False)
            assert out.returncode == 0, out.stderr
            assert json.loads(out.stdout)["body"].strip() == phone.origin_ip
        except BaseException:
            print("==== pocketproxy ====\n%s" % daemon.tail(60))
            raise
        finally:
            daemon.stop()
