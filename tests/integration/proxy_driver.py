"""Run the transparent proxy (and/or a CONNECT echo "device") in this process, for namespace tests.

Usage (inside a test namespace, under ``ip netns exec``)::

    python3 proxy_driver.py '{"proxy": {"port": 12345, "mappings": {"10.0.0.2": "http://127.0.0.1:9000"},
                                        "settings": {...}, "transparent": false, "nofile": 64},
                              "device": {"port": 9000}}'

Prints ``READY`` once listening. A line ``STATS`` on stdin prints a JSON
snapshot (proxy counters, device CONNECT targets); EOF on stdin stops it.
The device answers ``CONNECT`` with 200 and then echoes; targets it saw are
reported so tests can check what the proxy asked for.
"""

import json
import resource
import sys

from twisted.internet import reactor, stdio
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.basic import LineReceiver


class EchoDevice(Protocol):
    """A minimal HTTP CONNECT proxy that echoes instead of connecting (or sends a banner first)."""

    def connectionMade(self):
        self.buf = b""
        self.tunnel = False

    def dataReceived(self, data):
        if self.tunnel:
            self.transport.write(data)
            return
        self.buf += data
        if b"\r\n\r\n" in self.buf:
            head, rest = self.buf.split(b"\r\n\r\n", 1)
            target = head.split(b"\r\n", 1)[0].decode("latin-1")
            self.factory.targets.append(target)
            if self.factory.refuse:
                self.transport.write(b"HTTP/1.1 403 Forbidden\r\n\r\n")
                self.transport.loseConnection()
                return
            self.tunnel = True
            self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n" + self.factory.banner)
            if rest:
                self.transport.write(rest)


class Control(LineReceiver):
    delimiter = b"\n"

    def __init__(self, state):
        self.state = state

    def lineReceived(self, line):
        if line.strip() == b"STATS":
            self.sendLine(json.dumps(self.state.snapshot()).encode())

    def connectionLost(self, reason):
        if reactor.running:
            reactor.stop()


class State:
    def __init__(self):
        self.proxy = None
        self.device = None

    def snapshot(self):
        out = {}
        if self.proxy is not None:
            out["proxy"] = self.proxy.stats.snapshot()
            out["live"] = len(self.proxy.connections)
        if self.device is not None:
            out["targets"] = list(self.device.targets)
        return out


def main(spec):
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    from proxy.mappings import MappingTable
    from proxy.server import ProxyFactory, ProxySettings, listen
    from proxy.upstream import Upstream

    state = State()
    dev = spec.get("device")
    if dev:
        state.device = Factory.forProtocol(EchoDevice)
        state.device.targets = []
        state.device.refuse = dev.get("refuse", False)
        state.device.banner = dev.get("banner", "").encode()
        reactor.listenTCP(dev["port"], state.device, interface=dev.get("address", "127.0.0.1"))
    px = spec.get("proxy")
    if px:
        if px.get("nofile"):
            resource.setrlimit(resource.RLIMIT_NOFILE, (px["nofile"], resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        mappings = MappingTable()
        for ip, url in px.get("mappings", {}).items():
            mappings.add(ip, Upstream.parse(url), owner="driver")
        settings = dict(px.get("settings", {}))
        if "sniff_ports" in settings:
            settings["sniff_ports"] = frozenset(settings["sniff_ports"])
        splice = None
        if px.get("splice"):
            from proxy.splice import SplicePolicy

            splice = SplicePolicy()
        factory = ProxyFactory(
            reactor, mappings, ProxySettings(**settings), splice=splice, transparent=px.get("transparent", False)
        )
        listen(reactor, factory, px["port"], tuple(px.get("bind", ["0.0.0.0"])), transparent=px.get("transparent", False))
        state.proxy = factory
    stdio.StandardIO(Control(state))
    print("READY", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
