"""The admin socket: management dialect byte for byte, passthrough, refusals, pp verbs.

A real :class:`~ovpnmgr.controller.Controller` (the unit-level World of
test_controller) attached to a scripted OpenVPN peer; admin clients are
``AdminProtocol`` instances on ``StringTransport``s. No sockets, no root,
except the service tests, which bind unix sockets in a temp directory.
"""

import errno
import ipaddress
import json
import os
import socket

import pytest
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock

from ovpnmgr.admin import BANNER, CLIENT_BYTES, AdminFactory, AdminService, remove_stale_socket
from ovpnmgr.config import AdminConfig
from ovpnmgr.testing import status3_lines
from proxy.stats import ProxyStats
from tests.unit.admin_world import Admin, Fake, _parse, admit, crlf, rules_world, world
from tests.unit.firewall_listings import NAT_S
from tests.unit.controller_world import HASH, World

IP = ipaddress.IPv4Address
NOT_ALLOWED = b"ERROR: command not allowed\r\n"
UNKNOWN = b"ERROR: unknown command, enter 'help' for more options\r\n"
NOT_CONNECTED = b"ERROR: OpenVPN management not connected\r\n"


# --- dialect ---------------------------------------------------------------------------


def test_banner_is_the_first_line():
    """On connect the client gets exactly the >INFO: banner, CRLF-terminated, in OpenVPN's form."""
    w = world()
    a = Admin(w.factory)
    assert a.transport.value() == b">INFO:pocketproxy admin interface version 1 -- type 'help' for more info\r\n"
    assert BANNER.endswith("-- type 'help' for more info")


def test_status3_passthrough_relays_the_multiline_reply_verbatim():
    """`status 3` goes to OpenVPN unchanged and its reply comes back line for line, ending END."""
    w = world()
    address = admit(w, 0)
    rows = [{"cid": 0, "virtual_address": str(address), "username": "alice", "common_name": "alice"}]
    w.script.status_clients = rows
    a = Admin(w.factory)
    w.script.clear_sent()
    out = a.send("status 3")
    assert w.script.sent_commands() == ["status 3"]
    assert out == crlf(*status3_lines(rows, include_end=True))
    assert out.endswith(b"\r\nEND\r\n") and b"\talice\t0\t" in out


def test_single_line_and_other_multiline_passthrough():
    """pid and load-stats relay the SUCCESS line; version relays lines up to END; \\r\\n input works."""
    w = world()
    a = Admin(w.factory)
    assert a.send("pid\r") == b"SUCCESS: pid=4242\r\n"
    assert a.send("load-stats") == b"SUCCESS: nclients=0,bytesin=0,bytesout=0\r\n"
    assert a.send("version").endswith(b"Management Version: 5\r\nEND\r\n")
    w.script.set_reply("state", ["1795375446,CONNECTED,SUCCESS,10.9.0.1,,,,", "END"])
    assert a.send("state all") == b"1795375446,CONNECTED,SUCCESS,10.9.0.1,,,,\r\nEND\r\n"
    assert [c for c in w.script.sent_commands() if c in ("pid", "load-stats", "version", "help", "state all")] == [
        "pid",
        "load-stats",
        "version",
        "state all",
    ]


def test_help_lists_what_this_socket_accepts_in_openvpns_format_and_is_not_relayed():
    """OpenVPN's own list would advertise commands we refuse and omit the pp verbs."""
    w = world()
    a = Admin(w.factory)
    lines = a.send("help").decode().split("\r\n")
    assert lines[0].startswith("Management Interface for pocketproxy") and lines[1] == "Commands:" and lines[-2:] == ["END", ""]
    commands = [line.split(" : ")[0].split()[0] for line in lines[2:-2]]
    for verb in ("status", "load-stats", "version", "pid", "state", "client-kill", "kill", "help", "pp"):
        assert verb in commands, (verb, lines)
    for refused in ("client-auth", "client-deny", "signal", "hold", "log", "bytecount"):
        assert refused not in commands
    assert any(line.startswith("pp rotate DEVICE ") for line in lines)
    assert all(" : " in line for line in lines[2:-2]), lines  # OpenVPN's "command : description" rows
    assert "help" not in w.script.sent_commands()
    assert a.send("help me") == b"ERROR: command not allowed\r\n"


def test_a_client_that_half_closes_after_its_commands_gets_every_reply_then_the_close():
    """printf 'status 3\\nload-stats\\n' | socat - UNIX-CONNECT:...: OpenVPN answers everything, so do we."""
    w = world()
    a = Admin(w.factory)
    a.transport.clear()
    a.protocol.dataReceived(b"pid\nload-stats\npp stats\n")
    a.protocol.readConnectionLost()
    out = a.transport.value()
    assert b"SUCCESS: pid=4242\r\n" in out and b"SUCCESS: nclients=0" in out and out.endswith(b"END\r\n"), out
    assert a.transport.disconnecting  # closed once all three were answered


def test_half_close_waits_for_a_reply_still_coming_from_openvpn():
    w = world()
    a = Admin(w.factory)
    w.script.set_reply("status 3", None)  # OpenVPN has not answered yet
    a.transport.clear()
    a.protocol.dataReceived(b"status 3\n")
    a.protocol.readConnectionLost()
    assert not a.transport.disconnecting
    w.script.reply(*status3_lines([], include_end=True))
    assert a.transport.value().endswith(b"END\r\n") and a.transport.disconnecting


def test_openvpn_errors_are_relayed():
    """An ERROR from OpenVPN (single or in place of a multi-line reply) reaches the admin client."""
    w = world()
    a = Admin(w.factory)
    w.script.set_reply("client-kill", ["ERROR: client-kill command failed"])
    assert a.send("client-kill 99") == b"ERROR: client-kill command failed\r\n"
    assert w.script.sent_commands()[-1] == "client-kill 99"
    w.script.set_reply("kill", ["SUCCESS: common name 'alice' found, 1 client(s) killed"])
    assert a.send("kill alice") == b"SUCCESS: common name 'alice' found, 1 client(s) killed\r\n"
    w.script.set_reply("status 9", ["ERROR: status command failed"])
    assert a.send("status 9") == b"ERROR: status command failed\r\n"


@pytest.mark.parametrize(
    "line",
    [
        "client-auth 0 1",
        "client-auth-nt 0 1",
        'client-deny 0 1 "no"',
        "client-pending-auth 0 1 x 30",
        "hold release",
        "hold",
        "signal SIGTERM",
        "state on",
        "state off",
        "log on",
        "bytecount 5",
        "version 3",
        "password pw",
        "username x",
        "echo on",
        "pid 3",
        "client-kill",
    ],
)
def test_reserved_commands_are_refused_and_never_sent(line):
    """Admission and daemon-control commands: ERROR: command not allowed; OpenVPN sees nothing."""
    w = world()
    a = Admin(w.factory)
    before = w.script.sent_commands()
    assert a.send(line) == NOT_ALLOWED
    assert w.script.sent_commands() == before


def test_unknown_commands():
    """Unknown words and unknown pp verbs get OpenVPN's unknown-command line; empty lines are ignored."""
    w = world()
    a = Admin(w.factory)
    assert a.send("frobnicate") == UNKNOWN
    assert a.send("pp frobnicate") == UNKNOWN
    assert a.send("pp") == UNKNOWN
    assert a.send("", "   ") == b""
    assert a.send("pp kick") == b"ERROR: usage: see 'pp help'\r\n"


@pytest.mark.parametrize("verb", ["quit", "exit"])
def test_quit_and_exit_close_the_admin_session_only(verb):
    """quit/exit: no reply, the admin connection closes, OpenVPN is not told, later lines are ignored."""
    w = world()
    a = Admin(w.factory)
    before = w.script.sent_commands()
    assert a.send(verb, "pid") == b""
    assert a.transport.disconnecting
    assert w.script.sent_commands() == before
    assert w.script.connected


def test_not_connected():
    """Without a management connection, passthrough and kick say so; local verbs still work."""
    w = world()
    w.script.disconnect()
    a = Admin(w.factory)
    assert a.send("status 3") == NOT_CONNECTED
    assert a.send("pid") == NOT_CONNECTED
    assert a.send("pp kick alice") == NOT_CONNECTED
    assert a.send("pp drain") == b"SUCCESS: drain=off\r\n"


def test_management_lost_while_waiting():
    """A passthrough in flight when the management connection drops gets the not-connected error."""
    w = world()
    a = Admin(w.factory)
    w.script.set_reply("load-stats", None)
    assert a.send("load-stats") == b""
    w.script.disconnect()
    assert a.take() == NOT_CONNECTED


def test_overlong_line_is_refused_and_closes():
    """A line over 1000 bytes: one ERROR line, then the connection is closed."""
    w = world()
    a = Admin(w.factory)
    before = w.script.sent_commands()
    assert a.send("status " + "3" * 1200) == b"ERROR: line too long (limit 1000 bytes)\r\n"
    assert a.transport.disconnecting
    assert w.script.sent_commands() == before


def test_control_characters_are_refused():
    """A control character inside a passthrough line never reaches OpenVPN."""
    w = world()
    a = Admin(w.factory)
    before = w.script.sent_commands()
    out = a.send("client-kill 1 \x1b[31m")
    assert out.startswith(b"ERROR: command contains control character")
    assert w.script.sent_commands() == before


def test_replies_of_one_client_stay_in_order():
    """A local verb queued behind an unanswered passthrough waits (and does not run) until it is answered."""
    w = world()
    a = Admin(w.factory)
    w.script.set_reply("load-stats", None)
    assert a.send("load-stats", "pp drain on", "pid") == b""
    assert w.ops.draining is False
    w.script.reply("SUCCESS: nclients=0,bytesin=1,bytesout=2")
    assert a.take() == crlf("SUCCESS: nclients=0,bytesin=1,bytesout=2", "SUCCESS: drain=on", "SUCCESS: pid=4242")
    assert w.ops.draining is True


def test_several_admin_clients_at_once():
    """Two clients with commands in flight share the management FIFO; each gets its own replies."""
    w = world()
    a, b = Admin(w.factory), Admin(w.factory)
    assert len(w.factory.connections) == 2
    w.script.set_reply("load-stats", None)
    assert a.send("load-stats") == b""
    assert b.send("pid") == b""  # queued behind a's command on the one management connection
    assert b.send("pp drain") == b""  # b's own queue waits for its pid
    w.script.reply("SUCCESS: nclients=3,bytesin=0,bytesout=0")
    assert a.take() == b"SUCCESS: nclients=3,bytesin=0,bytesout=0\r\n"
    assert b.take() == b"SUCCESS: pid=4242\r\nSUCCESS: drain=off\r\n"
    a.protocol.connectionLost(None)
    assert w.factory.connections == {b.protocol}


def test_reply_after_the_admin_client_left_is_dropped():
    """An admin client that leaves with a command in flight: the late reply is discarded quietly."""
    w = world()
    a = Admin(w.factory)
    w.script.set_reply("load-stats", None)
    a.send("load-stats")
    a.protocol.connectionLost(None)
    w.script.reply("SUCCESS: nclients=0,bytesin=0,bytesout=0")
    assert a.take() == b""
    assert Admin(w.factory).send("pid") == b"SUCCESS: pid=4242\r\n"


# --- pp verbs ----------------------------------------------------------------------------


def test_pp_clients_table_and_json():
    """pp clients: user, CID, address, device, since (ISO, UTC), live connections, state; --json one line."""
    w = world()
    address = admit(w, 0, at=100)
    w.clock.advance(5)
    w.connect(1, user="bob")  # authorized, not yet established
    w.mappings.register(address, Fake())
    w.mappings.register(address, Fake())
    a = Admin(w.factory)
    assert a.send("pp clients") == crlf(
        "HEADER\tCLIENT\tuser\tcid\tvpn_ip\tdevice\tconnected_since\tlive_connections\tstate"
        "\ttunnel_bytes_in\ttunnel_bytes_out\tproxied_bytes_up\tproxied_bytes_down\ttunnel",
        "CLIENT\talice\t0\t10.9.0.2\tp1\t1970-01-01T00:01:40+00:00\t2\testablished\t-\t-\t0\t0\tfull",
        "CLIENT\tbob\t1\t10.9.0.3\tp2\t-\t0\tauthorized\t-\t-\t0\t0\tfull",
        "END",
    )
    out = a.send("pp clients --json")
    line, end = out.split(b"\r\n")[:2]
    assert end == b"END" and out.count(b"\r\n") == 2
    assert json.loads(line) == {
        "clients": [
            {
                "user": "alice",
                "cid": 0,
                "vpn_ip": "10.9.0.2",
                "device": "p1",
                "connected_since": "1970-01-01T00:01:40+00:00",
                "live_connections": 2,
                "state": "established",
                "tunnel_bytes_in": None,
                "tunnel_bytes_out": None,
                "proxied_bytes_up": 0,
                "proxied_bytes_down": 0,
                "tunnel": "full",
            },
            {
                "user": "bob",
                "cid": 1,
                "vpn_ip": "10.9.0.3",
                "device": "p2",
                "connected_since": None,
                "live_connections": 0,
                "state": "authorized",
                "tunnel_bytes_in": None,
                "tunnel_bytes_out": None,
                "proxied_bytes_up": 0,
                "proxied_bytes_down": 0,
                "tunnel": "full",
            },
        ]
    }


class Relaying(Fake):
    """A live proxied connection whose relay has moved some bytes."""

    def __init__(self, up, down):
        self.up, self.down = up, down

    def bytes_relayed(self):
        return self.up, self.down


def test_pp_clients_bytes_from_bytecount_and_the_proxy():
    """Tunnel bytes come from >BYTECOUNT_CLI keyed by (epoch, CID); proxied bytes are finished
    relays plus live ones of the client's address, and start again at 0 for a new session."""
    w = world()
    assert "bytecount 5" in w.script.sent_commands()  # enabled on attach (openvpn.bytecount_interval)
    alice = admit(w, 0)
    bob = admit(w, 1, user="bob")
    w.script.notify_bytecount(0, 1500, 64000)
    w.script.notify_bytecount(1, 10, 20)
    w.script.notify_bytecount(7, 99, 99)  # unknown CID: ignored
    w.mappings.add_bytes(alice, 300, 5000)  # a finished connection
    w.mappings.register(alice, Relaying(7, 11))  # a live one
    a = Admin(w.factory)
    rows = {r["user"]: r for r in json.loads(a.send("pp clients --json").split(b"\r\n")[0])["clients"]}
    assert [rows["alice"][k] for k in CLIENT_BYTES] == [1500, 64000, 307, 5011]
    assert [rows["bob"][k] for k in CLIENT_BYTES] == [10, 20, 0, 0]
    w.script.notify_bytecount(0, 1600, 65000)  # cumulative counters: the latest report wins
    table = a.send("pp clients").split(b"\r\n")
    assert table[1].endswith(b"\testablished\t1600\t65000\t307\t5011\tfull")

    # alice leaves: her address's proxied count goes with the mapping; a new session starts from zero.
    w.script.notify_disconnect(0, {"bytes_received": "1700", "bytes_sent": "66000"})
    assert w.mappings.client_bytes(alice) == (0, 0)
    admit(w, 2)
    rows = {r["cid"]: r for r in json.loads(a.send("pp clients --json").split(b"\r\n")[0])["clients"]}
    assert [rows[2][k] for k in CLIENT_BYTES] == [None, None, 0, 0]
    assert rows[1]["tunnel_bytes_in"] == 10 and bob == IP(rows[1]["vpn_ip"])


def test_pp_devices_lists_users_and_connected_addresses_without_secrets():
    """pp devices: each device, its configured users and who is connected; upstream passwords hidden."""
    users = """
devices:
  p1: {upstream: "http://dev:devpw@192.168.255.2:8080"}
  p2: {upstream: "socks5://192.168.255.3:1080"}
users:
  alice: {password: "%s", device: p1}
  carol: {password: "%s", device: p1}
  bob: {password: "%s", device: p2}
"""

    w = World(users=users % (HASH, HASH, HASH))
    w.factory = AdminFactory(w.ops)
    admit(w, 0)
    a = Admin(w.factory)
    out = a.send("pp devices")
    assert out == crlf(
        "HEADER\tDEVICE\tdevice\tupstream\tusers\tconnected",
        "DEVICE\tp1\thttp://dev:***@192.168.255.2:8080\talice,carol\talice@10.9.0.2",
        "DEVICE\tp2\tsocks5://192.168.255.3:1080\tbob\t-",
        "END",
    )
    data = json.loads(a.send("pp devices --json").split(b"\r\n")[0])
    assert data["devices"][0] == {
        "device": "p1",
        "upstream": "http://dev:***@192.168.255.2:8080",
        "users": ["alice", "carol"],
        "connected": [{"user": "alice", "cid": 0, "vpn_ip": "10.9.0.2"}],
    }
    assert b"devpw" not in out


def test_pp_kick_kills_every_session_of_the_user():
    """pp kick alice: client-kill for each of alice's CIDs, none for bob; the reply counts them."""
    w = world()
    admit(w, 0)
    admit(w, 1, user="bob")
    w.connect(2, user="alice")
    a = Admin(w.factory)
    w.script.clear_sent()
    assert a.send("pp kick alice") == b"SUCCESS: kicked 2 session(s) of alice\r\n"
    assert w.script.sent_commands() == ["client-kill 0", "client-kill 2"]
    assert a.send("pp kick carol") == b"SUCCESS: kicked 0 session(s) of carol\r\n"
    assert a.send("pp kick mallory") == b"ERROR: unknown user mallory\r\n"
    w.script.set_reply("client-kill", ["ERROR: client-kill command failed"])
    assert a.send("pp kick bob --json") == crlf(
        '{"errors":["client-kill command failed"],"kicked":0,"user":"bob"}', "END"
    )


def test_pp_drain_denies_new_admissions_with_temp_and_resumes():
    """pp drain on: the next CONNECT gets a TEMP client-deny and nothing is held; off: admitted again."""
    w = world()
    a = Admin(w.factory)
    assert a.send("pp drain") == b"SUCCESS: drain=off\r\n"
    assert a.send("pp drain on") == b"SUCCESS: drain=on\r\n"
    w.connect(4, kid=2)
    deny = w.commands("client-deny")[-1]
    temp = '"TEMP[backoff 7,advance no]: temporary failure, retrying"'
    assert deny == 'client-deny 4 2 "draining: new admissions paused" ' + temp
    assert w.members() == set() and not w.commands("client-auth")
    assert a.send("pp drain --json") == crlf('{"draining":true}', "END")
    assert a.send("pp drain off") == b"SUCCESS: drain=off\r\n"
    w.connect(5)
    assert w.commands("client-auth")[-1].startswith("client-auth 5 1\n")
    assert a.send("pp drain maybe") == b"ERROR: usage: see 'pp help'\r\n"


def test_pp_rules_check_reports_ok_and_member_drift():
    """pp rules check compares the kernel with admitted addresses: ok, then a member removed behind our back."""
    w, _ = rules_world()
    address = admit(w, 0)
    a = Admin(w.factory)
    assert a.send("pp rules check") == b"SUCCESS: firewall ok\r\n"
    w.ipset.delete(address)
    w.ipset.add(IP("10.9.0.99"))
    assert a.send("pp rules check") == (
        b"ERROR: drift: 1 missing member(s): 10.9.0.2; 1 extra member(s): 10.9.0.99\r\n"
    )
    data = json.loads(a.send("pp rules check --json").split(b"\r\n")[0])
    assert data == {
        "ok": False,
        "summary": "1 missing member(s): 10.9.0.2; 1 extra member(s): 10.9.0.99",
        "missing_chain_rules": False,
        "rule_problems": [],
        "set_missing": False,
        "missing_members": ["10.9.0.2"],
        "extra_members": ["10.9.0.99"],
    }


def test_pp_rules_check_reports_chain_drift_and_read_errors():
    """A missing chain shows as rule drift; an unreadable kernel is an ERROR naming the cause."""
    w, runner = rules_world()
    a = Admin(w.factory)
    runner.on(NAT_S, stdout=b"-P PREROUTING ACCEPT\n")
    out = a.send("pp rules check")
    assert out.startswith(b"ERROR: drift: rules: ") and out.endswith(b"\r\n") and out.count(b"\r\n") == 1
    runner.on(NAT_S, exit_code=4, stderr=b"iptables: boom\n")
    out = a.send("pp rules check")
    assert out.startswith(b"ERROR: ") and b"boom" in out and b"drift" not in out


def test_pp_stats_text_and_json():
    """pp stats: admission counts and the proxy's counters, as key=value lines or one JSON line."""
    stats = ProxyStats()
    stats.accepted = 3
    stats.refused["unmapped"] = 1
    w = world(stats)
    admit(w, 0)
    a = Admin(w.factory)
    out = a.send("pp stats").decode().split("\r\n")
    assert out[-2:] == ["END", ""]
    assert "admission.clients=1" in out and "admission.established=1" in out and "admission.draining=0" in out
    assert "admission.management_connected=1" in out and "proxy.accepted=3" in out and "proxy.refused.unmapped=1" in out
    data = json.loads(a.send("pp stats --json").split(b"\r\n")[0])
    assert data["admission"] == {
        "clients": 1,
        "established": 1,
        "pending": 0,
        "addresses_in_use": 1,
        "mappings": 1,
        "draining": False,
        "management_connected": True,
        "epoch": 1,
    }
    assert data["proxy"] == stats.snapshot()


def test_pp_help():
    """pp help lists every verb and ends with END."""
    out = Admin(world().factory).send("pp help").decode()
    for verb in ("pp clients", "pp devices", "pp kick USER", "pp drain", "pp rules check", "pp stats", "quit"):
        assert verb in out
    assert out.endswith("\r\nEND\r\n")


# --- the listening service ----------------------------------------------------------------


def test_service_removes_stale_socket_listens_with_mode_and_stops(tmp_path):
    """A stale socket file is removed, then listenUNIX with the configured mode; stop stops listening."""
    path = tmp_path / "admin.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    reactor = MemoryReactorClock()
    svc = AdminService(reactor, AdminConfig(socket=str(path), mode=0o640), world().ops)
    svc.privilegedStartService()
    svc.startService()
    assert not path.exists()
    assert len(reactor.unixServers) == 1
    address, factory, backlog, mode, _ = reactor.unixServers[0]
    assert (address, mode, factory) == (str(path), 0o640, svc.factory)
    svc.stopService()
    assert svc.port is None


def test_a_live_socket_is_not_stale(tmp_path):
    """A socket someone still listens on is left alone (EADDRINUSE): a second daemon must not steal it."""
    path = tmp_path / "admin.sock"
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(path))
    live.listen(1)
    try:
        with pytest.raises(OSError) as e:
            remove_stale_socket(str(path))
        assert e.value.errno == errno.EADDRINUSE
        assert path.is_socket()
    finally:
        live.close()


def test_a_regular_file_in_the_way_is_not_removed(tmp_path):
    """A non-socket file at the socket path is an error, never deleted."""
    path = tmp_path / "admin.sock"
    path.write_text("precious")
    with pytest.raises(OSError):
        remove_stale_socket(str(path))
    svc = AdminService(MemoryReactorClock(), AdminConfig(socket=str(path)), world().ops)
    with pytest.raises(CannotListenError):
        svc.privilegedStartService()
    assert path.read_text() == "precious"
    assert remove_stale_socket(str(tmp_path / "absent.sock")) is False



# --- configuration ------------------------------------------------------------------------




def test_admin_group_by_name_or_gid(tmp_path):
    """admin.group accepts a group name (resolved to its gid at load) or a numeric gid."""
    import grp

    name = grp.getgrgid(os.getgid()).gr_name
    assert _parse(tmp_path, name).admin.group == os.getgid()
    assert _parse(tmp_path, 4321).admin.group == 4321
    assert _parse(tmp_path, name).admin.mode == 0o640


def test_admin_unknown_group_is_a_config_error(tmp_path):
    """An unknown group name is reported with file, key and problem."""
    from ovpnmgr.config import ConfigError

    with pytest.raises(ConfigError) as e:
        _parse(tmp_path, "no-such-group-pp")
    assert "admin.group" in str(e.value) and "no such group" in str(e.value)


def test_service_gives_the_socket_its_group(tmp_path):
    """With admin.group set, the socket file is chowned to that group after listening."""
    class ListenOnly:
        """Binds for real (so the file exists) but stays off the global reactor's loop."""

        def listenUNIX(self, path, factory, mode):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.bind(path)
            os.chmod(path, mode)
            return self

        def stopListening(self):
            self.sock.close()

    path = tmp_path / "admin.sock"
    gid = os.getgroups()[-1] if os.getgroups() else os.getgid()
    svc = AdminService(ListenOnly(), AdminConfig(socket=str(path), mode=0o660, group=gid), world().ops)
    svc.startService()
    assert os.stat(path).st_gid == gid and (os.stat(path).st_mode & 0o777) == 0o660
    svc.stopService()


def test_tap_wires_the_admin_service_only_when_a_socket_is_configured(tmp_path):
    """build(): an AdminService over the controller and the proxy's stats when admin.socket is set."""
    import dataclasses

    from twisted.internet.testing import MemoryReactorClock

    from ovpnmgr.directory import Directory
    from ovpnmgr.ipset import FakeIPSet
    from ovpnmgr.tap import build

    config = _parse(tmp_path, os.getgid())
    directory = Directory.parse("devices: {}\nusers: {}\n", "users.yaml")
    top, controller = build(MemoryReactorClock(), config, directory, None, ipset=FakeIPSet())
    admins = [s for s in top if isinstance(s, AdminService)]
    assert len(admins) == 1 and admins[0].factory.operations.c is controller
    assert isinstance(admins[0].factory.proxy_stats, ProxyStats)
    assert admins[0].config.socket == config.admin.socket
    off = dataclasses.replace(config, admin=AdminConfig())
    top, _ = build(MemoryReactorClock(), off, directory, None, ipset=FakeIPSet())
    assert not [s for s in top if isinstance(s, AdminService)]


# --- optional password (admin.password_file) ------------------------------------------------

SECRET = "s3cr3t-Pa55"
PROMPT = b"ENTER PASSWORD:"


def pw_world(password=SECRET):
    w = World()
    w.factory = AdminFactory(w.ops, None, password.encode())
    return w


@pytest.fixture
def captured_logs():
    from twisted.logger import formatEvent, globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    yield lambda: [formatEvent(e) + " " + repr(e) for e in events]
    globalLogPublisher.removeObserver(events.append)


def test_password_prompt_is_sent_without_line_end_instead_of_the_banner():
    """With a password configured, the first and only bytes are OpenVPN's bare prompt."""
    a = Admin(pw_world().factory)
    assert a.transport.value() == b"ENTER PASSWORD:"


def test_right_password_gets_success_then_the_banner_then_commands_work():
    w = pw_world()
    a = Admin(w.factory)
    a.take()
    assert a.send(SECRET) == crlf("SUCCESS: password is correct", BANNER)
    assert a.send("pp drain") == b"SUCCESS: drain=off\r\n"


def test_crlf_after_the_password_is_accepted():
    a = Admin(pw_world().factory)
    a.take()
    a.protocol.dataReceived(SECRET.encode() + b"\r\n")
    assert a.take() == crlf("SUCCESS: password is correct", BANNER)


def test_password_and_command_in_one_read():
    """A client that pipelines its first command after the password gets it answered after the banner."""
    a = Admin(pw_world().factory)
    a.take()
    assert a.send(SECRET, "pp drain") == crlf("SUCCESS: password is correct", BANNER, "SUCCESS: drain=off")


def test_wrong_password_only_prompts_again():
    """OpenVPN's 'ERROR: bad password' never reaches the client (observed): just another bare prompt."""
    a = Admin(pw_world().factory)
    a.take()
    assert a.send("wrong") == PROMPT
    assert a.transport.connected
    assert a.send(SECRET) == crlf("SUCCESS: password is correct", BANNER)


def test_three_wrong_passwords_close_the_connection_without_reply():
    a = Admin(pw_world().factory)
    a.take()
    assert a.send("one") == PROMPT
    assert a.send("two") == PROMPT
    assert a.send("three") == b""
    assert a.transport.disconnecting
    assert a.send(SECRET) == b""  # too late


def test_three_wrong_passwords_in_one_read_close_too():
    a = Admin(pw_world().factory)
    a.take()
    assert a.send("a", "b", "c", SECRET, "pp drain") == PROMPT + PROMPT
    assert a.transport.disconnecting


def test_no_command_is_accepted_before_the_password():
    """Command lines before authentication are password attempts: never run, never sent to OpenVPN."""
    w = pw_world()
    a = Admin(w.factory)
    a.take()
    w.script.clear_sent()
    assert a.send("status 3") == PROMPT
    assert a.send("pp drain on") == PROMPT
    assert not w.ops.draining
    assert a.send("quit") == b""  # third attempt: closed
    assert a.transport.disconnecting
    assert w.script.sent_commands() == []


def test_empty_line_and_prefix_are_wrong_passwords():
    a = Admin(pw_world().factory)
    a.take()
    assert a.send("") == PROMPT
    assert a.send(SECRET[:-1]) == PROMPT
    assert a.send(SECRET + "x") == b""
    assert a.transport.disconnecting


def test_each_connection_authenticates_on_its_own():
    w = pw_world()
    first = Admin(w.factory)
    first.take()
    assert first.send(SECRET).endswith(crlf(BANNER))
    second = Admin(w.factory)
    assert second.take() == PROMPT
    assert second.send("pp drain") == PROMPT


def test_password_compared_with_hmac_compare_digest(monkeypatch):
    import hmac

    from ovpnmgr import admin as admin_module

    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(admin_module.hmac, "compare_digest", spy)
    a = Admin(pw_world().factory)
    a.send("nope")
    assert calls == [(b"nope", SECRET.encode())]


def test_attempted_and_configured_passwords_never_logged(captured_logs):
    a = Admin(pw_world().factory)
    a.take()
    for attempt in ("hunter2-attempt", "another-try", "third-guess"):
        a.send(attempt)
    b = Admin(pw_world().factory)
    b.send(SECRET)
    logs = "\n".join(captured_logs())
    assert "wrong password" in logs or "wrong admin password" in logs
    for secret in ("hunter2-attempt", "another-try", "third-guess", SECRET):
        assert secret not in logs


def test_no_password_keeps_the_banner_first():
    a = Admin(world().factory)
    assert a.transport.value() == crlf(BANNER)


def test_service_reads_the_password_file(tmp_path):
    from ovpnmgr.admin import read_password

    pw = tmp_path / "admin.pw"
    pw.write_bytes(b"topsecret\r\nsecond line\n")
    assert read_password(pw) == b"topsecret"
    svc = AdminService(MemoryReactorClock(), AdminConfig(socket=str(tmp_path / "a.sock"), password_file=pw), world().ops)
    assert svc.factory.password == b"topsecret"
    a = Admin(svc.factory)
    assert a.take() == PROMPT
    assert a.send("topsecret") == crlf("SUCCESS: password is correct", BANNER)


def test_read_password_errors_name_the_key(tmp_path):
    from ovpnmgr.admin import read_password
    from ovpnmgr.config import ConfigError

    empty = tmp_path / "empty.pw"
    empty.write_bytes(b"\nsecond\n")
    with pytest.raises(ConfigError) as info:
        read_password(empty)
    assert info.value.key == "admin.password_file" and "first line is empty" in str(info.value)
    with pytest.raises(ConfigError) as info:
        read_password(tmp_path / "missing.pw")
    assert info.value.key == "admin.password_file" and "cannot read" in str(info.value)


def test_a_certificate_only_client_waiting_for_authentication_is_named_by_its_cn():
    """pp clients names a session the way the logs do (Session.name): before it was empty for a
    certificate-only client (no username) until authentication finished."""
    from ovpnmgr.session import Session

    w = world()
    s = Session(w.controller.epoch, 5, 1, {"common_name": "carol-laptop"}, 0.0)
    w.controller.sessions[s.key] = s
    out = Admin(w.factory).send("pp clients")
    assert b"CLIENT\tcarol-laptop\t5\t" in out, out
    assert s.log_fields["user"] == "carol-laptop"
    assert Session(0, 6, 1, {"username": "bob", "common_name": "bob-cert"}, 0.0).name == "bob"
