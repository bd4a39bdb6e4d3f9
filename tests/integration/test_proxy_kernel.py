"""The proxy against the real kernel: REDIRECT (IPv4, IPv6), TPROXY, guards, limits, EMFILE.

Two namespaces joined by a veth pair: ``cli`` (the VPN client's side, 10.0.0.2
and fd00:77::2) and ``px`` (10.0.0.1, fd00:77::1), where ``proxy_driver.py``
runs the real ProxyFactory plus a CONNECT echo "device" on 127.0.0.1:9000.
Client traffic to 198.51.100.0/24 (and 2001:db8:7::/64) is routed to ``px``
and redirected there, exactly as the VPN's tun traffic is in production.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.lab.childlines import ChildLines
from tests.lab.netns import Namespace, require_root, wait_for

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PYTHON = os.environ.get("POCKETPROXY_TEST_PYTHON") or sys.executable or "/usr/bin/python3"
DEVICE = "http://127.0.0.1:9000"
PORT = 12345


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO))


class Pair:
    """cli ⇄ px namespaces; ``start(spec)`` runs the driver in px."""

    def __init__(self):
        self.cli = Namespace("pcli")
        self.px = Namespace("ppx")
        self.driver = None
        a, b = "vc%d" % os.getpid(), "vp%d" % os.getpid()
        subprocess.run(
            ["ip", "link", "add", a, "netns", self.cli.name, "type", "veth", "peer", "name", b, "netns", self.px.name],
            check=True,
        )
        self.cli_if, self.px_if = a, b
        for ns, dev, v4, v6 in ((self.cli, a, "10.0.0.2/24", "fd00:77::2/64"), (self.px, b, "10.0.0.1/24", "fd00:77::1/64")):
            ns.run("ip", "addr", "add", v4, "dev", dev)
            ns.run("ip", "-6", "addr", "add", v6, "dev", dev, "nodad")
            ns.run("ip", "link", "set", dev, "up")
        self.cli.run("ip", "route", "add", "198.51.100.0/24", "via", "10.0.0.1")
        self.cli.run("ip", "-6", "route", "add", "2001:db8:7::/64", "via", "fd00:77::1")

    def start(self, spec):
        self.driver = self.px.popen(
            [PYTHON, str(HERE / "proxy_driver.py"), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(),
        )
        self._lines = ChildLines(self.driver.stdout)
        line = self._readline(15)
        assert line == "READY", "driver did not start: %r\n%s" % (line, self._stderr())
        return self

    def _readline(self, timeout):
        line = self._lines.readline(timeout)
        return None if line is None else line.strip()

    def _stderr(self):
        if self.driver.poll() is None:
            self.driver.kill()
        return self.driver.stderr.read().decode(errors="replace")[-4000:]

    def stats(self):
        self.driver.stdin.write(b"STATS\n")
        self.driver.stdin.flush()
        line = self._readline(5)
        assert line, "no stats from driver"
        return json.loads(line)

    def probe(self, host, port, send=b"", recv=0, timeout=5.0, shut=False):
        argv = [PYTHON, str(HERE / "tcp_probe.py"), host, str(port), "--recv", str(recv), "--timeout", str(timeout)]
        if send:
            argv += ["--send", send.hex()]
        if shut:
            argv.append("--shut")
        out = self.cli.run(*argv, timeout=timeout + 10, env=_env())
        return json.loads(out.stdout)

    def log(self):
        return self._stderr()

    def close(self):
        if self.driver is not None and self.driver.poll() is None:
            self.driver.stdin.close()
            try:
                self.driver.wait(5)
            except subprocess.TimeoutExpired:
                self.driver.kill()
                self.driver.wait(5)
        for ns in (self.cli, self.px):
            ns.destroy()


@pytest.fixture
def pair():
    """Two namespaces, destroyed (with the driver) even when the test fails."""
    require_root()
    p = Pair()
    try:
        yield p
    finally:
        p.close()


def redirect_rules(pair, v6=False):
    tool = "ip6tables" if v6 else "iptables"
    pair.px.run(tool, "-t", "nat", "-A", "PREROUTING", "-i", pair.px_if, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(PORT))


def spec(mappings, bind=("0.0.0.0",), transparent=False, **settings):
    settings.setdefault("sniff_budget", 0.3)
    return {
        "proxy": {"port": PORT, "mappings": mappings, "bind": list(bind), "transparent": transparent, "settings": settings},
        "device": {"port": 9000},
    }


def test_redirect_ipv4_original_destination_reaches_device(pair):
    """IPv4 REDIRECT: the device is asked for the original IP:port and the bytes round-trip."""
    redirect_rules(pair)
    pair.start(spec({"10.0.0.2": DEVICE}))
    r = pair.probe("198.51.100.7", 7000, send=b"ping", recv=4)
    assert r == {**r, "result": "ok", "data": "ping"}
    assert pair.stats()["targets"] == ["CONNECT 198.51.100.7:7000 HTTP/1.1"]


def test_redirect_ipv6_original_destination_reaches_device(pair):
    """IPv6 REDIRECT (IP6T_SO_ORIGINAL_DST) on a v6-only listener beside the IPv4 one."""
    redirect_rules(pair, v6=True)
    pair.start(spec({"fd00:77::2": DEVICE}, bind=("0.0.0.0", "::")))
    r = pair.probe("2001:db8:7::9", 7001, send=b"six", recv=3)
    assert (r["result"], r["data"]) == ("ok", "six")
    assert pair.stats()["targets"] == ["CONNECT [2001:db8:7::9]:7001 HTTP/1.1"]


def test_tproxy_destination_is_the_local_address(pair):
    """TPROXY: IP_TRANSPARENT listener, destination taken from the accepted socket."""
    pair.px.run(
        "iptables", "-t", "mangle", "-A", "PREROUTING", "-i", pair.px_if, "-p", "tcp",
        "-j", "TPROXY", "--on-port", str(PORT), "--tproxy-mark", "0x1/0x1",
    )
    pair.px.run("ip", "rule", "add", "fwmark", "0x1/0x1", "lookup", "100")
    pair.px.run("ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
    pair.start(spec({"10.0.0.2": DEVICE}, transparent=True))
    r = pair.probe("198.51.100.8", 2222, send=b"tp", recv=2)
    assert (r["result"], r["data"]) == ("ok", "tp")
    assert pair.stats()["targets"] == ["CONNECT 198.51.100.8:2222 HTTP/1.1"]


def test_sniffed_names_go_into_connect(pair):
    """HTTP Host and TLS SNI on client-first ports become the CONNECT host; a bad name falls back to the IP."""
    import ssl

    redirect_rules(pair)
    pair.start(spec({"10.0.0.2": DEVICE}))
    http = b"GET / HTTP/1.1\r\nHost: www.example.org:80\r\n\r\n"
    assert pair.probe("198.51.100.7", 80, send=http, recv=len(http))["result"] == "ok"
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="origin.test")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert pair.probe("198.51.100.7", 443, send=hello, recv=len(hello))["result"] == "ok"
    bad = b"GET / HTTP/1.1\r\nHost: bad name.example\r\n\r\n"
    assert pair.probe("198.51.100.7", 8080, send=bad, recv=len(bad))["result"] == "ok"
    assert pair.stats()["targets"] == [
        "CONNECT www.example.org:80 HTTP/1.1",
        "CONNECT origin.test:443 HTTP/1.1",
        "CONNECT 198.51.100.7:8080 HTTP/1.1",
    ]


def test_server_first_port_is_not_delayed_by_the_sniff_budget(pair):
    """A banner on a non-sniffed port arrives long before a (deliberately huge) sniff budget."""
    redirect_rules(pair)
    s = spec({"10.0.0.2": DEVICE}, sniff_budget=3.0)
    s["device"]["banner"] = "SSH-2.0-device\r\n"
    pair.start(s)
    r = pair.probe("198.51.100.7", 22, recv=16)
    assert (r["result"], r["data"]) == ("ok", "SSH-2.0-device\r\n")
    assert r["elapsed"] < 1.0, r


def test_unmapped_source_and_direct_connections_are_reset_and_counted(pair):
    """No mapping → RST; dialling the proxy port itself (loop) → RST; both counted, nothing reaches the device."""
    redirect_rules(pair)
    pair.start(spec({"10.0.0.99": DEVICE}))
    assert pair.probe("198.51.100.7", 7000, send=b"x", recv=1)["result"] == "reset"
    pair.px.run("iptables", "-t", "nat", "-I", "PREROUTING", "1", "-d", "10.0.0.1", "-j", "RETURN")
    assert pair.probe("10.0.0.1", PORT, send=b"x", recv=1)["result"] == "reset"
    stats = pair.stats()
    assert stats["proxy"]["refused"] == {"unmapped": 1, "loop": 1}
    assert stats["targets"] == []


def test_device_refusal_reaches_client_as_reset(pair):
    """A 403 from the device is an RST for the client, counted as 'forbidden'."""
    redirect_rules(pair)
    s = spec({"10.0.0.2": DEVICE})
    s["device"]["refuse"] = True
    pair.start(s)
    assert pair.probe("198.51.100.7", 7000, recv=1)["result"] == "reset"
    assert pair.stats()["proxy"]["upstream_errors"] == {"forbidden": 1}


def test_device_down_is_a_fast_reset(pair):
    """Nothing listening at the device address: the client gets an RST within a second."""
    redirect_rules(pair)
    pair.start(spec({"10.0.0.2": "http://127.0.0.1:9999"}))
    r = pair.probe("198.51.100.7", 7000, recv=1)
    assert r["result"] == "reset" and r["elapsed"] < 1.0, r
    assert pair.stats()["proxy"]["upstream_errors"] == {"unreachable": 1}


def _hold(pair, count, port=7000):
    """Open ``count`` connections from cli through the proxy; return (ok, failed) after one echo each."""
    code = (
        "import socket,json\n"
        "ok=[];bad=0\n"
        "for i in range(%d):\n"
        "  s=socket.socket(); s.settimeout(3)\n"
        "  try:\n"
        "    s.connect(('198.51.100.7',%d)); s.sendall(b'k'); assert s.recv(1)==b'k'; ok.append(s)\n"
        "  except Exception: bad+=1\n"
        "print(json.dumps([len(ok),bad]),flush=True)\n"
        "import sys; sys.stdin.read()\n"
        "for s in ok:\n"
        "  s.sendall(b'z'); assert s.recv(1)==b'z'\n"
        "print('ALIVE',flush=True)\n" % (count, port)
    )
    proc = pair.cli.popen([PYTHON, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_env())
    return proc, ChildLines(proc.stdout).json(60, proc)


def test_per_client_and_global_limits_reset_the_excess(pair):
    """Beyond max_connections_per_client new connections get an RST; the held ones keep working."""
    redirect_rules(pair)
    pair.start(spec({"10.0.0.2": DEVICE}, max_connections_per_client=5))
    proc, (ok, bad) = _hold(pair, 8)
    try:
        assert (ok, bad) == (5, 3)
        assert pair.stats()["proxy"]["refused"] == {"client-limit": 3}
        proc.stdin.close()
        assert proc.stdout.readline().strip() == b"ALIVE"
    finally:
        proc.kill()
        proc.wait(5)


def test_fd_exhaustion_refuses_new_connections_without_spinning(pair):
    """At RLIMIT_NOFILE, new connections fail, the proxy does not busy-loop, held connections still relay."""
    redirect_rules(pair)
    s = spec({"10.0.0.2": DEVICE}, max_connections=100000)
    s["proxy"]["nofile"] = 64
    pair.start(s)
    proc, (ok, bad) = _hold(pair, 40)
    try:
        assert ok >= 10 and bad >= 10, (ok, bad)
        pid = pair.driver.pid
        # the driver runs under `ip netns exec`, which execs: pid is the python process itself
        def cpu():
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        before = cpu()
        for _ in range(5):
            assert pair.probe("198.51.100.7", 7000, send=b"x", recv=1, timeout=2)["result"] in ("reset", "eof", "timeout")
        time.sleep(1.0)  # the window a busy loop would burn CPU in: the duration is the measurement
        assert cpu() - before < 0.5, "proxy burned CPU while out of file descriptors"
        proc.stdin.close()
        assert proc.stdout.readline().strip() == b"ALIVE"
        proc.wait(10)
        # The holder is gone: wait until the proxy has closed every connection it held.
        wait_for(lambda: pair.stats()["proxy"]["active"] == 0, 10, what="the proxy to close the held connections")
        r = pair.probe("198.51.100.7", 7000, send=b"again", recv=5)
        assert (r["result"], r["data"]) == ("ok", "again")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
