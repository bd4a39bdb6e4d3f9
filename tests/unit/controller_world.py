"""A real Controller (and its Operations) wired to fakes and a scripted OpenVPN peer, with
helpers to play OpenVPN: the unit-level world of test_controller, test_admin, test_reload,
test_metrics, test_logs and test_verify."""

import ipaddress

from twisted.internet.task import Clock

from ovpnmgr.config import FirewallConfig, OpenVPNConfig
from ovpnmgr.controller import Controller
from ovpnmgr.directory import Directory, hash_password
from ovpnmgr.firewall import Firewall
from ovpnmgr.ipset import FakeIPSet
from ovpnmgr.operations import Operations
from ovpnmgr.pool import AddressPool
from ovpnmgr.testing import ScriptedManagement, connect_env
from proxy.mappings import MappingTable

IP = ipaddress.IPv4Address
SUBNET = ipaddress.IPv4Network("10.9.0.0/24")
HASH = hash_password("pw", n=16)
USERS = """
devices:
  p1: {upstream: "http://192.168.255.2:8080"}
  p2: {upstream: "socks5://192.168.255.3:1080"}
users:
  alice: {password: "%s", device: p1}
  bob: {password: "%s", device: p2}
  carol: {password: "%s", device: p1, address: 10.9.0.77}
  certy: {common_name: certy-cn, device: p2}
""" % (HASH, HASH, HASH)


#: What every full-tunnel OpenVPN 2.x client is pushed (ovpnmgr.tunnel), after its address.
FULL_TUNNEL = 'push "redirect-gateway def1 ipv6"\npush "block-ipv6"\npush "route net_gateway 255.255.255.255 vpn_gateway"'


def auth_block(cid, kid, address, extra=""):
    """The exact client-auth command a Linux OpenVPN 2.6 client gets."""
    return "client-auth %d %d\nifconfig-push %s 255.255.255.0\n%s\n%sEND" % (cid, kid, address, FULL_TUNNEL, extra)


class World:
    """A controller wired to fakes, plus helpers to play OpenVPN."""

    def __init__(self, users=USERS, **ovpn):
        self.clock = Clock()
        self.config = OpenVPNConfig(
            management="unix:/x", subnet=SUBNET, server_address=IP("10.9.0.1"), temp_backoff=7, **ovpn
        )
        self.directory = Directory.parse(users, "users.yaml", SUBNET, IP("10.9.0.1"))
        self.pool = AddressPool(SUBNET, "10.9.0.1", static=self.directory.static_addresses())
        self.ipset = FakeIPSet()
        self.firewall = Firewall(FirewallConfig(), 12345, SUBNET, self.ipset, runner=None)
        self.mappings = MappingTable()
        self.controller = Controller(self.clock, self.config, self.directory, self.pool, self.firewall, self.mappings)
        self.ops = Operations(self.controller)
        self.attach()

    def attach(self, status_clients=()):
        self.script = ScriptedManagement(clock=self.clock, auto_reply=True, status_clients=status_clients)
        self.attached = []
        self.controller.attach(self.script.protocol).addBoth(self.attached.append)
        self.script.connect()
        return self.script

    def commands(self, verb):
        return [c for c in self.script.sent_commands() if c.startswith(verb)]

    def connect(self, cid, kid=1, user="alice", password="pw", **env):
        self.script.notify_connect(cid, kid, connect_env(username=user, password=password, untrusted_port=str(40000 + cid), **env))

    def members(self):
        return set(self.ipset.content)
