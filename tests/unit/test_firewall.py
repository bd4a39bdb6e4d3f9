"""Unit tests for ovpnmgr.firewall (rules text, install/check/repair plans) and ovpnmgr.process (the runner)."""

import errno
import os
import shutil
import stat
import tempfile
from ipaddress import IPv4Address, IPv4Network

import pytest
from twisted.internet import defer, error
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from ovpnmgr.config import FirewallConfig
from ovpnmgr.directory import Device, Directory
from ovpnmgr.firewall import Drift, Firewall, FirewallError, MemberSync
from ovpnmgr.rules import IP6, Devices, jumps_to, restore_input, rule_problems
from ovpnmgr.ipset import IPSET_ERR_HASH_FULL, FakeIPSet, IPSetError
from ovpnmgr.process import CommandNotFound, CommandTimeout, FakeRunner, ProcessRunner, command_environment
from proxy.upstream import Upstream
from tests.unit.firewall_listings import (
    A,
    B,
    C,
    CONFIG,
    DNAT,
    EMPTY_FILTER,
    EMPTY_NAT,
    FILTER6_S,
    FILTER_S,
    GOLDEN,
    GOLDEN6,
    HEALTHY_FILTER,
    HEALTHY_FILTER6,
    HEALTHY_NAT,
    NAT_S,
    PORT,
    RESTORE,
    RESTORE6,
    SUBNET,
    make,
    restored,
)

# --- the restore text --------------------------------------------------------


def test_golden_restore_text_for_a_fresh_kernel():
    """The exact iptables-restore input for the default config, filter first, one jump insert per table."""
    listings = {"filter": EMPTY_FILTER.splitlines(), "nat": EMPTY_NAT.splitlines()}
    assert restore_input(CONFIG, PORT, listings, subnet=SUBNET) == GOLDEN
    assert restore_input(CONFIG, PORT, {"ip6 filter": EMPTY_FILTER.splitlines()}, family=IP6, subnet=SUBNET) == GOLDEN6


def test_healthy_listing_is_what_a_restore_of_the_golden_text_leaves():
    """The HEALTHY_* fixtures (iptables -S as observed) check clean; the IPv6 one is keyed 'ip6 filter'."""
    assert rule_problems(CONFIG, PORT, {"ip6 filter": HEALTHY_FILTER6.splitlines()}, family=IP6) == []
    assert rule_problems(CONFIG, PORT, {"filter": HEALTHY_FILTER6.splitlines()}, family=IP6) == [
        "ip6 filter FORWARD: jump to POCKETPROXY missing",
        "ip6 filter POCKETPROXY: chain missing",
        "ip6 filter INPUT: jump to POCKETPROXY-IN missing",
        "ip6 filter POCKETPROXY-IN: chain missing",
        "ip6 filter FORWARD: jump to POCKETPROXY-UL missing",
        "ip6 filter POCKETPROXY-UL: chain missing",
        "ip6 filter INPUT: jump to POCKETPROXY-UL missing",
    ]


def test_golden_restore_text_uses_every_config_name():
    """Chain, set, interface and port all come from the config."""
    config = FirewallConfig(ipset="s1", chain="PP2", interface="ppvb12")
    text = restore_input(config, 8000, {}).decode()
    assert "-A PP2 -p tcp -m set --match-set s1 src -j REDIRECT --to-ports 8000\n" in text
    assert "-I PREROUTING 1 -i ppvb12 -j PP2\n" in text and "-I FORWARD 1 -i ppvb12 -j PP2\n" in text
    assert "-I INPUT 1 -i ppvb12 -j PP2-IN\n" in text and "--dport 8000 -m conntrack --ctstate DNAT" in text
    assert "-I INPUT 2 ! -i ppvb12 -j PP2-UL\n" in text and "-I FORWARD 2 ! -i ppvb12 -j PP2-UL\n" in text
    assert text.count(":PP2 - [0:0]\n") == 2 and text.count(":PP2-IN - [0:0]\n") == 1 and "POCKETPROXY" not in text


def test_existing_jumps_are_deleted_then_inserted_once():
    """Re-install plan: every existing jump to our chain (even odd variants) is -D'd, then one -I at 1."""
    nat = EMPTY_NAT + (
        "-N POCKETPROXY\n"
        "-A PREROUTING -i tun+ -j POCKETPROXY\n" + DNAT + "\n"
        "-A PREROUTING -i tun+ -j POCKETPROXY\n"
        '-A PREROUTING -i tun0 -m comment --comment "old config" -j POCKETPROXY\n'
        '-A PREROUTING -m comment --comment "-j POCKETPROXY" -j ACCEPT\n'
        "-A PREROUTING -i tun+ -j POCKETPROXY2\n"
    )
    text = restore_input(CONFIG, PORT, {"nat": nat.splitlines(), "filter": HEALTHY_FILTER.splitlines()}).decode()
    nat_part = text.split("*nat\n")[1]
    assert nat_part == (
        ":POCKETPROXY - [0:0]\n"
        "-A POCKETPROXY -m addrtype --dst-type LOCAL -j RETURN\n"
        "-A POCKETPROXY -p tcp -m set --match-set pocketproxy-clients src -j REDIRECT --to-ports 12345\n"
        "-D PREROUTING -i tun+ -j POCKETPROXY\n"
        "-D PREROUTING -i tun+ -j POCKETPROXY\n"
        '-D PREROUTING -i tun0 -m comment --comment "old config" -j POCKETPROXY\n'
        "-I PREROUTING 1 -i tun+ -j POCKETPROXY\n"
        "COMMIT\n"
    )
    assert "-D FORWARD -i tun+ -j POCKETPROXY\n-I FORWARD 1 -i tun+ -j POCKETPROXY\n" in text
    assert "-A PREROUTING -p tcp -m tcp --dport 8080 -j DNAT" not in text and "ACCEPT" not in nat_part


def test_jumps_to_matches_only_real_targets():
    """-j/-g targets count; a comment mentioning the chain or a similarly named chain does not."""
    lines = [
        "-A FORWARD -g POCKETPROXY",
        '-A FORWARD -m comment --comment "-j POCKETPROXY" -j ACCEPT',
        "-A FORWARD -j POCKETPROXYX",
        "-A INPUT -j POCKETPROXY",
    ]
    assert jumps_to(lines, "FORWARD", "POCKETPROXY") == ["-A FORWARD -g POCKETPROXY"]


# --- install -------------------------------------------------------------------


class InstallTests(SynchronousTestCase):
    def test_install_ensures_set_then_reads_then_restores(self):
        """install: ipset first (netlink), then iptables -S of both tables, then one restore with the golden text."""
        events = []
        fw, runner, ipset = make(filter6_s=EMPTY_FILTER)
        ipset_ensure = ipset.ensure
        ipset.ensure = lambda: (events.append("ensure"), ipset_ensure())
        runner.on(RESTORE, handler=lambda argv, stdin: (events.append("restore"), (0, b"", b""))[1])
        self.assertIsNone(self.successResultOf(fw.install()))
        self.assertEqual(events, ["ensure", "restore"])
        self.assertEqual(runner.argvs(), [FILTER_S, NAT_S, RESTORE, FILTER6_S, RESTORE6])
        self.assertEqual(restored(runner), GOLDEN)
        self.assertEqual(restored(runner, RESTORE6), GOLDEN6)
        self.assertTrue(ipset.exists)

    def test_reinstall_deletes_existing_jumps(self):
        """A second install over a healthy kernel deletes the jump and re-inserts it at position 1."""
        fw, runner, _ = make(HEALTHY_FILTER, HEALTHY_NAT)
        self.successResultOf(fw.install())
        for text in (restored(runner).decode(), restored(runner, RESTORE6).decode()):
            self.assertIn("-D FORWARD -i tun+ -j POCKETPROXY\n-I FORWARD 1 -i tun+ -j POCKETPROXY\n", text)
            self.assertIn("-D INPUT -i tun+ -j POCKETPROXY-IN\n-I INPUT 1 -i tun+ -j POCKETPROXY-IN\n", text)
            self.assertIn("-D FORWARD ! -i tun+ -j POCKETPROXY-UL\n-I FORWARD 2 ! -i tun+ -j POCKETPROXY-UL\n", text)
            self.assertIn("-D INPUT ! -i tun+ -j POCKETPROXY-UL\n-I INPUT 2 ! -i tun+ -j POCKETPROXY-UL\n", text)
        text = restored(runner).decode()
        self.assertIn("-D PREROUTING -i tun+ -j POCKETPROXY\n-I PREROUTING 1 -i tun+ -j POCKETPROXY\n", text)
        self.assertEqual(text.count("-D "), 5)
        self.assertEqual(restored(runner, RESTORE6).count(b"-D "), 4)

    def test_foreign_bytes_in_a_jump_round_trip_exactly(self):
        """A jump with a non-ASCII (even non-UTF-8) comment is -D'd with exactly the bytes iptables printed."""
        nat = EMPTY_NAT.encode() + b'-A PREROUTING -m comment --comment "caf\xc3\xa9 \xff" -j POCKETPROXY\n'
        fw, runner, _ = make()
        runner.on(NAT_S, stdout=nat)
        self.successResultOf(fw.install())
        self.assertIn(b'-D PREROUTING -m comment --comment "caf\xc3\xa9 \xff" -j POCKETPROXY\n', restored(runner))

    def test_ipset_failure_stops_install_before_iptables(self):
        """If the set cannot be created no iptables command runs (the rule would reference a missing set)."""
        fw, runner, _ = make(ipset=FakeIPSet(exists=False, fail_ensure=True))
        failure = self.failureResultOf(fw.install(), FirewallError)
        self.assertEqual(runner.calls, [])
        self.assertIn("cannot install firewall", str(failure.value))
        self.assertIn("injected failure", str(failure.value))

    def test_restore_failure_reports_exit_code_and_stderr(self):
        """iptables-restore exiting non-zero is a FirewallError quoting its stderr."""
        fw, runner, _ = make()
        runner.on(
            RESTORE, exit_code=2, stderr=b"iptables-restore v1.8.9: Set x doesn't exist.\n\nError occurred at line: 9\n"
        )
        failure = self.failureResultOf(fw.install(), FirewallError)
        self.assertEqual(
            str(failure.value),
            "cannot install firewall: iptables-restore -w --noflush exited 2:"
            " iptables-restore v1.8.9: Set x doesn't exist. |  | Error occurred at line: 9",
        )
        self.assertEqual(failure.value.operation, "install")

    def test_listing_failure_is_reported(self):
        """A failing iptables -S aborts install before any restore."""
        fw, runner, _ = make()
        runner.on(NAT_S, exit_code=3, stderr=b"iptables: table `nat' is incompatible, use 'nft' tool.\n")
        failure = self.failureResultOf(fw.install(), FirewallError)
        self.assertIn("iptables -w -t nat -S exited 3", str(failure.value))
        self.assertNotIn(RESTORE, runner.argvs())

    def test_runner_timeout_becomes_firewall_error(self):
        """A hung iptables-restore (runner timeout) surfaces as FirewallError saying it was killed."""
        fw, runner, _ = make()
        runner.on(RESTORE, error=CommandTimeout(RESTORE, 10.0))
        failure = self.failureResultOf(fw.install(), FirewallError)
        self.assertIn("no result after 10s; killed", str(failure.value))

    def test_concurrent_installs_do_not_interleave(self):
        """A second install waits until the first restore finished (its -S must see the first's jump)."""
        fw, runner, _ = make()
        held = defer.Deferred()
        runner.on(RESTORE, handler=lambda argv, stdin: held)
        d1 = fw.install()
        d2 = fw.install()
        self.assertEqual(runner.argvs(), [FILTER_S, NAT_S, RESTORE])
        runner.on(RESTORE)
        held.callback((0, b"", b""))
        self.successResultOf(d1)
        self.successResultOf(d2)
        once = [FILTER_S, NAT_S, RESTORE, FILTER6_S, RESTORE6]
        self.assertEqual(runner.argvs(), once + once)


# --- membership --------------------------------------------------------------


def test_add_and_remove_members():
    """add_member/remove_member go straight to the set; removing an absent member is fine."""
    fw, runner, ipset = make()
    fw.add_member(A)
    fw.add_member("10.9.0.6")
    fw.remove_member(A)
    fw.remove_member(C)
    assert fw.members() == {B}
    assert runner.calls == []


def test_add_member_outside_subnet_is_refused():
    """Only VPN-subnet addresses may be redirected."""
    fw, _, ipset = make()
    with pytest.raises(FirewallError) as info:
        fw.add_member(IPv4Address("192.168.1.5"))
    assert (
        str(info.value)
        == "cannot add 192.168.1.5 to ipset 'pocketproxy-clients': not inside the VPN subnet 10.9.0.0/24"
    )
    assert ipset.calls == []


def test_add_member_full_set_message():
    """A full set reads: cannot add IP to ipset NAME: set is full."""
    fw, _, _ = make(ipset=FakeIPSet(maxelem=1, members=[B]))
    with pytest.raises(FirewallError) as info:
        fw.add_member(A)
    assert (
        str(info.value)
        == "cannot add 10.9.0.5 to ipset 'pocketproxy-clients': set is full (maxelem reached) (error 4352)"
    )
    assert info.value.operation == "add" and info.value.ip == A


def test_remove_and_members_failures_are_firewall_errors():
    """Injected delete/list failures come out as FirewallError naming ip and reason."""
    fake = FakeIPSet(fail_next_delete=IPSetError("delete", "pocketproxy-clients", A, errno.EPERM), fail_members=True)
    fw, _, _ = make(ipset=fake)
    with pytest.raises(FirewallError) as info:
        fw.remove_member(A)
    assert "cannot remove 10.9.0.5 from ipset 'pocketproxy-clients': operation not permitted" in str(info.value)
    with pytest.raises(FirewallError) as info:
        fw.members()
    assert "cannot list ipset 'pocketproxy-clients': injected failure" in str(info.value)
    with pytest.raises(FirewallError):
        fw.add_member("not-an-ip")


# --- check / repair ----------------------------------------------------------


class CheckRepairTests(SynchronousTestCase):
    def test_healthy_kernel_has_no_drift(self):
        """Rules as installed + members as expected -> Drift.ok."""
        fw, _, _ = make(HEALTHY_FILTER, HEALTHY_NAT, ipset=FakeIPSet(members=[A, B]))
        drift = self.successResultOf(fw.check({A, B}))
        self.assertTrue(drift.ok, drift.describe())
        self.assertEqual(drift.describe(), "firewall ok")

    def test_member_drift(self):
        """A member deleted behind our back is missing; an unknown one is extra."""
        fw, _, _ = make(HEALTHY_FILTER, HEALTHY_NAT, ipset=FakeIPSet(members=[A, C]))
        drift = self.successResultOf(fw.check({A, B}))
        self.assertEqual((drift.missing_members, drift.extra_members), ({B}, {C}))
        self.assertFalse(drift.missing_chain_rules)
        self.assertEqual(drift.describe(), "1 missing member(s): 10.9.0.6; 1 extra member(s): 10.9.0.7")

    def test_flushed_chain_and_displaced_jump_are_detected(self):
        """An emptied nat chain and a filter jump that is no longer first are both rule drift."""
        nat = HEALTHY_NAT.replace("-A POCKETPROXY -m addrtype --dst-type LOCAL -j RETURN\n", "")
        filt = HEALTHY_FILTER.replace(
            "-A FORWARD -i tun+ -j POCKETPROXY\n", "-A FORWARD -j ACCEPT\n-A FORWARD -i tun+ -j POCKETPROXY\n"
        )
        fw, _, _ = make(filt, nat, ipset=FakeIPSet())
        drift = self.successResultOf(fw.check(set()))
        self.assertTrue(drift.missing_chain_rules)
        self.assertEqual(
            drift.rule_problems,
            (
                "filter FORWARD: jump to POCKETPROXY is not at position 1",
                "nat POCKETPROXY: rules differ",
                "filter FORWARD: jump to POCKETPROXY-UL is not at position 2",
            ),
        )
        self.assertFalse(drift.ok)

    def test_missing_everything(self):
        """Empty tables and no set: every jump and chain missing, set missing, all members missing."""
        fw, _, _ = make(ipset=FakeIPSet(exists=False))
        drift = self.successResultOf(fw.check({A}))
        self.assertEqual(
            drift.rule_problems,
            (
                "filter FORWARD: jump to POCKETPROXY missing",
                "filter POCKETPROXY: chain missing",
                "filter INPUT: jump to POCKETPROXY-IN missing",
                "filter POCKETPROXY-IN: chain missing",
                "nat PREROUTING: jump to POCKETPROXY missing",
                "nat POCKETPROXY: chain missing",
                "filter FORWARD: jump to POCKETPROXY-UL missing",
                "filter POCKETPROXY-UL: chain missing",
                "filter INPUT: jump to POCKETPROXY-UL missing",
            ),
        )
        self.assertTrue(drift.set_missing)
        self.assertEqual(drift.missing_members, {A})
        self.assertIn("ipset missing", drift.describe())

    def test_duplicate_jumps_are_drift(self):
        """Two jumps (the first at position 1) still count as drift."""
        nat = HEALTHY_NAT + "-A PREROUTING -i tun+ -j POCKETPROXY\n"
        fw, _, _ = make(HEALTHY_FILTER, nat)
        drift = self.successResultOf(fw.check(set()))
        self.assertEqual(drift.rule_problems, ("nat PREROUTING: 2 jumps to POCKETPROXY",))

    def test_check_fails_when_set_cannot_be_read(self):
        """A list error other than 'does not exist' is a FirewallError, not drift."""
        fw, _, _ = make(HEALTHY_FILTER, HEALTHY_NAT, ipset=FakeIPSet(fail_members=True))
        self.failureResultOf(fw.check(set()), FirewallError)

    def test_sync_members_without_drift_only_reads(self):
        """Members already right -> one netlink read, no change, no iptables."""
        fw, runner, ipset = make(HEALTHY_FILTER, HEALTHY_NAT, ipset=FakeIPSet(members=[A]))
        self.assertEqual(fw.sync_members({A}), MemberSync())
        self.assertEqual(runner.argvs(), [])
        self.assertEqual([c[0] for c in ipset.calls], ["members"])

    def test_sync_members_adds_missing_and_removes_extra(self):
        """The one member repair: missing added, extra removed, no iptables-restore."""
        fw, runner, ipset = make(HEALTHY_FILTER, HEALTHY_NAT, ipset=FakeIPSet(members=[C]))
        self.assertEqual(fw.sync_members({A, B}), MemberSync(added=(A, B), removed=(C,)))
        self.assertNotIn(RESTORE, runner.argvs())
        self.assertEqual(ipset.content, {A, B})

    def test_sync_members_reports_partial_failure(self):
        """A member that cannot be re-added is reported by address and reason; extras still go."""
        fake = FakeIPSet(members=[C])
        fake.fail_next_add = IPSetError("add", fake.name, A, IPSET_ERR_HASH_FULL)
        fw, _, _ = make(HEALTHY_FILTER, HEALTHY_NAT, ipset=fake)
        sync = fw.sync_members({A})
        self.assertEqual((sync.added, sync.removed), ((), (C,)))
        [(ip, error)] = sync.failed
        self.assertEqual(ip, A)
        self.assertIn("cannot add 10.9.0.5", error)
        self.assertIn("set is full", error)
        self.assertEqual(fake.content, set())

    def test_sync_members_of_an_unreadable_set_adds_and_never_removes(self):
        """The set cannot be listed: every expected member is (re-)added, nothing is removed."""
        fake = FakeIPSet(members=[C], fail_members=True)
        fw, _, _ = make(HEALTHY_FILTER, HEALTHY_NAT, ipset=fake)
        sync = fw.sync_members({A})
        self.assertEqual((sync.added, sync.removed), ((A,), ()))
        self.assertIn("cannot list ipset", sync.unreadable)
        self.assertEqual(fake.content, {A, C})

    def test_check_takes_expected_members_as_a_callable_read_once(self):
        """A callable ``expected`` is read once, with the set (test_verify shows it is after the listings)."""
        fw, _, _ = make(HEALTHY_FILTER, HEALTHY_NAT, ipset=FakeIPSet(members=[A]))
        reads = []
        drift = self.successResultOf(fw.check(lambda: reads.append(1) or {A, B}))
        self.assertEqual((reads, drift.missing_members, drift.extra_members), ([1], {B}, frozenset()))


def test_drift_describe_abbreviates_long_lists():
    """describe() stays one line for many members."""
    many = frozenset(IPv4Address("10.9.0.%d" % i) for i in range(10, 20))
    text = Drift(missing_members=many).describe()
    assert text == "10 missing member(s): 10.9.0.10, 10.9.0.11, 10.9.0.12, 10.9.0.13, 10.9.0.14, ... (+5 more)"
    assert "\n" not in text


def test_rule_problems_empty_for_healthy_listing():
    """The healthy listing (as iptables 1.8.9 prints it) matches the rules we generate."""
    listings = {"filter": HEALTHY_FILTER.splitlines(), "nat": HEALTHY_NAT.splitlines()}
    assert rule_problems(CONFIG, PORT, listings, subnet=SUBNET) == []
    assert rule_problems(CONFIG, PORT + 1, listings, subnet=SUBNET) == [
        "filter POCKETPROXY-IN: rules differ",  # accepts the proxy port only when redirected there
        "nat POCKETPROXY: rules differ",
    ]
    assert rule_problems(CONFIG, PORT, listings, dns=("10.9.0.1", 53), subnet=SUBNET) == [
        "filter POCKETPROXY-IN: rules differ",  # the DNS service is not open
        "nat POCKETPROXY: rules differ",  # members' DNS is not intercepted
        "filter POCKETPROXY-UL: rules differ",  # nor closed to the underlay
    ]
    assert rule_problems(CONFIG, PORT, listings) == ["filter POCKETPROXY-UL: rules differ"]  # no anti-spoofing


def test_input_chain_admits_dns_only_when_enabled_and_only_from_members():
    """With the DNS service on, members may reach exactly its address and port over UDP and TCP."""
    text = restore_input(CONFIG, PORT, {}, dns=("10.9.0.1", 5353)).decode()
    dns = [line for line in text.splitlines() if "5353" in line and "POCKETPROXY-IN" in line]
    assert dns == [
        "-A POCKETPROXY-IN -d 10.9.0.1/32 -p udp -m set --match-set pocketproxy-clients src -m udp --dport 5353 -j ACCEPT",
        "-A POCKETPROXY-IN -d 10.9.0.1/32 -p tcp -m set --match-set pocketproxy-clients src -m tcp --dport 5353 -j ACCEPT",
    ]
    lines = text.splitlines()
    assert lines.index(dns[-1]) < lines.index("-A POCKETPROXY-IN -p udp -j REJECT --reject-with icmp-port-unreachable")
    assert "--dport 53 " not in restore_input(CONFIG, PORT, {}).decode()


def test_every_members_dns_is_intercepted_to_the_dns_service():
    """Port 53 from members, UDP and TCP, to ANY address (8.8.8.8, the home router, the server
    itself) is DNATed to the DNS service first, before the local-destination exemption and before
    the TCP REDIRECT to the proxy would send TCP 53 through the phone."""
    text = restore_input(CONFIG, PORT, {}, dns=("10.9.0.1", 5353)).decode()
    nat = text.split("*nat\n")[1].split("COMMIT")[0].splitlines()
    assert nat[1:5] == [
        "-A POCKETPROXY -p udp -m set --match-set pocketproxy-clients src -m udp --dport 53 -j DNAT --to-destination 10.9.0.1:5353",
        "-A POCKETPROXY -p tcp -m set --match-set pocketproxy-clients src -m tcp --dport 53 -j DNAT --to-destination 10.9.0.1:5353",
        "-A POCKETPROXY -m addrtype --dst-type LOCAL -j RETURN",
        "-A POCKETPROXY -p tcp -m set --match-set pocketproxy-clients src -j REDIRECT --to-ports %d" % PORT,
    ]
    assert "-j DNAT" not in restore_input(CONFIG, PORT, {}).decode(), "no DNS service, no interception"


def test_tproxy_mode_intercepts_dns_in_a_nat_chain_of_its_own():
    """With TPROXY the DNS lines form a nat chain; the mangle chain leaves members' TCP 53 to it."""
    config = FirewallConfig(tproxy_mark=0x20)
    dns = ("10.9.0.1", 53)
    text = restore_input(config, PORT, {}, mode="tproxy", dns=dns).decode()
    mangle = text.split("*mangle\n")[1].split("COMMIT")[0].splitlines()
    assert mangle[1:4] == [
        "-A POCKETPROXY -m addrtype --dst-type LOCAL -j RETURN",
        "-A POCKETPROXY -p tcp -m set --match-set pocketproxy-clients src -m tcp --dport 53 -j RETURN",
        "-A POCKETPROXY -p tcp -m set --match-set pocketproxy-clients src"
        " -j TPROXY --on-port 12345 --on-ip 0.0.0.0 --tproxy-mark 0x20/0x20",
    ]
    nat = text.split("*nat\n")[1].split("COMMIT")[0].splitlines()
    assert [line for line in nat if "DNAT" in line] == [
        "-A POCKETPROXY -p udp -m set --match-set pocketproxy-clients src -m udp --dport 53 -j DNAT --to-destination 10.9.0.1:53",
        "-A POCKETPROXY -p tcp -m set --match-set pocketproxy-clients src -m tcp --dport 53 -j DNAT --to-destination 10.9.0.1:53",
    ]
    assert "-I PREROUTING 1 -i tun+ -j POCKETPROXY" in nat
    assert rule_problems(config, PORT, {}, mode="tproxy", dns=dns)[-5:-3] == [
        "nat PREROUTING: jump to POCKETPROXY missing",
        "nat POCKETPROXY: chain missing",
    ]


# --- ProcessRunner with a fake process reactor ----------------------------------


class FakeProcessTransport:
    def __init__(self, pid):
        self.pid = pid
        self.written = []
        self.stdin_closed = False
        self.signals = []

    def write(self, data):
        self.written.append(data)

    def closeStdin(self):
        self.stdin_closed = True

    def signalProcess(self, sig):
        if self.pid is None:
            raise error.ProcessExitedAlready()
        self.signals.append(sig)


class ProcessReactor(MemoryReactorClock):
    """MemoryReactorClock plus a recording spawnProcess."""

    def __init__(self):
        super().__init__()
        self.spawned = []

    def spawnProcess(self, protocol, executable, args=(), env=None, path=None, **kw):
        transport = FakeProcessTransport(4242 + len(self.spawned))
        self.spawned.append((protocol, executable, list(args), env, transport))
        protocol.makeConnection(transport)
        return transport


class RunnerTests(SynchronousTestCase):
    def setUp(self):
        self.bindir = tempfile.mkdtemp(prefix="pp-runner-test-")
        self.addCleanup(shutil.rmtree, self.bindir)
        tool = os.path.join(self.bindir, "fw-tool")
        with open(tool, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(tool, stat.S_IRWXU)
        self.tool = tool
        self.reactor = ProcessReactor()
        self.runner = ProcessRunner(self.reactor, timeout=10.0, env={"PATH": self.bindir})

    def test_success_collects_output_and_writes_stdin(self):
        """argv[0] is resolved on PATH, stdin is written then closed, stdout/stderr are collected."""
        d = self.runner.run(["fw-tool", "-t", "nat"], stdin=b"*nat\nCOMMIT\n")
        proto, executable, args, env, transport = self.reactor.spawned[0]
        self.assertEqual((executable, args), (self.tool, ["fw-tool", "-t", "nat"]))
        self.assertEqual(env["LC_ALL"], "C")
        self.assertEqual((transport.written, transport.stdin_closed), ([b"*nat\nCOMMIT\n"], True))
        self.assertNoResult(d)
        proto.childDataReceived(1, b"out1 ")
        proto.childDataReceived(2, b"err")
        proto.childDataReceived(1, b"out2")
        proto.processEnded(Failure(error.ProcessDone(0)))
        self.assertEqual(self.successResultOf(d), (0, b"out1 out2", b"err"))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_nonzero_exit_is_a_result_not_an_error(self):
        """Exit 2 fires (2, out, err); a signal death fires -SIGNUM."""
        d = self.runner.run(["fw-tool"])
        self.reactor.spawned[0][0].processEnded(Failure(error.ProcessTerminated(exitCode=2)))
        self.assertEqual(self.successResultOf(d), (2, b"", b""))
        d = self.runner.run(["fw-tool"])
        self.reactor.spawned[1][0].processEnded(Failure(error.ProcessTerminated(signal=15)))
        self.assertEqual(self.successResultOf(d)[0], -15)

    def test_timeout_kills_child_and_errbacks(self):
        """After `timeout` seconds on the clock the child gets SIGKILL (by PID) and the Deferred fails."""
        d = self.runner.run(["fw-tool"])
        transport = self.reactor.spawned[0][4]
        self.reactor.advance(9.9)
        self.assertNoResult(d)
        self.assertEqual(transport.signals, [])
        self.reactor.advance(0.1)
        self.assertEqual(transport.signals, ["KILL"])
        failure = self.failureResultOf(d, CommandTimeout)
        self.assertEqual(str(failure.value), "fw-tool: no result after 10s; killed")
        # The reaped child's processEnded afterwards must not fire the Deferred again.
        self.reactor.spawned[0][0].processEnded(Failure(error.ProcessTerminated(signal=9)))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_separate_clock_drives_the_timeout(self):
        """An injected clock, not the reactor, decides when the timeout fires."""
        from twisted.internet.task import Clock

        clock = Clock()
        runner = ProcessRunner(self.reactor, timeout=1.0, clock=clock, env={"PATH": self.bindir})
        d = runner.run(["fw-tool"])
        self.reactor.advance(5)
        self.assertNoResult(d)
        clock.advance(1)
        self.failureResultOf(d, CommandTimeout)

    def test_cancel_kills_child(self):
        """Cancelling the Deferred kills the child and leaves no timer behind."""
        d = self.runner.run(["fw-tool"])
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.reactor.spawned[0][4].signals, ["KILL"])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_missing_command(self):
        """An executable not on PATH fails at once without spawning."""
        failure = self.failureResultOf(self.runner.run(["no-such-fw-tool-xyz"]), CommandNotFound)
        self.assertIn("no-such-fw-tool-xyz: command not found", str(failure.value))
        self.assertEqual(self.reactor.spawned, [])


def test_command_environment_adds_sbin():
    """Children find /usr/sbin/iptables even when the daemon's PATH lacks sbin; output is C locale."""
    env = command_environment({"PATH": "/opt/bin", "HOME": "/x"})
    assert env["PATH"].split(":")[0] == "/opt/bin"
    assert "/usr/sbin" in env["PATH"].split(":") and "/sbin" in env["PATH"].split(":")
    assert env["LC_ALL"] == "C" and env["HOME"] == "/x"


def test_fake_runner_records_and_answers_by_longest_prefix():
    """FakeRunner: calls recorded with stdin; the most specific canned answer wins; default is success."""
    runner = FakeRunner()
    runner.on(["iptables"], exit_code=1)
    runner.on(["iptables", "-w", "-t", "nat"], stdout=b"nat")
    results = []
    runner.run(["iptables", "-w", "-t", "nat", "-S"]).addCallback(results.append)
    runner.run(["iptables", "-L"]).addCallback(results.append)
    runner.run(["true"], b"in").addCallback(results.append)
    assert results == [(0, b"nat", b""), (1, b"", b""), (0, b"", b"")]
    assert runner.calls[-1] == (["true"], b"in")


def test_golden_restore_text_in_tproxy_mode():
    """TPROXY mode owns a mangle chain (not nat) with the mark the policy rule matches."""
    config = FirewallConfig(tproxy_mark=0x20)
    text = restore_input(config, PORT, {}, mode="tproxy", subnet=SUBNET).decode()
    assert text == (
        GOLDEN.decode()
        .split("*nat")[0]
        .replace(
            "-p tcp -m tcp --dport 12345 -m conntrack --ctstate DNAT -j ACCEPT",  # no DNAT with TPROXY
            "-p tcp -m mark --mark 0x20/0x20 -j ACCEPT",
        )
        + "*mangle\n"
        ":POCKETPROXY - [0:0]\n"
        "-A POCKETPROXY -m addrtype --dst-type LOCAL -j RETURN\n"
        "-A POCKETPROXY -p tcp -m set --match-set pocketproxy-clients src"
        " -j TPROXY --on-port 12345 --on-ip 0.0.0.0 --tproxy-mark 0x20/0x20\n"
        "-I PREROUTING 1 -i tun+ -j POCKETPROXY\n"
        "COMMIT\n"
    )
    assert rule_problems(config, PORT, {}, mode="tproxy") == [
        "filter FORWARD: jump to POCKETPROXY missing",
        "filter POCKETPROXY: chain missing",
        "filter INPUT: jump to POCKETPROXY-IN missing",
        "filter POCKETPROXY-IN: chain missing",
        "mangle PREROUTING: jump to POCKETPROXY missing",
        "mangle POCKETPROXY: chain missing",
        "filter FORWARD: jump to POCKETPROXY-UL missing",
        "filter POCKETPROXY-UL: chain missing",
        "filter INPUT: jump to POCKETPROXY-UL missing",
    ]


# --- IPv6 fail closed, the underlay guard, devices (issue 14) ---------------------------------


def directory(**upstreams):
    return Directory({name: Device(name, Upstream.parse(url)) for name, url in upstreams.items()}, {})


def test_devices_are_the_ip_literal_upstream_hosts_plus_the_configured_networks():
    """/32 and /128 per IP-literal host, the operator's networks, sorted v4 first; names are reported."""
    d = directory(
        a="http://u:p@192.168.255.2:8080", b="socks5://[2001:db8:7::2]:1080", c="http://phone.example:8080",
        d="http://192.168.255.2:3128",
    )
    devices = Devices.of(d, (IPv4Network("192.168.42.0/24"),))
    assert [str(n) for n in devices.networks] == ["192.168.42.0/24", "192.168.255.2/32", "2001:db8:7::2/128"]
    assert devices.unresolved == ("c",)
    assert Devices.of(None) == Devices()


UNDERLAY_GUARDED = [
    "-A POCKETPROXY-UL -i lo -j RETURN",
    "-A POCKETPROXY-UL -s 10.9.0.0/24 -j DROP",
    "-A POCKETPROXY-UL -d 10.9.0.1/32 -p udp -m udp --dport 53 -j REJECT --reject-with icmp-port-unreachable",
    "-A POCKETPROXY-UL -d 10.9.0.1/32 -p tcp -m tcp --dport 53 -j REJECT --reject-with tcp-reset",
    "-A POCKETPROXY-UL -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
    "-A POCKETPROXY-UL -p tcp -m tcp --dport 22 -j RETURN",
    "-A POCKETPROXY-UL -p udp -m udp --dport 60000:61000 -j RETURN",
    "-A POCKETPROXY-UL -p icmp -m icmp --icmp-type 8 -j RETURN",
    "-A POCKETPROXY-UL -s 192.168.42.0/24 -j POCKETPROXY",
    "-A POCKETPROXY-UL -s 192.168.255.2/32 -j POCKETPROXY",
]


def test_underlay_guard_text_with_dns_devices_and_allowed_ports():
    """Anti-spoofing and the DNS service first (absolute), then replies, the operator's allowances,
    and every device network sent to the reject chain; IPv6 gets its devices, ND and ping."""
    config = FirewallConfig(
        device_allow=(("tcp", 22, 22), ("udp", 60000, 61000), ("icmp", None, None)),
        device_networks=(IPv4Network("192.168.42.0/24"),),
    )
    devices = Devices.of(directory(a="http://192.168.255.2:8080", b="http://[2001:db8:7::2]:8080"), config.device_networks)
    text = restore_input(config, PORT, {}, dns=("10.9.0.1", 53), subnet=SUBNET, devices=devices).decode()
    assert [line for line in text.splitlines() if line.startswith("-A POCKETPROXY-UL ")] == UNDERLAY_GUARDED
    text6 = restore_input(config, PORT, {}, dns=("10.9.0.1", 53), family=IP6, subnet=SUBNET, devices=devices).decode()
    assert [line for line in text6.splitlines() if line.startswith("-A POCKETPROXY-UL ")] == [
        "-A POCKETPROXY-UL -i lo -j RETURN",
        "-A POCKETPROXY-UL -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        "-A POCKETPROXY-UL -p ipv6-icmp -m icmp6 --icmpv6-type 135 -j RETURN",
        "-A POCKETPROXY-UL -p ipv6-icmp -m icmp6 --icmpv6-type 136 -j RETURN",
        "-A POCKETPROXY-UL -p tcp -m tcp --dport 22 -j RETURN",
        "-A POCKETPROXY-UL -p udp -m udp --dport 60000:61000 -j RETURN",
        "-A POCKETPROXY-UL -p ipv6-icmp -m icmp6 --icmpv6-type 128 -j RETURN",
        "-A POCKETPROXY-UL -s 2001:db8:7::2/128 -j POCKETPROXY",
    ]
    assert "DNAT" not in text6 and "10.9.0" not in text6 and "*nat" not in text6


class IPv6AndDeviceTests(SynchronousTestCase):
    def test_ip6_drift_is_reported_and_repaired(self):
        """A deleted ip6 jump is drift worded 'ip6 filter ...'; repair runs ip6tables-restore only where needed."""
        fw, runner, _ = make(
            HEALTHY_FILTER, HEALTHY_NAT, filter6_s=HEALTHY_FILTER6.replace("-A FORWARD -i tun+ -j POCKETPROXY\n", "")
        )
        drift = self.successResultOf(fw.check(set()))
        self.assertEqual(drift.rule_problems, ("ip6 filter FORWARD: jump to POCKETPROXY missing",))
        self.successResultOf(fw.install())
        self.assertIn(b"-I FORWARD 1 -i tun+ -j POCKETPROXY\n", restored(runner, RESTORE6))
        fw, _, _ = make(HEALTHY_FILTER, HEALTHY_NAT)
        self.assertTrue(self.successResultOf(fw.check(set())).ok)

    def test_ip6tables_restore_failure_fails_the_install(self):
        """Fail closed: IPv6 rules that cannot be installed are a FirewallError like IPv4's."""
        fw, runner, _ = make()
        runner.on(RESTORE6, exit_code=2, stderr=b"ip6tables-restore: unable to initialize table 'filter'\n")
        failure = self.failureResultOf(fw.install(), FirewallError)
        self.assertIn("ip6tables-restore -w --noflush exited 2", str(failure.value))

    def test_host_without_ipv6_warns_once_and_runs_no_ip6tables(self):
        """No /proc/net/if_inet6: one warning, IPv4 only, and check() does not ask ip6tables."""
        events = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.assertEqual(make(ipv6=None)[0].ipv6, os.path.exists("/proc/net/if_inet6"))
        self.patch(Firewall, "IF_INET6", "/nonexistent/pocketproxy-test/if_inet6")  # a host without IPv6
        fw, runner, _ = make(ipv6=None)
        self.assertFalse(fw.ipv6)
        self.successResultOf(fw.install())
        self.successResultOf(fw.install())
        self.successResultOf(fw.check(set()))
        self.assertNotIn(FILTER6_S, runner.argvs())
        self.assertNotIn(RESTORE6, runner.argvs())
        warnings = [e for e in events if "no IPv6" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)

    def test_follow_reinstalls_only_after_install_and_only_on_change(self):
        """Before the first install a reloaded device list is just kept; afterwards a change re-installs,
        an unchanged list does not; devices named by a DNS name are named in a warning."""
        events = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        fw, runner, _ = make(directory=directory(a="http://192.168.255.2:8080"))
        self.successResultOf(fw.follow(directory(a="http://192.168.255.3:8080", n="http://phone.example:1")))
        self.assertEqual(runner.calls, [])
        self.successResultOf(fw.install())
        self.assertIn(b"-A POCKETPROXY-UL -s 192.168.255.3/32 -j POCKETPROXY\n", restored(runner))
        self.assertEqual([e["names"] for e in events if "names" in e], ["n"])
        before = len(runner.calls)
        self.successResultOf(fw.follow(directory(a="http://192.168.255.3:8080", n="http://phone.example:1")))
        self.assertEqual(len(runner.calls), before)
        self.successResultOf(fw.follow(directory(b="http://192.168.255.4:8080")))
        text = restored(runner)
        self.assertIn(b"-s 192.168.255.4/32", text)
        self.assertNotIn(b"192.168.255.3", text)

    def test_follow_failure_is_logged_not_raised(self):
        """A failed re-install after a reload is logged; the periodic check repairs it later."""
        fw, runner, _ = make()
        self.successResultOf(fw.install())
        runner.on(RESTORE, exit_code=1, stderr=b"boom\n")
        self.assertIsNone(self.successResultOf(fw.follow(directory(a="http://192.168.255.9:8080"))))
        self.assertEqual(fw.devices.networks, (IPv4Network("192.168.255.9/32"),))


def test_device_keys_config(tmp_path):
    """firewall.device_allow parses to (proto, low, high); device_networks to v4/v6 networks."""
    from tests.unit.daemon_config import config

    fw = config(
        tmp_path,
        "firewall: {device_allow: [tcp/22, udp/123, tcp/8000-8100, icmp], device_networks: [192.168.42.0/24, '2001:db8::/64']}\n",
    ).firewall
    assert fw.device_allow == (("tcp", 22, 22), ("udp", 123, 123), ("tcp", 8000, 8100), ("icmp", None, None))
    assert [str(n) for n in fw.device_networks] == ["192.168.42.0/24", "2001:db8::/64"]
    assert config(tmp_path).firewall.device_allow == () == config(tmp_path).firewall.device_networks


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("device_allow", "[ssh]", "expected tcp/PORT, udp/PORT, tcp/LOW-HIGH or icmp, got 'ssh'"),
        ("device_allow", "[tcp/0]", "ports must be 1-65535, low before high, got 'tcp/0'"),
        ("device_allow", "[udp/9-3]", "ports must be 1-65535, low before high, got 'udp/9-3'"),
        ("device_allow", "tcp/22", "expected a list such as"),
        ("device_networks", "[192.168.1.5/24]", "has host bits set"),
    ],
)
def test_device_keys_are_validated_at_load(tmp_path, key, value, words):
    """Bad values name the file, the key and the problem."""
    from tests.unit.daemon_config import problem

    text = problem(tmp_path, "firewall: {%s: %s}\n" % (key, value))
    assert "pocketproxy.yaml: firewall.%s: " % key in text and words in text, text
