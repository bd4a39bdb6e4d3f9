"""The scripted fake management peer other modules' tests rely on."""

from twisted.application.internet import ClientService
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock

from ovpnmgr.events import ClientAddress, ClientConnect, ClientDisconnect, ClientEstablished, Hold, Info, parse_status3
from ovpnmgr.protocol import BadPassword, CommandFailed, CommandTimeout, ManagementDisconnected, ManagementProtocol
from ovpnmgr.testing import (
    ScriptedEndpoint,
    ScriptedManagement,
    banner_line,
    client_block_lines,
    connect_env,
    status3_lines,
)
from tests.unit.deferreds import failure_of, result_of


def scripted(**kw):
    """A connected script whose protocol records events in ``script.events``."""
    script = ScriptedManagement(**kw)
    script.events = []
    script.protocol.notify = script.events.append
    script.connect()
    return script


def test_connect_sends_banner_and_readies_protocol():
    """connect() makes the protocol ready with a version-5 banner and nothing written."""
    script = scripted()
    assert result_of(script.protocol.when_ready()) is script.protocol
    assert script.protocol.management_version == 5
    assert script.events == [Info(banner_line()[len(">INFO:") :])]
    assert script.sent_lines() == [] and script.transport.value() == b""


def test_connect_with_hold():
    """connect(hold=True) follows the banner with a HOLD notification."""
    script = ScriptedManagement()
    events = []
    script.protocol.notify = events.append
    script.connect(hold=True)
    assert events[-1] == Hold("Waiting for hold release:0")


def test_auto_reply_client_auth_after_end_and_grouping():
    """A client-auth block is answered once, after END; sent_commands groups it, sent_lines doesn't."""
    script = scripted(auto_reply=True)
    d = script.protocol.client_auth(0, 1, ["ifconfig-push 10.8.0.50 255.255.255.0"])
    assert result_of(d) == "client-auth command succeeded"
    assert script.sent_commands() == ["client-auth 0 1\nifconfig-push 10.8.0.50 255.255.255.0\nEND"]
    assert script.sent_lines() == ["client-auth 0 1", "ifconfig-push 10.8.0.50 255.255.255.0", "END"]
    script.clear_sent()
    assert script.sent_commands() == [] and script.transport.value() == b""


def test_auto_reply_defaults():
    """Every command the controller uses gets OpenVPN's usual answer; unknown ones get ERROR."""
    script = scripted(auto_reply=True, pid=99)
    p = script.protocol
    assert result_of(p.client_auth_nt(1, 2)) == "client-auth command succeeded"
    assert result_of(p.client_deny(1, 2, "r", "TEMP: x")) == "client-deny command succeeded"
    assert result_of(p.client_kill(1)) == "client-kill command succeeded"
    assert result_of(p.state_on()) == "real-time state notification set to ON"
    assert result_of(p.hold_release()) == "hold release succeeded"
    assert result_of(p.bytecount(5)) == "bytecount interval changed"
    assert result_of(p.pid()) == 99
    assert result_of(p.version())[-1] == "Management Version: 5"
    assert result_of(p.status3()).clients == ()
    assert failure_of(p.single("frobnicate"), CommandFailed).value.text.startswith("unknown command")
    assert script.sent_commands()[:3] == ["client-auth-nt 1 2", 'client-deny 1 2 "r" "TEMP: x"', "client-kill 1"]


def test_without_auto_reply_commands_wait_for_manual_reply():
    """With auto_reply off nothing is answered until reply() is called."""
    script = scripted()
    d = script.protocol.pid()
    assert not d.called
    assert script.sent_commands() == ["pid"]
    script.reply("SUCCESS: pid=5")
    assert result_of(d) == 5


def test_set_reply_overrides_and_withholding():
    """Overrides by verb or full line (line wins), callables, None for no answer, and clear_reply."""
    script = scripted(auto_reply=True)
    p = script.protocol
    script.set_reply("client-deny", ["ERROR: client-deny command failed"])
    assert failure_of(p.client_deny(1, 1, "x"), CommandFailed).value.text == "client-deny command failed"
    script.set_reply("client-auth 7 1", lambda command: ["ERROR: got %d lines" % len(command.split("\n"))])
    assert failure_of(p.client_auth(7, 1, ["push a"]), CommandFailed).value.text == "got 3 lines"
    assert result_of(p.client_auth(8, 1, [])) == "client-auth command succeeded"
    script.clear_reply("client-deny")
    assert result_of(p.client_deny(1, 1, "x")) == "client-deny command succeeded"
    script.set_reply("status 3", None)
    d = p.status3()
    script.clock.advance(5)
    failure_of(d, CommandTimeout)
    assert not script.connected
    assert script.clock.getDelayedCalls() == []


def test_status_clients_feed_status3():
    """status_clients become a realistic status 3 with pending and established rows."""
    script = scripted(
        auto_reply=True,
        status_clients=[{"cid": 0, "virtual_address": "10.8.0.50", "username": "alice"}, {"cid": 4}],
    )
    status = result_of(script.protocol.status3())
    established, pending = status.clients
    assert (established.cid, established.virtual_address, established.username) == (0, "10.8.0.50", "alice")
    assert not established.pending
    assert pending.cid == 4 and pending.pending and pending.username == "UNDEF" and pending.cipher == "BF-CBC"
    assert [r.virtual_address for r in status.routes] == ["10.8.0.50"]
    script.status_clients = []
    assert result_of(script.protocol.status3()).clients == ()


def test_status3_lines_format():
    """status3_lines matches the 2.6.14 layout and round-trips through parse_status3."""
    lines = status3_lines(
        [{"cid": 2, "virtual_address": "10.8.0.9", "bytes_received": 7, "bytes_sent": 8, "connected_since": 50}],
        now=100,
        include_end=True,
    )
    assert lines[0].startswith("TITLE\tOpenVPN 2.6.14 ")
    assert lines[1] == "TIME\t1970-01-01 00:01:40\t100"
    assert lines[2].startswith("HEADER\tCLIENT_LIST\tCommon Name\tReal Address\tVirtual Address\t")
    assert lines[-3:] == ["GLOBAL_STATS\tMax bcast/mcast queue length\t0", "GLOBAL_STATS\tdco_enabled\t0", "END"]
    (client,) = parse_status3(lines).clients
    assert (client.cid, client.bytes_received, client.bytes_sent, client.connected_since) == (2, 7, 8, 50)
    assert client.cipher == "AES-256-GCM"


def test_password_login_right_and_wrong():
    """With a server password the script prompts; right password → ready, wrong → BadPassword and closed."""
    good = ScriptedManagement(password=b"pw")
    d = good.protocol.when_ready()
    good.connect()
    assert result_of(d) is good.protocol
    assert good.sent_lines() == ["pw"] and good.sent_commands() == []

    bad = ScriptedManagement(password=b"nope", server_password=b"pw")
    d = bad.protocol.when_ready()
    gone = bad.protocol.when_disconnected()
    bad.connect()
    failure_of(d, BadPassword)
    assert not bad.connected
    assert gone.called


def test_notify_helpers_frame_blocks():
    """Notification helpers produce exactly framed blocks that the protocol turns into events."""
    assert client_block_lines("DISCONNECT", (5,)) == [">CLIENT:DISCONNECT,5", ">CLIENT:ENV,END"]
    assert client_block_lines("CONNECT", (1, 2), {"a": "b=c"}) == [
        ">CLIENT:CONNECT,1,2",
        ">CLIENT:ENV,a=b=c",
        ">CLIENT:ENV,END",
    ]
    script = scripted()
    script.events.clear()
    script.notify_connect(0, 1, {"username": "alice"})
    script.notify_address(0, "10.8.0.50")
    script.notify_established(0, {"common_name": "alice"})
    script.notify_disconnect(0)
    script.notify_hold()
    assert script.events == [
        ClientConnect(0, 1, {"username": "alice"}),
        ClientAddress(0, "10.8.0.50", True),
        ClientEstablished(0, {"common_name": "alice"}),
        ClientDisconnect(0, {}),
        Hold("Waiting for hold release:0"),
    ]


def test_connect_env_is_realistic():
    """connect_env starts with n_clients and carries the credentials and overrides."""
    env = connect_env(username="bob", password="pw", common_name="bob")
    assert list(env)[0] == "n_clients"
    assert (env["username"], env["password"], env["common_name"]) == ("bob", "pw", "bob")
    assert "ifconfig_pool_remote_ip" not in env


def test_disconnect_fails_pending_and_stops_feeding():
    """disconnect() delivers connectionLost; pending commands fail; later feeds are ignored."""
    script = scripted()
    d = script.protocol.pid()
    gone = script.protocol.when_disconnected()
    script.disconnect(ConnectionLost("reset"))
    failure_of(d, ManagementDisconnected)
    assert isinstance(result_of(gone), ConnectionLost)
    script.reply("SUCCESS: pid=1")  # ignored, no error
    assert not script.connected


def test_reentrant_controller_reply_inside_notification():
    """A notify hook answering CONNECT synchronously works, and the rest of the read is still processed in order."""
    script = ScriptedManagement(auto_reply=True)
    seen, results = [], []

    def notify(event):
        seen.append(event)
        if isinstance(event, ClientConnect):
            script.protocol.client_auth(event.cid, event.kid, []).addCallback(results.append)

    script.protocol.notify = notify
    script.connect()
    script.reply(*client_block_lines("CONNECT", (3, 1), {}), ">CLIENT:ADDRESS,3,10.8.0.3,1")
    assert results == ["client-auth command succeeded"]
    assert seen[1:] == [ClientConnect(3, 1, {}), ClientAddress(3, "10.8.0.3", True)]
    assert script.sent_commands() == ["client-auth 3 1\nEND"]


def test_scripted_endpoint_with_client_service():
    """With ClientService, prepareConnection runs before the banner; set_notify through the proxy works; reconnects."""
    clock = Clock()
    endpoint = ScriptedEndpoint(clock, hold=True, auto_reply=True)
    seen, prepared = [], []

    def prepare(protocol):
        prepared.append(protocol.ready)
        protocol.set_notify(seen.append)
        return protocol.when_ready().addCallback(lambda p: p.hold_release())

    factory = Factory.forProtocol(lambda: ManagementProtocol(clock))
    service = ClientService(endpoint, factory, clock=clock, prepareConnection=prepare)
    service.startService()
    connected = service.whenConnected()
    assert prepared == [False] and not connected.called
    clock.advance(0)
    assert connected.called
    assert seen[-1] == Hold("Waiting for hold release:0")
    assert endpoint.scripts[0].sent_commands() == ["hold release"]

    endpoint.scripts[0].disconnect()
    clock.advance(60)
    assert len(endpoint.scripts) == 2
    clock.advance(0)
    assert endpoint.scripts[1].sent_commands() == ["hold release"]
    stopped = service.stopService()
    assert stopped.called
    assert clock.getDelayedCalls() == []
