"""Admin socket clients over StringTransport on the controller world, and the helpers the
admin, reload and verify tests share."""

from twisted.internet.testing import StringTransport

from ovpnmgr.admin import AdminFactory
from tests.unit.controller_world import World
from tests.unit.firewall_listings import healthy_runner

class Admin:
    """One admin client on a StringTransport."""

    def __init__(self, factory):
        self.protocol = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def send(self, *lines):
        """Send lines in one read; return what came back since the last call."""
        self.transport.clear()
        self.protocol.dataReceived(b"".join(line.encode() + b"\n" for line in lines))
        return self.transport.value()

    def take(self):
        value = self.transport.value()
        self.transport.clear()
        return value


class Fake:
    """A live proxied connection for MappingTable.register."""

    def abortConnection(self):
        pass


def world(stats=None):
    w = World()
    w.factory = AdminFactory(w.ops, stats)
    return w


def admit(w, cid, user="alice", at=100):
    """Play CONNECT → ADDRESS → ESTABLISHED for ``user``; return the address."""
    w.clock.advance(at - w.clock.seconds())
    w.connect(cid, user=user)
    session = w.controller.sessions[(w.controller.epoch, cid)]
    w.script.notify_address(cid, str(session.address))
    w.script.notify_established(cid, {"ifconfig_pool_remote_ip": str(session.address)})
    return session.address


def crlf(*lines):
    return b"".join(line.encode() + b"\r\n" for line in lines)


def rules_world():
    w = world()
    runner = healthy_runner()
    w.firewall._runner = runner
    w.firewall.ipv6 = True  # the same on a host without IPv6
    return w, runner


def _parse(tmp_path, group):
    from ovpnmgr.config import parse_config

    (tmp_path / "users.yaml").write_text("devices: {}\nusers: {}\n")
    return parse_config(CONFIG_TEXT % group, tmp_path / "pocketproxy.yaml")


CONFIG_TEXT = """
openvpn: {management: "unix:/run/x.sock", subnet: 10.9.0.0/24, server_address: 10.9.0.1}
directory: {file: users.yaml}
admin: {socket: /run/pocketproxy/admin.sock, mode: "0640", group: %s}
"""
