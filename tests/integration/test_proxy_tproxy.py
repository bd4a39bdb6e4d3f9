"""proxy.mode: tproxy end to end: a real OpenVPN client's TCP reaches the origin through its device.

The daemon installs the mangle TPROXY chain and the fwmark policy routing
itself; the nat table gets only the two lines that intercept members' DNS.
Same lab shape as test_proxy_path, with one client and one device.
"""

import json
import os
import sys

from tests.lab.daemon import Daemon
from tests.lab.dns_origin import bench_address
from tests.lab.dnsclient import dig
from tests.lab.netns import require_root, require_tools
from tests.lab.openvpn import OPENVPN, Lab
from tests.lab.world import ORIGIN_IP, RESOLVER_IP, TINYPROXY, World

NETCLIENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lab", "netclient.py")


def test_tproxy_mode_carries_a_vpn_client_through_its_device(tmp_path):
    """In TPROXY mode the origin sees the device's address and the kernel state is mangle + policy routing."""
    require_root()
    require_tools(OPENVPN, "ipset", "iptables", TINYPROXY)
    with Lab(tmp_path / "lab") as lab, World(lab.server_ns, tmp_path / "world", lab.internet) as world:
        phone = world.add_device("phone", username="dev", password="devpw")
        dns = world.start_dns()
        daemon = Daemon(
            lab.server_ns,
            tmp_path / "daemon",
            lab.server.mgmt_socket,
            {"alice": {"password": "alice-pw", "device": "phone"}},
            devices={"phone": phone.url},
            proxy={"mode": "tproxy", "bind": ["0.0.0.0"]},
        ).start()
        try:
            daemon.wait_log(r"transparent proxy listening on 0\.0\.0\.0:12345 \(tproxy", timeout=30)
            daemon.wait_log(r"firewall installed: chain POCKETPROXY \(mangle PREROUTING", timeout=30)
            client = lab.add_client("alice", username="alice", password="alice-pw")
            client.wait_connected(timeout=30)
            daemon.wait_log(r"admitted user alice ", timeout=20)
            out = client.ns.run(
                sys.executable, NETCLIENT, "--timeout", "15", "fetch", "http://%s/whoami" % ORIGIN_IP, check=False
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            assert result.get("status") == 200, "%s\n%s" % (result, daemon.tail(60))
            assert result["body"].strip() == phone.origin_ip
            ns = lab.server_ns
            assert "-j TPROXY --on-port 12345" in ns.run("iptables", "-t", "mangle", "-S", "POCKETPROXY").stdout
            nat = [line for line in ns.run("iptables", "-t", "nat", "-S").stdout.splitlines() if "POCKETPROXY" in line]
            assert all("REDIRECT" not in line for line in nat) and sum("-j DNAT" in line for line in nat) == 2, nat
            assert "fwmark 0x1/0x1 lookup 100" in ns.run("ip", "-4", "rule", "show").stdout
            # DNS to a resolver of the client's choosing (TCP passes the mangle chain to the DNAT)
            for proto in ("udp", "tcp"):
                name = "tproxy-%s.bench.test" % proto
                mark = dns.log_mark()
                got = dig(client.ns, name, proto, server=RESOLVER_IP)
                assert got.get("answers") == [bench_address(name)], got
                query = dns.wait_query(name, timeout=5, since=mark)
                assert (query.source, query.proto) == (phone.origin_ip, "tcp"), query
        finally:
            daemon.stop()
