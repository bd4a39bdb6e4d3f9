"""Fault matrix, unit level: 1,000 random connect/disconnect/REAUTH cycles with faults at every admission step.

A real :class:`~ovpnmgr.controller.Controller` and a real
:class:`~ovpnmgr.protocol.ManagementProtocol` talk to a *model* OpenVPN server
(:class:`FakeOpenVPN`) through :class:`~ovpnmgr.testing.ScriptedManagement`:
the model keeps its own client table (CID, KID, state, pushed address), answers
``client-auth``/``client-deny``/``client-kill``/``client-auth-nt``/``status 3``
from that table, loses notifications while nobody is attached and restarts CIDs
at 0 on SIGHUP, like OpenVPN 2.6 does. The kernel is a :class:`FakeIPSet` plus a
tiny stateful ``iptables`` (:class:`FakeIptables`) that holds an unrelated DNAT
rule; a :class:`~ovpnmgr.verify.FirewallVerifier` runs on the same ``Clock``.

Faults injected (each is counted, and the test asserts every kind happened):

* directory: wrong password / unknown user (plain deny), directory error (TEMP deny),
  slow directory (the answer comes later, possibly after the client left, the
  management socket dropped, or OpenVPN restarted);
* ipset add failure (TEMP deny);
* mapping conflict while installing the mapping (TEMP deny);
* ``client-auth`` answered ``ERROR`` (CommandFailed: the client left);
* ``client-auth`` never answered (management command timeout → the protocol drops
  the connection → reattach and reconcile);
* management connection lost mid-admission (with notifications lost meanwhile);
* OpenVPN SIGHUP (all DISCONNECTs, ``>STATE:RECONNECTING``, CIDs restart at 0);
* the ipset or the iptables chains changed behind pocketproxy's back (the
  periodic verifier repairs them).

Invariants checked after *every* step: the fake ipset == the controller's
expected members == the pool's held addresses == the mapping table's addresses,
each owned by the live session holding it and pointing at its user's device;
the DNAT rule untouched. After each *settle* (reattach, let slow answers land,
deliver queued notifications) and at the end, also against OpenVPN's view: no
client left pending, every admitted client of the model has exactly that
address in the set and the mapping table, every refused CONNECT was answered
``client-deny`` (TEMP for what may pass, plain for bad credentials) or killed
after reconnect and left nothing behind, no command Deferred outstanding, no
delayed call but the verifier's loop, and no unexpected exception logged.
"""

import ipaddress
import random
import time

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from ovpnmgr.config import FirewallConfig, OpenVPNConfig
from ovpnmgr.controller import Controller
from ovpnmgr.operations import Operations
from ovpnmgr.session import TemporaryFailure
from ovpnmgr.directory import Directory, hash_password
from ovpnmgr.firewall import Firewall
from ovpnmgr.ipset import FakeIPSet, IPSetError
from ovpnmgr.pool import AddressPool
from ovpnmgr.process import FakeRunner
from ovpnmgr.testing import ScriptedManagement, connect_env, status3_lines
from ovpnmgr.verify import FirewallVerifier
from proxy.mappings import MappingTable

IP = ipaddress.IPv4Address
SUBNET = ipaddress.IPv4Network("10.9.0.0/24")
SERVER = IP("10.9.0.1")
HASH = hash_password("pw", n=16)
STATIC = IP("10.9.0.77")
USERS = """
devices:
  p1: {upstream: "http://192.168.255.2:8080"}
  p2: {upstream: "socks5://192.168.255.3:1080"}
  p3: {upstream: "http://192.168.255.4:3128"}
users:
  u0: {password: "%(h)s", device: p1}
  u1: {password: "%(h)s", device: p2}
  u2: {password: "%(h)s", device: p3}
  u3: {password: "%(h)s", device: p1}
  u4: {password: "%(h)s", device: p2}
  u5: {password: "%(h)s", device: p3}
  st: {password: "%(h)s", device: p1, address: %(static)s}
  certy: {common_name: certy-cn, device: p2}
""" % {"h": HASH, "static": STATIC}
PASSWORD_USERS = ["u0", "u1", "u2", "u3", "u4", "u5", "st"]
VERIFY_INTERVAL = 30.0
COMMAND_TIMEOUT = 5.0

DNAT = "-A PREROUTING -p tcp -m tcp --dport 8080 -j DNAT --to-destination 192.168.255.2:8080"
# The kernel before pocketproxy: built-in policies and an operator's unrelated DNAT rule. The
# healthy state is whatever Firewall.install() makes of it (FaultWorld installs at start), so the
# model follows the firewall's layout instead of copying it.
BARE = {
    "filter": ["-P INPUT ACCEPT", "-P FORWARD ACCEPT", "-P OUTPUT ACCEPT"],
    "nat": ["-P PREROUTING ACCEPT", "-P INPUT ACCEPT", "-P OUTPUT ACCEPT", "-P POSTROUTING ACCEPT", DNAT],
    "ip6 filter": ["-P INPUT ACCEPT", "-P FORWARD ACCEPT", "-P OUTPUT ACCEPT"],
}


class FakeIptables:
    """Just enough stateful ``iptables -S`` / ``iptables-restore --noflush`` for pocketproxy's plan."""

    def __init__(self):
        self.tables = {t: list(lines) for t, lines in BARE.items()}
        self.restores = []
        self.runner = FakeRunner()
        for key in self.tables:
            family, _, table = key.rpartition(" ")
            self.runner.on([family + "tables" if family else "iptables", "-w", "-t", table, "-S"], handler=self._list)
        self.runner.on(["iptables-restore"], handler=self._restore)
        self.runner.on(["ip6tables-restore"], handler=self._restore)

    @staticmethod
    def _prefix(argv):
        return "ip6 " if argv[0].startswith("ip6tables") else ""

    def _list(self, argv, stdin):
        return 0, ("\n".join(self.tables[self._prefix(argv) + argv[3]]) + "\n").encode(), b""

    def _restore(self, argv, stdin):
        text = stdin.decode()
        self.restores.append(text)
        work = {t: list(lines) for t, lines in self.tables.items()}
        table = None
        for line in text.splitlines():
            if line.startswith("*"):
                table = self._prefix(argv) + line[1:]
            elif line == "COMMIT":
                self.tables[table] = work[table]  # each COMMIT is its own transaction
            elif line.startswith(":"):
                chain = line[1:].split()[0]
                lines = [x for x in work[table] if not x.startswith("-A %s " % chain)]
                if "-N %s" % chain not in lines:
                    lines.append("-N %s" % chain)
                work[table] = lines
            elif line.startswith("-A "):
                work[table].append(line)
            elif line.startswith("-D "):
                rule = "-A " + line[3:]
                if rule not in work[table]:
                    return 1, b"", b"iptables-restore: line failed: %s\n" % line.encode()
                work[table].remove(rule)
            elif line.startswith("-I "):
                _, builtin, pos, spec = line.split(" ", 3)
                lines = work[table]
                positions = [i for i, x in enumerate(lines) if x.startswith("-A %s " % builtin)] + [len(lines)]
                lines.insert(positions[int(pos) - 1], "-A %s %s" % (builtin, spec))
            else:
                return 1, b"", b"unknown line %s\n" % line.encode()
        return 0, b"", b""

    def flush_chain(self, table):
        self.tables[table] = [x for x in self.tables[table] if not x.startswith("-A POCKETPROXY ")]

    def delete_jump(self, table):
        builtin = "FORWARD" if table == "filter" else "PREROUTING"
        self.tables[table].remove("-A %s -i tun+ -j POCKETPROXY" % builtin)

    def assert_unrelated_rule_untouched(self):
        nat = self.tables["nat"]
        assert nat.count(DNAT) == 1, nat
        prerouting = [x for x in nat if x.startswith("-A PREROUTING ")]
        assert DNAT in prerouting
        for text in self.restores:  # never deleted, re-added or moved by a restore
            assert "--to-destination" not in text and "--dport 8080" not in text, text


class DirectoryDown(Exception):
    """The directory cannot answer (a temporary failure)."""


class FlakyDirectory:
    """The real directory, with an injectable error or delay for the next ``authenticate``."""

    def __init__(self, real):
        self.real = real
        self.next = None  # None | "error" | "slow"
        self.slow = []  # [(pending Deferred, real outcome)]

    def __getattr__(self, name):
        return getattr(self.real, name)

    def authenticate(self, username, password, common_name, run_blocking=None):
        mode, self.next = self.next, None
        if mode == "error":
            return defer.fail(DirectoryDown("directory unreachable"))
        d = self.real.authenticate(username, password, common_name, run_blocking)
        if mode != "slow":
            return d
        outcome = []
        d.addBoth(outcome.append)
        pending = defer.Deferred()
        self.slow.append((pending, outcome[0]))
        return pending

    def fire(self, index):
        pending, outcome = self.slow.pop(index)
        if isinstance(outcome, Failure):
            pending.errback(outcome)
        else:
            pending.callback(outcome)


class FlakyMappings(MappingTable):
    """A mapping table whose next ``transfer`` can fail (the admission's last step: the ledger must
    undo the address and the kernel member it already holds)."""

    fail_next = False

    def transfer(self, ip, route, owner):
        if self.fail_next:
            self.fail_next = False
            raise TemporaryFailure("cannot map %s (injected)" % ip)
        return super().transfer(ip, route, owner)


class Client:
    """One client instance as the model OpenVPN server sees it."""

    def __init__(self, cid, kid, user, password, expect, port):
        self.cid = cid
        self.kid = kid
        self.user = user
        self.password = password
        self.expect = expect  # "admit" | "temp" | "final"
        self.port = port
        self.state = "pending"  # -> "authorized" -> "established"
        self.address = None
        self.reauth_kid = None

    @property
    def real_address(self):
        return "198.51.100.7:%d" % self.port

    def env(self, **extra):
        if self.user == "certy":
            env = connect_env(username="", password="", untrusted_port=self.port, common_name="certy-cn")
        else:
            env = connect_env(username=self.user, password=self.password, untrusted_port=self.port)
        env.update(extra)
        return env


class FaultWorld:
    """The controller wired to fakes, plus a model OpenVPN server with fault injection."""

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.clock = Clock()
        self.config = OpenVPNConfig(
            management="unix:/x", subnet=SUBNET, server_address=SERVER, temp_backoff=7, command_timeout=COMMAND_TIMEOUT
        )
        self.directory = FlakyDirectory(Directory.parse(USERS, "users.yaml", SUBNET, SERVER))
        self.pool = AddressPool(SUBNET, SERVER, static=self.directory.static_addresses())
        self.ipset = FakeIPSet()
        self.iptables = FakeIptables()
        self.firewall = Firewall(FirewallConfig(), 12345, SUBNET, self.ipset, self.iptables.runner, ipv6=True)
        self.mappings = FlakyMappings()
        self.controller = Controller(self.clock, self.config, self.directory, self.pool, self.firewall, self.mappings)
        installed = []
        self.firewall.install().addBoth(installed.append)
        assert installed == [None], installed
        self.operations = Operations(self.controller)
        self.verifier = FirewallVerifier(self.clock, self.operations, VERIFY_INTERVAL)
        self.verifier.startService()
        # the model server
        self.clients = {}  # cid -> Client
        self.next_cid = 0
        self.next_port = 30000
        self.queued = []  # notifications waiting for delivery: ("disconnect", cid) | ("establish", cid)
        self.client_auth_fault = None  # None | "error" | "timeout" for the next client-auth
        self.withheld = False  # a client-auth reply is being withheld (timeout pending)
        self.violations = []
        self.counts = {}
        self.attach_results = []
        self.failures = []  # unexpected exceptions logged by pocketproxy
        self.script = None
        globalLogPublisher.addObserver(self._observe)
        self.attach()

    def close(self):
        globalLogPublisher.removeObserver(self._observe)
        self.verifier.stopService()

    def _observe(self, event):
        failure = event.get("log_failure")
        if failure is not None and not failure.check(DirectoryDown):  # the injected directory error is logged by design
            self.failures.append(event)

    def count(self, kind):
        self.counts[kind] = self.counts.get(kind, 0) + 1

    # --- the management connection --------------------------------------------------------

    def attach(self):
        script = ScriptedManagement(clock=self.clock, auto_reply=True, command_timeout=COMMAND_TIMEOUT)
        script.set_reply("status", lambda command: self._status())
        script.set_reply("client-auth", self._client_auth)
        script.set_reply("client-auth-nt", self._client_auth_nt)
        script.set_reply("client-deny", self._client_deny)
        script.set_reply("client-kill", self._client_kill)
        self.script = script
        self.controller.attach(script.protocol).addBoth(self.attach_results.append)
        waiting = [c for c in self.clients.values() if c.reauth_kid is not None]
        script.connect()
        # A REAUTH whose answer was lost with the connection is answered again by reconciliation
        # (OpenVPN 2.6 still waits for it until hand-window): nothing may stay unanswered here.
        # A slow directory check may answer it a little later; settle() then requires it.
        if waiting:
            self.count("reauth-across-reconnect")
        assert self.attach_results and self.attach_results[-1] is script.protocol, self.attach_results

    @property
    def attached(self):
        return self.script is not None and self.script.connected

    def lose_management(self):
        """OpenVPN closes the management socket; what happens until a controller attaches is never replayed."""
        self.count("management-lost")
        self.script.disconnect()
        self.withheld = False
        self._detached()

    def _detached(self):
        self.script = None
        self.queued = []  # lost: OpenVPN never replays notifications
        for client in self.clients.values():
            if client.state == "authorized" and self.rng.random() < 0.5:
                client.state = "established"  # ESTABLISHED happened unseen

    def time_out_client_auth(self):
        """The withheld client-auth reply never comes: the command timeout drops the connection."""
        assert self.withheld and self.attached
        self.advance(COMMAND_TIMEOUT)
        assert not self.attached, "command timeout did not drop the management connection"

    def advance(self, seconds):
        """Let time pass; a withheld reply's command timeout drops the management connection."""
        self.clock.advance(seconds)
        if self.script is not None and not self.script.connected:
            assert self.withheld, "the management connection dropped without a withheld reply"
            self.count("client-auth-timed-out")
            self.withheld = False
            self._detached()

    def _status(self):
        rows = []
        for c in self.clients.values():
            row = {"cid": c.cid, "real_address": c.real_address, "username": c.user if c.user != "certy" else "UNDEF"}
            row["common_name"] = "certy-cn" if c.user == "certy" else c.user
            if c.state == "established":
                row["virtual_address"] = str(c.address)
            else:
                row["pending"] = True
            rows.append(row)
        return status3_lines(rows, include_end=True)

    # --- the model server's answers ---------------------------------------------------------

    def _client_auth(self, command):
        head, push = command.split("\n")[:2]
        cid, kid = (int(x) for x in head.split()[1:3])
        try:
            address = IP(push.split()[1])
        except ValueError:
            # OpenVPN would log and ignore the line and admit the client without an address.
            self.violations.append("invalid ifconfig-push for cid %s: %r" % (cid, push))
            return ["ERROR: client-auth command failed"]
        fault, self.client_auth_fault = self.client_auth_fault, None
        client = self.clients.get(cid)
        if fault == "timeout":
            self.withheld = True
            return None
        if client is None or client.kid != kid:
            return ["ERROR: client-auth command failed"]
        if client.expect != "admit":
            self.violations.append("client-auth for cid %d that must be refused (%s)" % (cid, client.expect))
        if client.address is not None and client.address != address:
            self.violations.append("cid %d re-approved with %s, was %s" % (cid, address, client.address))
        if fault == "error":
            # OpenVPN refuses (the client is going away): it is gone, its DISCONNECT follows.
            del self.clients[cid]
            self.queued.append(("disconnect", cid))
            return ["ERROR: client-auth command failed"]
        if client.state == "pending":
            client.state = "authorized"
            client.address = address
            self.queued.append(("establish", cid))
            # Without duplicate-cn, OpenVPN drops an older instance of the same user now.
            for other in list(self.clients.values()):
                if other is not client and other.user == client.user:
                    del self.clients[other.cid]
                    self.queued.append(("disconnect", other.cid))
        return ["SUCCESS: client-auth command succeeded"]

    def _client_auth_nt(self, command):
        cid, kid = (int(x) for x in command.split()[1:3])
        client = self.clients.get(cid)
        if client is None or client.reauth_kid != kid:
            return ["ERROR: client-auth-nt command failed"]
        if client.expect != "admit":
            self.violations.append("REAUTH of cid %d approved although refused" % cid)
        client.reauth_kid = None
        client.kid = kid
        return ["SUCCESS: client-auth command succeeded"]

    def _client_deny(self, command):
        words = command.split(" ", 3)
        cid, kid = int(words[1]), int(words[2])
        client_reason = command.rsplit('"', 2)[-2]
        client = self.clients.get(cid)
        if client is None or kid not in (client.kid, client.reauth_kid):
            return ["ERROR: client-deny command failed"]
        temporary = client_reason.startswith("TEMP[backoff 7,advance no]")
        if client.expect == "admit":
            self.violations.append("cid %d denied although admissible: %s" % (cid, command))
        elif (client.expect == "temp") != temporary:
            self.violations.append("cid %d expected a %s deny, got %r" % (cid, client.expect, client_reason))
        del self.clients[cid]  # AUTH_FAILED; a denied REAUTH kills the client in 2.6
        self.queued.append(("disconnect", cid))
        return ["SUCCESS: client-deny command succeeded"]

    def _client_kill(self, command):
        cid = int(command.split()[1])
        if cid not in self.clients:
            return ["ERROR: common name '%d' not found" % cid]
        del self.clients[cid]
        self.queued.append(("disconnect", cid))
        return ["SUCCESS: client-kill command succeeded"]

    # --- the customers' side ----------------------------------------------------------------

    def connect(self, fault=None, user=None):
        """A new client instance CONNECTs, with ``fault`` injected into its admission."""
        user = user or self.rng.choice(PASSWORD_USERS + ["certy"])
        password = "pw"
        expect = "admit"
        if fault == "bad-password":
            password, expect = "wrong", "final"
        elif fault == "unknown-user":
            user, expect = "nobody", "final"
        elif fault == "directory-error":
            self.directory.next, expect = "error", "temp"
        elif fault == "directory-slow":
            self.directory.next = "slow"
        elif fault == "ipset-add":
            self.ipset.fail_next_add = IPSetError("add", "pocketproxy-clients", None, 28, "set is full")
            expect = "temp"
        elif fault == "mapping-conflict":
            self.mappings.fail_next = True
            expect = "temp"
        elif fault in ("client-auth-error", "client-auth-timeout"):
            self.client_auth_fault = fault[len("client-auth-") :]
        if fault == "bad-password" and user == "certy":
            user = "u0"
        if user == "st" and self._static_user_busy():
            self.count("static-duplicate")  # a second instance takes the address from the live first
        self.count(fault or "clean")
        cid = self.next_cid
        self.next_cid += 1
        self.next_port += 1
        client = Client(cid, self.rng.choice([1, 1, 2]), user, password, expect, self.next_port)
        self.clients[cid] = client
        self.script.notify_connect(cid, client.kid, client.env())
        # Injections that were not consumed (the admission stopped earlier or waits) must not leak.
        self.ipset.fail_next_add = None
        self.mappings.fail_next = False
        if fault == "client-auth-error" and self.client_auth_fault is not None:
            self.client_auth_fault = None
        if fault == "client-auth-timeout" and self.client_auth_fault is not None:
            self.client_auth_fault = None
        return client

    def _static_user_busy(self):
        return any(c.user == "st" for c in self.clients.values()) or any(
            s.username == "st" for s in self.controller.sessions.values()
        )

    def leave(self, client):
        """The client goes away (explicit-exit-notify): DISCONNECT with its byte counts."""
        self.count("leave-" + client.state)
        del self.clients[client.cid]
        if self.attached:
            self.script.notify_disconnect(client.cid, {"bytes_received": "10", "bytes_sent": "20", "common_name": client.user})

    def reauth(self, client, bad=False):
        self.count("reauth-bad" if bad else "reauth")
        client.reauth_kid = client.kid + self.rng.choice([1, 2])
        if bad:
            client.expect = "final"
        env = client.env(password="wrong") if bad else client.env()
        if client.user == "certy" and bad:
            env.update(username="u0", password="wrong")
        self.script.notify_reauth(client.cid, client.reauth_kid, env)

    def deliver(self, index):
        kind, cid = self.queued.pop(index)
        if kind == "disconnect":
            self.script.notify_disconnect(cid, {})
            return
        client = self.clients.get(cid)
        if client is None or client.state != "authorized":
            return
        client.state = "established"
        self.script.notify_address(cid, str(client.address))
        self.script.notify_established(cid, {"ifconfig_pool_remote_ip": str(client.address), "common_name": client.user})

    def sighup(self):
        """OpenVPN restarts (SIGHUP): every client dropped, RECONNECTING, CIDs restart at 0."""
        self.count("openvpn-sighup")
        self.queued = []
        for cid in list(self.clients):
            del self.clients[cid]
            self.script.notify_disconnect(cid, {"common_name": "x"})
        self.script.notify_state("RECONNECTING", "SIGHUP")
        self.next_cid = 0
        self.script.notify_state("CONNECTED", "SUCCESS", "10.9.0.1")

    def drift(self, kind):
        """Change the kernel behind pocketproxy's back, then let the periodic verifier find and fix it."""
        self.count("drift-" + kind)
        if kind == "member-deleted" and self.ipset.content:
            self.ipset.content.discard(self.rng.choice(sorted(self.ipset.content)))
        elif kind == "stranger-added":
            self.ipset.content.add(IP("10.9.0.250"))
        elif kind == "set-flushed":
            self.ipset.content.clear()
        elif kind == "chain-flushed":
            self.iptables.flush_chain(self.rng.choice(["filter", "nat"]))
        elif kind == "jump-deleted":
            self.iptables.delete_jump(self.rng.choice(["filter", "nat"]))
        before = self.verifier.checks
        self.advance(VERIFY_INTERVAL)  # at most one interval until the next check
        assert self.verifier.checks == before + 1
        last = self.operations.last_drift
        assert last is not None and last.ok, last  # repaired within this check, rules included
        if kind in ("chain-flushed", "jump-deleted"):
            assert self.verifier.repairs["rules_reinstalled"] > 0
        drift = self._rule_drift()
        assert drift == [], drift

    def _rule_drift(self):
        from ovpnmgr.rules import FAMILIES, rule_problems

        return [
            problem
            for family in FAMILIES
            for problem in rule_problems(FirewallConfig(), 12345, self.iptables.tables, family=family, subnet=SUBNET)
        ]

    # --- random steps -----------------------------------------------------------------------

    CONNECT_FAULTS = [
        None,
        None,
        None,
        "bad-password",
        "unknown-user",
        "directory-error",
        "directory-slow",
        "directory-slow",
        "ipset-add",
        "mapping-conflict",
        "client-auth-error",
        "client-auth-timeout",
    ]

    def step(self):
        """One random event; returns True if it was a CONNECT."""
        rng = self.rng
        if not self.attached:
            choice = rng.random()
            if choice < 0.3 and self.directory.slow:
                self.count("slow-answer-while-detached")
                self.directory.fire(rng.randrange(len(self.directory.slow)))
            elif choice < 0.4 and self.clients:
                self.count("leave-while-detached")
                del self.clients[rng.choice(sorted(self.clients))]
            else:
                self.count("reattach")
                self.attach()
            return False
        roll = rng.random()
        live = [c for c in self.clients.values() if c.state == "established" and c.reauth_kid is None and c.expect == "admit"]
        if roll < 0.40 and len(self.clients) < 24:
            fault = rng.choice(self.CONNECT_FAULTS)
            if fault == "client-auth-timeout" and self.withheld:
                fault = None
            self.connect(fault)
            return True
        if roll < 0.55 and self.queued:
            self.deliver(rng.randrange(len(self.queued)))
        elif roll < 0.65 and self.clients:
            self.leave(self.clients[rng.choice(sorted(self.clients))])
        elif roll < 0.72 and live:
            self.reauth(rng.choice(live), bad=rng.random() < 0.25)
        elif roll < 0.80 and self.directory.slow:
            self.count("slow-answer")
            self.directory.fire(rng.randrange(len(self.directory.slow)))
        elif roll < 0.83 and self.withheld:
            self.time_out_client_auth()
        elif roll < 0.855:
            self.lose_management()
        elif roll < 0.865:
            self.sighup()
        elif roll < 0.89:
            self.drift(rng.choice(["member-deleted", "stranger-added", "set-flushed", "chain-flushed", "jump-deleted"]))
        elif roll < 0.95:
            self.advance(rng.choice([0.1, 1.0, 2.5]))
        else:
            self.settle()
        return False

    def settle(self):
        """Let everything pending finish (answers, timeouts, reattach, notifications), then check OpenVPN's view."""
        self.count("settle")
        for _ in range(200):
            if not self.attached:
                self.attach()
            elif self.directory.slow:
                self.directory.fire(0)
            elif self.withheld:
                self.time_out_client_auth()
            elif self.queued:
                self.deliver(0)
            else:
                break
        else:
            raise AssertionError("did not settle")
        self.check()
        self.check_settled()

    # --- invariants -------------------------------------------------------------------------

    def check(self):
        """What must hold after every single step."""
        assert not self.violations, self.violations
        assert not self.failures, [e.get("log_format") for e in self.failures]
        assert self.controller.problems() == []  # the ledger's invariant: sessions, pool, mappings, kernel set agree
        self.iptables.assert_unrelated_rule_untouched()

    def check_settled(self):
        """What must hold once nothing is in flight: kernel, mappings and controller equal OpenVPN's view."""
        c = self.controller
        assert self.attached and c.management_ready
        protocol = self.script.protocol
        assert protocol._inflight is None and not protocol._queue, "command Deferreds outstanding"
        assert not self.directory.slow and not self.queued and not self.withheld
        stuck = [x.cid for x in self.clients.values() if x.state == "pending" or x.reauth_kid is not None]
        assert not stuck, "clients left waiting for an answer (until hand-window): %s" % stuck
        refused = [x.cid for x in self.clients.values() if x.expect != "admit"]
        assert not refused, "refused clients still connected: %s" % refused
        admitted = {x.address: x for x in self.clients.values()}
        assert set(self.ipset.content) == set(admitted), (sorted(self.ipset.content), sorted(admitted))
        by_cid = {s.cid: s for s in c.sessions.values() if s.epoch == c.epoch}
        assert len(by_cid) == len(c.sessions), "sessions of an old epoch survived reconciliation"
        assert set(by_cid) == set(self.clients)
        for client in self.clients.values():
            session = by_cid[client.cid]
            assert session.address == client.address
            assert session.user.name == client.user
            assert self.mappings.lookup(client.address) == session.user.device.upstream
        assert set(self.pool.in_use()) == set(admitted) == self.mappings.addresses()
        loop = [call for call in self.clock.getDelayedCalls()]
        assert len(loop) == 1 and loop[0].getTime() > self.clock.seconds(), loop  # only the verifier's next check
        assert self.operations.last_drift is None or self.operations.last_drift.ok or self.verifier.checks


def run_cycles(seed, connects):
    w = FaultWorld(seed)
    try:
        done = 0
        steps = 0
        while done < connects:
            if w.step():
                done += 1
            steps += 1
            w.check()
        w.settle()
        # Everybody leaves: nothing may remain anywhere.
        for client in list(w.clients.values()):
            w.leave(client)
        w.settle()
        assert w.ipset.content == set() and len(w.mappings) == 0 and w.pool.in_use() == {}
        assert w.controller.sessions == {}
        return w, steps
    finally:
        w.close()


ALL_FAULTS = {
    "bad-password",
    "unknown-user",
    "directory-error",
    "directory-slow",
    "ipset-add",
    "mapping-conflict",
    "client-auth-error",
    "client-auth-timeout",
    "management-lost",
    "openvpn-sighup",
    "reauth",
    "reauth-bad",
    "reauth-across-reconnect",
    "static-duplicate",
    "slow-answer-while-detached",
    "drift-member-deleted",
    "drift-stranger-added",
    "drift-set-flushed",
    "drift-chain-flushed",
    "drift-jump-deleted",
    "leave-pending",
    "leave-established",
    "settle",
}


@pytest.mark.parametrize("seed", [6, 1066])
def test_thousand_cycles_with_faults_at_every_admission_step(seed):
    """1,000 CONNECTs (plus disconnects, REAUTHs, socket losses, restarts, drift) keep kernel,
    mappings, pool and OpenVPN's view equal; every failed admission is rolled back and answered."""
    started = time.monotonic()
    w, steps = run_cycles(seed, 1000)
    elapsed = time.monotonic() - started
    missing = ALL_FAULTS - set(w.counts)
    assert not missing, "fault kinds never exercised: %s (counts %s)" % (sorted(missing), w.counts)
    assert w.counts["clean"] >= 100 and w.controller.admissions["admitted"] >= 200, w.counts
    assert w.controller.admissions["denied_temporary"] > 0 and w.controller.admissions["denied_final"] > 0
    assert elapsed < 10, "took %.1f s for %d steps" % (elapsed, steps)


def test_same_seed_same_run():
    """The random run is deterministic: same seed, same events and outcomes."""
    a, steps_a = run_cycles(42, 150)
    b, steps_b = run_cycles(42, 150)
    assert steps_a == steps_b and a.counts == b.counts
    assert a.script.sent_commands() == b.script.sent_commands()


# --- pinned findings (regressions: fixed in controller.py/verify.py by 9a52445) ---------------


def test_reauth_directory_error_is_answered():
    """A REAUTH whose credential check errors (not AuthFailed) is still answered (a TEMP
    ``client-deny``), so OpenVPN 2.6 does not silently fail the key at hand-window."""
    w = FaultWorld(0)
    try:
        client = w.connect()
        w.deliver(0)
        assert client.state == "established"
        w.directory.next = "error"
        client.reauth_kid = client.kid + 1
        w.script.notify_reauth(client.cid, client.reauth_kid, client.env())
        assert client.reauth_kid is None or client.cid not in w.clients, "REAUTH left unanswered"
    finally:
        w.close()


def test_failed_duplicate_admission_keeps_the_live_holder():
    """User ``st`` (static 10.9.0.77) is connected; a second instance CONNECTs and its admission fails
    (mapping conflict; an ipset error or a client-auth ERROR do the same). The TEMP deny leaves the
    first, still connected instance exactly as it was: ``_rollback`` hands the address, member and
    mapping back to ``session.took_from`` instead of releasing them."""
    w = FaultWorld(0)
    try:
        first = w.connect(user="st")
        w.deliver(0)
        assert first.state == "established" and first.address == STATIC
        w.connect(fault="mapping-conflict", user="st")
        assert first.cid in w.clients  # the deny concerned the newcomer only
        holder = w.controller.sessions[(w.controller.epoch, first.cid)]
        assert holder.address == STATIC
        assert STATIC in w.ipset.content and w.mappings.owner(STATIC) is holder and w.pool.owner(STATIC) is holder
        w.settle()
    finally:
        w.close()


def test_reconcile_never_pushes_a_lost_address():
    """Two instances of static-address user ``st`` wait for their client-auth replies when the management
    connection drops (command timeout). On reattach both are pending in ``status 3``; the older one lost
    its address to the newer one: ``_reconcile_pending`` kills it instead of writing
    ``ifconfig-push None …`` (which OpenVPN would ignore and admit the client without an address)."""
    w = FaultWorld(0)
    try:
        w.connect(fault="client-auth-timeout", user="st")
        w.connect(user="st")
        w.time_out_client_auth()
        w.attach()
        assert not w.violations, w.violations
        w.settle()
    finally:
        w.close()


def test_reauth_pending_across_reconnect_is_answered():
    """An established client's REAUTH arrives while the command queue is blocked; the connection then
    drops (command timeout). Reconciliation re-runs the pending REAUTH (``session.pending_reauth``), so
    the key is answered and OpenVPN 2.6 does not kill the client at hand-window."""
    w = FaultWorld(0)
    try:
        client = w.connect(user="u1")
        w.deliver(0)
        w.connect(fault="client-auth-timeout", user="u2")  # blocks the command queue
        key = client.reauth_kid = client.kid + 1
        w.script.notify_reauth(client.cid, key, client.env())
        w.time_out_client_auth()
        w.attach()
        assert client.reauth_kid is None, "REAUTH key %d of cid %d left unanswered" % (key, client.cid)
        assert client.cid in w.clients and client.kid == key  # approved (client-auth-nt), not denied
        w.settle()
    finally:
        w.close()


def test_last_drift_after_rules_reinstall_is_clean():
    """The periodic verifier finds a deleted jump and re-installs the chains; the drift gauge
    (``controller.last_drift``) then says ok at once, not a whole interval later."""
    w = FaultWorld(0)
    try:
        w.iptables.delete_jump("nat")
        w.advance(VERIFY_INTERVAL)
        assert w.verifier.repairs["rules_reinstalled"] == 1 and w._rule_drift() == []
        assert w.operations.last_drift.ok, w.operations.last_drift
    finally:
        w.close()


def test_reconcile_keeps_member_when_newer_static_instance_vanished():
    """Regression (found by the fault cycles with the model's static-user guard removed).

    ``st`` (static 10.9.0.77) is established; a second instance CONNECTs and takes the address
    (``_take_address``: ``took_from`` = the first); its client-auth reply is lost with the management
    connection, and the second instance is gone before pocketproxy reattaches (it left, or OpenVPN
    dropped it). ``reconcile`` used to clear ``self.sessions`` and read the kernel's members before
    rolling the vanished instance back: the address was not handed back to the first instance, its
    member was removed, and the first instance was rebuilt against the stale member list, so an
    established client had a mapping but no ipset member (its TCP rejected until the periodic
    verifier noticed). Vanished sessions now roll back first.
    """
    w = FaultWorld(0)
    try:
        first = w.connect(user="st")
        w.deliver(0)
        assert first.state == "established" and first.address == STATIC
        w.client_auth_fault = "timeout"  # the second instance's client-auth reply never comes
        second = w.connect(user="st")
        assert w.withheld and second.state == "pending"
        w.lose_management()
        del w.clients[second.cid]  # gone before anyone reattaches (its DISCONNECT is never seen)
        w.attach()
        holder = w.controller.sessions[(w.controller.epoch, first.cid)]
        assert holder.address == STATIC and w.mappings.owner(STATIC) is holder
        assert STATIC in w.ipset.content, "established cid %d has no ipset member for %s" % (first.cid, STATIC)
    finally:
        w.close()


def test_management_closed_mid_admission_leaves_nothing_pending():
    """OpenVPN closes the management socket (not a command timeout) while CONNECTs are at every stage:
    a client-auth written but unanswered, a client-auth queued behind it, a credential check still
    running (it lands while detached), and a CONNECT that arrives while nobody is attached (its KID is
    never seen). On reattach, with no time passing, each is answered at once: the three known ones
    admitted with the address they were given, the unknown one ``client-kill``ed so it retries now.
    None waits for hand-window; kernel, mappings and pool equal OpenVPN's view."""
    w = FaultWorld(0)
    try:
        inflight = w.connect(fault="client-auth-timeout", user="u0")
        queued = w.connect(user="u1")
        slow = w.connect(fault="directory-slow", user="u2")
        assert w.withheld and all(c.state == "pending" for c in (inflight, queued, slow))
        given = {c.cid: w.controller.sessions[(w.controller.epoch, c.cid)].address for c in (inflight, queued)}
        w.lose_management()
        assert w.directory.slow
        w.directory.fire(0)  # the slow check answers while detached: approval waits for reconciliation
        unseen = Client(w.next_cid, 1, "u3", "pw", "admit", w.next_port + 1)
        w.next_cid += 1
        w.next_port += 1
        w.clients[unseen.cid] = unseen  # CONNECTed while detached: OpenVPN never replays it
        t0 = w.clock.seconds()
        w.attach()
        assert w.clock.seconds() == t0
        for c in (inflight, queued, slow):
            assert c.state == "authorized" and c.cid in w.clients, (c.cid, c.state)
            assert c.address in w.ipset.content
        for cid, address in given.items():
            assert w.clients[cid].address == address
        assert unseen.cid not in w.clients and "client-kill %d" % unseen.cid in w.script.sent_commands()
        stuck = [c.cid for c in w.clients.values() if c.state == "pending"]
        assert not stuck, stuck
        w.check()
        w.settle()
    finally:
        w.close()


# --- hypothesis: the same model, driven by a state machine --------------------------------

try:
    from hypothesis import HealthCheck, settings
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
except ImportError:  # pragma: no cover
    RuleBasedStateMachine = None

if RuleBasedStateMachine is not None:

    class AdmissionMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.w = FaultWorld(0)

        def teardown(self):
            try:
                self.w.settle()
                for client in list(self.w.clients.values()):
                    self.w.leave(client)
                self.w.settle()
                assert self.w.ipset.content == set() and self.w.pool.in_use() == {}
            finally:
                self.w.close()

        @precondition(lambda self: self.w.attached and len(self.w.clients) < 20)
        @rule(fault=st.sampled_from(FaultWorld.CONNECT_FAULTS), user=st.sampled_from(PASSWORD_USERS + ["certy"]))
        def connect(self, fault, user):
            if fault == "client-auth-timeout" and self.w.withheld:
                fault = None
            self.w.connect(fault, user=user)

        @precondition(lambda self: self.w.attached and self.w.queued)
        @rule(data=st.data())
        def deliver(self, data):
            self.w.deliver(data.draw(st.integers(0, len(self.w.queued) - 1)))

        @precondition(lambda self: self.w.attached and self.w.clients)
        @rule(data=st.data())
        def leave(self, data):
            self.w.leave(self.w.clients[data.draw(st.sampled_from(sorted(self.w.clients)))])

        @precondition(
            lambda self: self.w.attached
            and any(c.state == "established" and c.reauth_kid is None and c.expect == "admit" for c in self.w.clients.values())
        )
        @rule(data=st.data(), bad=st.booleans())
        def reauth(self, data, bad):
            live = [
                c for c in self.w.clients.values() if c.state == "established" and c.reauth_kid is None and c.expect == "admit"
            ]
            self.w.reauth(data.draw(st.sampled_from(live)), bad=bad)

        @precondition(lambda self: self.w.directory.slow)
        @rule(data=st.data())
        def slow_answer(self, data):
            self.w.directory.fire(data.draw(st.integers(0, len(self.w.directory.slow) - 1)))

        @precondition(lambda self: self.w.attached and self.w.withheld)
        @rule()
        def client_auth_times_out(self):
            self.w.time_out_client_auth()

        @precondition(lambda self: self.w.attached)
        @rule()
        def lose_management(self):
            self.w.lose_management()

        @precondition(lambda self: not self.w.attached)
        @rule()
        def reattach(self):
            self.w.attach()

        @precondition(lambda self: self.w.attached)
        @rule()
        def sighup(self):
            self.w.sighup()

        @rule(kind=st.sampled_from(["member-deleted", "stranger-added", "set-flushed", "chain-flushed", "jump-deleted"]))
        def drift(self, kind):
            self.w.drift(kind)

        @precondition(lambda self: self.w.attached)
        @rule()
        def settle(self):
            self.w.settle()

        @invariant()
        def consistent(self):
            self.w.check()

    AdmissionMachine.TestCase.settings = settings(
        max_examples=40,
        stateful_step_count=40,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    test_admission_state_machine = AdmissionMachine.TestCase
