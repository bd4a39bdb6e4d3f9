"""Integration tests for ovpnmgr.firewall: real ipset/iptables inside private network namespaces.

The firewall code runs inside the namespace (``fw_driver.py`` under ``ip netns
exec``); this process only prepares namespaces and inspects them with the
ipset/iptables command-line tools. Every namespace is destroyed in a fixture
finalizer, also when a test fails.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab.childlines import ChildLines
from tests.lab.netns import Namespace, link, require_root

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DRIVER = HERE / "fw_driver.py"
# The interpreter inside the namespaces: the one running pytest (so the PyPI venv leg exercises
# pyroute2 0.9 / current Twisted), or POCKETPROXY_TEST_PYTHON.
PYTHON = os.environ.get("POCKETPROXY_TEST_PYTHON") or sys.executable or "/usr/bin/python3"

SET = "pocketproxy-clients"
CHAIN = "POCKETPROXY"
INPUT_CHAIN = "POCKETPROXY-IN"
UNDERLAY_CHAIN = "POCKETPROXY-UL"
DNAT = "-A PREROUTING -p tcp -m tcp --dport 8080 -j DNAT --to-destination 192.168.255.2:8080"
OTHER_FILTER = "-A FORWARD -o eth9 -p tcp -m tcp --dport 25 -j DROP"

NAT_RULES = [
    "-A POCKETPROXY -m addrtype --dst-type LOCAL -j RETURN",
    "-A POCKETPROXY -p tcp -m set --match-set pocketproxy-clients src -j REDIRECT --to-ports 12345",
]
FILTER_RULES = [
    "-A POCKETPROXY -p tcp -j REJECT --reject-with tcp-reset",
    "-A POCKETPROXY -p udp -j REJECT --reject-with icmp-port-unreachable",
    "-A POCKETPROXY -j REJECT --reject-with icmp-admin-prohibited",
]
INPUT_RULES = [
    "-A POCKETPROXY-IN -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    "-A POCKETPROXY-IN -p tcp -m tcp --dport 12345 -m conntrack --ctstate DNAT -j ACCEPT",
    "-A POCKETPROXY-IN -p icmp -m icmp --icmp-type 8 -j ACCEPT",
    "-A POCKETPROXY-IN -p tcp -j REJECT --reject-with tcp-reset",
    "-A POCKETPROXY-IN -p udp -j REJECT --reject-with icmp-port-unreachable",
    "-A POCKETPROXY-IN -j REJECT --reject-with icmp-admin-prohibited",
]
UNDERLAY_RULES = [
    "-A POCKETPROXY-UL -i lo -j RETURN",
    "-A POCKETPROXY-UL -s 10.9.0.0/24 -j DROP",
    "-A POCKETPROXY-UL -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
]
FILTER6_RULES = [rule.replace("icmp-", "icmp6-").replace("admin-", "adm-") for rule in FILTER_RULES]
INPUT6_RULES = [
    "-A POCKETPROXY-IN -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    "-A POCKETPROXY-IN -p ipv6-icmp -m icmp6 --icmpv6-type 128 -j ACCEPT",
] + [rule.replace("POCKETPROXY ", "POCKETPROXY-IN ") for rule in FILTER6_RULES]
UNDERLAY6_RULES = [
    "-A POCKETPROXY-UL -i lo -j RETURN",
    "-A POCKETPROXY-UL -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
    "-A POCKETPROXY-UL -p ipv6-icmp -m icmp6 --icmpv6-type 135 -j RETURN",
    "-A POCKETPROXY-UL -p ipv6-icmp -m icmp6 --icmpv6-type 136 -j RETURN",
]


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO))


@pytest.fixture
def namespaces():
    """A factory for namespaces that are all destroyed at teardown."""
    require_root()
    made = []

    def make(role):
        ns = Namespace(role)
        made.append(ns)
        return ns

    try:
        yield make
    finally:
        for ns in reversed(made):
            ns.destroy()


@pytest.fixture
def ns(namespaces):
    return namespaces("fw")


def drive(ns, ops, config=None, port=12345, subnet="10.9.0.0/24", mode="redirect", dns=None):
    """Run firewall ops inside ``ns`` via fw_driver.py; return one result per op."""
    spec = {
        "config": {"interface": "tun+", **(config or {})},
        "port": port,
        "subnet": subnet,
        "ops": ops,
        "mode": mode,
        "dns": dns,
    }
    r = ns.run(PYTHON, str(DRIVER), json.dumps(spec), check=False, env=_env(), timeout=300)
    assert r.returncode == 0, "driver failed (rc %d): %s" % (r.returncode, r.stderr)
    results = json.loads(r.stdout.splitlines()[-1])
    assert len(results) == len(ops)
    return results


def ok(results):
    for res in results:
        assert "error" not in res, res["error"]
    return results


def save(ns):
    """iptables-save without its timestamp comments."""
    out = ns.run("iptables-save").stdout
    return [line for line in out.splitlines() if not line.startswith("#")]


def ours(line):
    return any(
        line == ":%s - [0:0]" % chain or line.startswith("-A %s " % chain) or line.endswith("-j %s" % chain)
        for chain in (CHAIN, INPUT_CHAIN, UNDERLAY_CHAIN)
    )


def listing(ns, table, tool="iptables"):
    return ns.run(tool, "-w", "-t", table, "-S").stdout.splitlines()


def ipset_members(ns, name=SET):
    out = ns.run("ipset", "list", name).stdout.splitlines()
    return sorted(out[out.index("Members:") + 1 :])


def assert_installed_once(ns):
    """Exactly one jump per built-in chain and ours, at position 1 (the underlay guard at 2), and
    chain contents as specified, for IPv4 and IPv6."""
    for tool, table, builtin, chain, rules, position in (
        ("iptables", "nat", "PREROUTING", CHAIN, NAT_RULES, 1),
        ("iptables", "filter", "FORWARD", CHAIN, FILTER_RULES, 1),
        ("iptables", "filter", "INPUT", INPUT_CHAIN, INPUT_RULES, 1),
        ("iptables", "filter", "FORWARD", UNDERLAY_CHAIN, UNDERLAY_RULES, 2),
        ("iptables", "filter", "INPUT", UNDERLAY_CHAIN, UNDERLAY_RULES, 2),
        ("ip6tables", "filter", "FORWARD", CHAIN, FILTER6_RULES, 1),
        ("ip6tables", "filter", "INPUT", INPUT_CHAIN, INPUT6_RULES, 1),
        ("ip6tables", "filter", "FORWARD", UNDERLAY_CHAIN, UNDERLAY6_RULES, 2),
        ("ip6tables", "filter", "INPUT", UNDERLAY_CHAIN, UNDERLAY6_RULES, 2),
    ):
        lines = listing(ns, table, tool)
        builtin_rules = [l for l in lines if l.startswith("-A %s " % builtin)]
        jumps = [l for l in builtin_rules if l.endswith("-j %s" % chain)]
        match = "! -i tun+" if chain == UNDERLAY_CHAIN else "-i tun+"
        assert jumps == ["-A %s %s -j %s" % (builtin, match, chain)], lines
        assert builtin_rules[position - 1] == jumps[0], lines
        assert [l for l in lines if l.startswith("-A %s " % chain)] == rules


def preexisting_rules(ns):
    ns.run(
        "iptables",
        "-w",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-p",
        "tcp",
        "--dport",
        "8080",
        "-j",
        "DNAT",
        "--to-destination",
        "192.168.255.2:8080",
    )
    ns.run("iptables", "-w", "-A", "FORWARD", "-o", "eth9", "-p", "tcp", "--dport", "25", "-j", "DROP")
    baseline = save(ns)
    assert DNAT in baseline and OTHER_FILTER in baseline
    return baseline


def test_install_twice_gives_one_jump_at_position_one(ns):
    """Installing twice leaves exactly one jump at position 1 in nat PREROUTING and filter FORWARD."""
    baseline = preexisting_rules(ns)
    ok(drive(ns, [{"op": "install"}]))
    assert_installed_once(ns)
    # A stray rule in our own chain: re-install (":CHAIN - [0:0]" under --noflush) must flush it.
    ns.run("iptables", "-w", "-t", "nat", "-A", CHAIN, "-j", "ACCEPT")
    ok(drive(ns, [{"op": "install"}]))
    assert_installed_once(ns)
    assert "-A PREROUTING -i tun+ -j POCKETPROXY" in save(ns)
    assert [l for l in save(ns) if not ours(l)] == baseline
    assert ns.run("ipset", "list", "-n").stdout.split() == [SET]
    header = ns.run("ipset", "list", "-t", SET).stdout
    assert "Type: hash:ip" in header and "family inet " in header and "maxelem 65536" in header


def test_other_rules_byte_identical_after_reinstall_and_1000_cycles(ns):
    """Unrelated DNAT/filter rules stay byte-identical through install, re-install and 1,000 add/remove cycles."""
    baseline = preexisting_rules(ns)
    results = ok(
        drive(
            ns,
            [
                {"op": "install"},
                {"op": "install"},
                {"op": "cycles", "n": 1000, "ip": "10.9.0.77"},
                {"op": "members"},
            ],
        )
    )
    cycles = results[2]
    print(
        "\nipset add+remove over netlink: %d cycles in %.3fs = %.0f cycles/s"
        % (cycles["cycles"], cycles["seconds"], cycles["per_second"]),
        file=sys.stderr,
    )
    assert results[3]["members"] == []
    after = save(ns)
    assert [l for l in after if not ours(l)] == baseline
    assert DNAT in after and OTHER_FILTER in after
    assert_installed_once(ns)


def test_members_match_ipset_list_and_absent_removal_is_fine(ns):
    """members() equals what `ipset list` shows; removing an absent member is not an error."""
    results = ok(
        drive(
            ns,
            [
                {"op": "install"},
                {"op": "add", "ip": "10.9.0.10"},
                {"op": "add", "ip": "10.9.0.11"},
                {"op": "add", "ip": "10.9.0.11"},
                {"op": "add", "ip": "10.9.0.12"},
                {"op": "remove", "ip": "10.9.0.11"},
                {"op": "remove", "ip": "10.9.0.200"},
                {"op": "members"},
            ],
        )
    )
    assert results[-1]["members"] == ["10.9.0.10", "10.9.0.12"]
    assert ipset_members(ns) == results[-1]["members"]


def test_full_set_raises_firewall_error_saying_full(ns):
    """With maxelem 1 and the set pre-filled, add_member fails with a message saying the set is full."""
    ok(drive(ns, [{"op": "install"}], config={"maxelem": 1}))
    assert "maxelem 1" in ns.run("ipset", "list", "-t", SET).stdout
    ns.run("ipset", "add", SET, "10.9.0.50")
    [result] = drive(ns, [{"op": "add", "ip": "10.9.0.51"}], config={"maxelem": 1})
    assert result["error"] == (
        "cannot add 10.9.0.51 to ipset 'pocketproxy-clients': set is full (maxelem reached) (error 4352)"
    )
    assert ipset_members(ns) == ["10.9.0.50"]


def test_existing_set_same_type_accepted_other_type_refused(ns):
    """A pre-existing hash:ip set is reused (other maxelem is fine); a hash:net set of that name is a clear error."""
    ns.run("ipset", "create", SET, "hash:ip", "maxelem", "7")
    ns.run("ipset", "add", SET, "10.9.0.9")
    results = ok(drive(ns, [{"op": "install"}, {"op": "members"}]))
    assert results[1]["members"] == ["10.9.0.9"]

    other = "pp-other-set"
    ns.run("ipset", "create", other, "hash:net")
    [result] = drive(ns, [{"op": "install"}], config={"ipset": other, "chain": "PPOTHER"})
    assert "a set with this name already exists as hash:net family inet" in result["error"]
    assert "PPOTHER" not in ns.run("iptables-save").stdout


def test_check_detects_and_repair_fixes_drift(ns):
    """check() sees a member deleted behind its back, an extra member and a flushed chain; repair() fixes all."""
    ok(drive(ns, [{"op": "install"}, {"op": "add", "ip": "10.9.0.20"}, {"op": "add", "ip": "10.9.0.21"}]))
    expected = ["10.9.0.20", "10.9.0.21"]
    [clean] = ok(drive(ns, [{"op": "check", "expected": expected}]))
    assert clean["ok"] is True and clean["describe"] == "firewall ok"

    ns.run("ipset", "del", SET, "10.9.0.20")
    ns.run("ipset", "add", SET, "10.9.0.99")
    ns.run("iptables", "-w", "-t", "nat", "-F", CHAIN)
    ns.run("iptables", "-w", "-t", "filter", "-D", "FORWARD", "-i", "tun+", "-j", CHAIN)
    ns.run("ip6tables", "-w", "-t", "filter", "-D", "INPUT", "-i", "tun+", "-j", INPUT_CHAIN)
    ns.run("ip6tables", "-w", "-t", "filter", "-A", UNDERLAY_CHAIN, "-j", "ACCEPT")
    check, repair, after = ok(
        drive(
            ns,
            [
                {"op": "check", "expected": expected},
                {"op": "repair", "expected": expected},
                {"op": "check", "expected": expected},
            ],
        )
    )
    assert check["ok"] is False
    assert check["missing_members"] == ["10.9.0.20"] and check["extra_members"] == ["10.9.0.99"]
    assert check["rule_problems"] == [
        "filter FORWARD: jump to POCKETPROXY missing",
        "nat POCKETPROXY: rules differ",
        "ip6 filter INPUT: jump to POCKETPROXY-IN missing",
        "ip6 filter POCKETPROXY-UL: rules differ",
    ]
    assert repair == check
    assert after["ok"] is True, after["describe"]
    assert ipset_members(ns) == expected
    assert_installed_once(ns)


def test_tproxy_mode_installs_mangle_rules_and_policy_routing(ns):
    """TPROXY mode: mangle chain + ip rule + local route, idempotent; drift in any of them is found and repaired."""
    baseline = preexisting_rules(ns)
    ok(drive(ns, [{"op": "install"}, {"op": "install"}], mode="tproxy"))
    mangle = listing(ns, "mangle")
    assert [l for l in mangle if l.startswith("-A PREROUTING")] == ["-A PREROUTING -i tun+ -j POCKETPROXY"]
    assert [l for l in mangle if l.startswith("-A POCKETPROXY")] == [
        "-A POCKETPROXY -m addrtype --dst-type LOCAL -j RETURN",
        "-A POCKETPROXY -p tcp -m set --match-set pocketproxy-clients src"
        " -j TPROXY --on-port 12345 --on-ip 0.0.0.0 --tproxy-mark 0x1/0x1",
    ]
    assert "-A POCKETPROXY" not in "\n".join(listing(ns, "nat"))
    rules = ns.run("ip", "-4", "rule", "show").stdout
    assert rules.count("fwmark 0x1/0x1 lookup 100") == 1, rules
    assert ns.run("ip", "-4", "route", "show", "table", "100").stdout.startswith("local default dev lo")
    after, in_mangle = [], False
    for line in save(ns):  # the mangle table appears only now (empty built-ins apart from ours)
        in_mangle = in_mangle or line == "*mangle"
        if not in_mangle and not ours(line):
            after.append(line)
        in_mangle = in_mangle and line != "COMMIT"
    assert after == baseline

    ns.run("ip", "-4", "rule", "del", "fwmark", "0x1/0x1", "lookup", "100")
    ns.run("ip", "-4", "route", "flush", "table", "100")
    check, repair, after = ok(
        drive(ns, [{"op": "check", "expected": []}, {"op": "repair", "expected": []}, {"op": "check", "expected": []}], mode="tproxy")
    )
    assert check["rule_problems"] == [
        "ip rule fwmark 0x1/0x1 lookup 100 missing",
        "route 'local default dev lo' missing in table 100",
    ]
    assert after["ok"] is True, after["describe"]


def test_runner_timeout_kills_the_child(ns):
    """The real ProcessRunner kills a hung command by PID at the timeout and leaves no child behind."""
    [slow, fast] = drive(
        ns,
        [
            {"op": "run", "argv": ["sleep", "30"], "timeout": 0.5},
            {"op": "run", "argv": ["sh", "-c", "echo out; echo err >&2; exit 3"], "timeout": 5},
        ],
    )
    assert slow["type"] == "CommandTimeout" and "killed" in slow["error"]
    assert 0.4 < slow["elapsed"] < 5
    assert slow["children"] == []
    assert fast["result"] == [3, "out\n", "err\n"]


LISTENER = r"""
import select, socket, struct, sys
socks = []
for port in (12345, 8081):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(16)
    socks.append(s)
print("ready", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        conn, _ = s.accept()
        raw = conn.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
        port, = struct.unpack("!H", raw[2:4])
        orig = "%s:%d" % (socket.inet_ntoa(raw[4:8]), port)
        conn.sendall(("port=%d orig=%s\n" % (conn.getsockname()[1], orig)).encode())
        conn.close()
"""

CONNECT = r"""
import json, socket, sys, time
proto, host, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
start = time.monotonic()
out = {}
try:
    if proto == "tcp":
        s = socket.create_connection((host, port), timeout=timeout)
        out["data"] = s.makefile().readline().strip()
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(timeout)
        s.connect((host, port))
        s.send(b"quic?")
        s.recv(100)
        out["data"] = "udp answer"
except OSError as e:
    out["error"] = type(e).__name__
out["elapsed"] = time.monotonic() - start
print(json.dumps(out))
"""


def connect(client, host, port, proto="tcp", timeout=2.0):
    r = client.run(PYTHON, "-c", CONNECT, proto, host, str(port), str(timeout))
    return json.loads(r.stdout)


def test_redirect_and_fail_closed_with_real_traffic(namespaces):
    """A member's TCP to a foreign address lands on the proxy port; after removal it gets an RST (UDP: ICMP) at once."""
    server = namespaces("srv")
    client = namespaces("cli")
    sink = namespaces("snk")
    server_if, _ = link(server, "10.9.0.1", client, "10.9.0.2")
    client.run("ip", "route", "add", "198.51.100.0/24", "via", "10.9.0.1")
    # Forwarding on (server namespace only) and an "uplink" into a sink namespace that forwards
    # nothing, so unredirected packets really reach filter FORWARD; the sink counts what arrives.
    server.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    link(server, "203.0.113.1", sink, "203.0.113.2")
    server.run("ip", "route", "add", "198.51.100.0/24", "via", "203.0.113.2")
    sink.run("iptables", "-w", "-t", "raw", "-A", "PREROUTING", "-d", "198.51.100.0/24")

    def reached_sink():
        out = sink.run("iptables", "-w", "-t", "raw", "-L", "PREROUTING", "-v", "-n", "-x").stdout
        return int(out.splitlines()[2].split()[0])

    listener = server.popen([PYTHON, "-c", LISTENER], stdout=subprocess.PIPE, text=True)
    assert ChildLines(listener.stdout).readline(10) == "ready", "listener did not start"

    # Without pocketproxy's rules the packet is forwarded into the black hole: no answer at all.
    before = connect(client, "198.51.100.1", 80, timeout=1.0)
    assert before.get("error") == "TimeoutError", before
    leaked = reached_sink()
    assert leaked >= 1  # the path exists: without our rules the SYN goes out the uplink

    config = {"interface": server_if}
    ok(drive(server, [{"op": "install"}, {"op": "add", "ip": "10.9.0.2"}], config=config))
    redirected = connect(client, "198.51.100.1", 80)
    assert redirected.get("data") == "port=12345 orig=198.51.100.1:80", redirected
    # Local destinations are not hijacked, and the server's own services are closed to clients
    # (filter INPUT): an RST at once, both for a service and for the proxy port itself.
    for port in (8081, 12345):
        local = connect(client, "10.9.0.1", port)
        assert local.get("error") == "ConnectionRefusedError" and local["elapsed"] < 0.5, (port, local)
    assert connect(client, "10.9.0.1", 53, proto="udp").get("error") == "ConnectionRefusedError"
    # With the DNS service on, exactly its address and port open, to members only.
    ok(drive(server, [{"op": "install"}], config=config, dns=["10.9.0.1", 8081]))
    local = connect(client, "10.9.0.1", 8081)
    assert local.get("data") == "port=8081 orig=10.9.0.1:8081", local
    assert connect(client, "10.9.0.1", 12345).get("error") == "ConnectionRefusedError"
    redirected = connect(client, "198.51.100.1", 80)
    assert redirected.get("data") == "port=12345 orig=198.51.100.1:80", redirected

    ok(drive(server, [{"op": "remove", "ip": "10.9.0.2"}], config=config))
    refused = connect(client, "198.51.100.1", 80)
    assert refused.get("error") == "ConnectionRefusedError", refused
    assert refused["elapsed"] < 0.5, refused
    udp = connect(client, "198.51.100.1", 443, proto="udp")
    assert udp.get("error") == "ConnectionRefusedError", udp
    assert udp["elapsed"] < 0.5, udp
    assert reached_sink() == leaked  # nothing got past pocketproxy's rules
