"""ManagementProtocol on the wire: exact bytes out, CRLF lines in, deterministic time."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from ovpnmgr.events import (
    ByteCountClient,
    ClientAddress,
    ClientConnect,
    ClientCrResponse,
    ClientDisconnect,
    ClientEstablished,
    ClientReauth,
    Fatal,
    Hold,
    Info,
    Log,
    State,
    Status,
    Unrecognized,
)
from ovpnmgr.protocol import (
    MULTI,
    NONE,
    SINGLE,
    BadPassword,
    CommandFailed,
    CommandTimeout,
    InvalidArgument,
    ManagementDisconnected,
    ManagementError,
    ManagementProtocol,
    ProtocolViolation,
)
from ovpnmgr.testing import status3_lines
from tests.unit.deferreds import failure_of, result_of

BANNER = b">INFO:OpenVPN Management Interface Version 5 -- type 'help' for more info\r\n"
SECRET = b"m4nagement-S3CRET"


class CountingTransport(StringTransport):
    """A StringTransport that also counts write calls."""

    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, data):
        self.writes += 1
        super().write(data)

    def writeSequence(self, data):
        self.writes += 1
        super().writeSequence(data)


class Conn:
    """One protocol on a StringTransport with a Clock, recording notifications."""

    def __init__(self, password=None, timeout=5.0, ready=True, **kw):
        self.clock = Clock()
        self.proto = ManagementProtocol(self.clock, password=password, command_timeout=timeout, **kw)
        self.events = []
        self.proto.notify = self.events.append
        self.transport = CountingTransport()
        self.proto.makeConnection(self.transport)
        if ready:
            self.feed(BANNER)
            self.events.clear()

    def feed(self, data):
        self.proto.dataReceived(data)

    def lines(self, *lines):
        self.proto.dataReceived(b"".join(line.encode() + b"\r\n" for line in lines))

    def sent(self):
        value = self.transport.value()
        self.transport.clear()
        return value

    def lose(self, exc=None):
        self.proto.connectionLost(Failure(exc or ConnectionDone()))


def assert_no_result(d):
    """The Deferred has not fired yet (checked without consuming a result)."""
    assert not d.called


# --- banner, version, readiness ------------------------------------------------------------------


def test_banner_makes_ready_and_records_version():
    """The banner fires when_ready with the protocol, records the version and is delivered as Info."""
    c = Conn(ready=False)
    d = c.proto.when_ready()
    assert_no_result(d)
    c.feed(BANNER)
    assert result_of(d) is c.proto
    assert c.proto.management_version == 5 and c.proto.ready
    assert c.events == [Info("OpenVPN Management Interface Version 5 -- type 'help' for more info")]
    assert c.sent() == b""


def test_when_ready_is_fresh_and_immediate_once_ready():
    """Each call gives a new Deferred; after the banner it has already fired."""
    c = Conn()
    d1, d2 = c.proto.when_ready(), c.proto.when_ready()
    assert d1 is not d2
    assert result_of(d1) is c.proto and result_of(d2) is c.proto


def test_old_management_version_refused():
    """Management version < 5 (OpenVPN 2.5) fails when_ready with ProtocolViolation and drops the link."""
    c = Conn(ready=False)
    d = c.proto.when_ready()
    queued = c.proto.pid()
    c.feed(b">INFO:OpenVPN Management Interface Version 3 -- type 'help' for more info\r\n")
    failure_of(d, ProtocolViolation)
    failure_of(queued, ManagementDisconnected)
    assert c.transport.disconnecting and not c.proto.ready
    assert c.sent() == b""
    failure_of(c.proto.when_ready(), ProtocolViolation)


def test_notifications_before_banner_are_delivered():
    """Real-time lines that precede the banner reach notify, in order."""
    c = Conn(ready=False)
    c.lines(">LOG:1,I,starting", ">HOLD:Waiting for hold release:0")
    c.feed(BANNER)
    assert c.events[:2] == [Log(1, "I", "starting"), Hold("Waiting for hold release:0")]
    assert c.proto.ready


def test_hold_after_banner_in_same_read_is_delivered():
    """The HOLD that follows the banner in the same read is delivered after ready."""
    c = Conn(ready=False)
    seen = []
    c.proto.when_ready().addCallback(lambda p: seen.append(("ready", list(c.events))))
    c.feed(BANNER + b">HOLD:Waiting for hold release:0\r\n")
    assert seen == [("ready", [Info("OpenVPN Management Interface Version 5 -- type 'help' for more info")])]
    assert c.events[-1] == Hold("Waiting for hold release:0")


def test_commands_before_ready_are_held_until_banner():
    """A command issued before login is not written (it would be read as the password)."""
    c = Conn(password=SECRET, ready=False)
    d = c.proto.pid()
    c.feed(b"ENTER PASSWORD:")
    assert c.sent() == SECRET + b"\n"
    c.lines("SUCCESS: password is correct")
    assert c.sent() == b""
    c.feed(BANNER)
    assert c.sent() == b"pid\n"
    c.lines("SUCCESS: pid=77")
    assert result_of(d) == 77


def test_login_timeout():
    """No banner within the login timeout: when_ready fails with CommandTimeout, link dropped, no timers left."""
    c = Conn(ready=False, timeout=5.0)
    d = c.proto.when_ready()
    c.clock.advance(4.9)
    assert_no_result(d)
    c.clock.advance(0.2)
    failure_of(d, CommandTimeout)
    assert c.transport.disconnecting
    assert c.clock.getDelayedCalls() == []


def test_banner_cancels_login_timer():
    """After the banner the login timer is gone."""
    c = Conn(ready=False)
    assert len(c.clock.getDelayedCalls()) == 1
    c.feed(BANNER)
    assert c.clock.getDelayedCalls() == []


# --- password pre-phase ---------------------------------------------------------------------------


def test_password_correct():
    """The prompt (no CRLF) gets the password + LF; SUCCESS then banner make the protocol ready."""
    c = Conn(password=SECRET, ready=False)
    d = c.proto.when_ready()
    c.feed(b"ENTER PASSWORD:")
    assert c.sent() == SECRET + b"\n"
    c.feed(b"SUCCESS: password is correct\r\n" + BANNER)
    assert result_of(d) is c.proto
    assert c.sent() == b""


def test_password_prompt_split_across_reads():
    """A prompt split as 'ENTER PASS' + 'WORD:' is recognised only when complete."""
    c = Conn(password=SECRET, ready=False)
    c.feed(b"ENTER PASS")
    assert c.sent() == b""
    c.feed(b"WORD:")
    assert c.sent() == SECRET + b"\n"


def test_password_prompt_in_one_read_with_other_data():
    """A prompt following other lines in the same read, with the rest of the login after it."""
    c = Conn(password=SECRET, ready=False)
    d = c.proto.when_ready()
    c.feed(b">LOG:5,I,hello\r\nENTER PASSWORD:")
    assert c.events == [Log(5, "I", "hello")]
    assert c.sent() == SECRET + b"\n"
    c.feed(b"SUCCESS: password is correct\r\n" + BANNER + b">HOLD:Waiting for hold release:0\r\n")
    assert result_of(d) is c.proto
    assert c.events[-1] == Hold("Waiting for hold release:0")


def test_password_prompt_one_byte_at_a_time():
    """Even byte-by-byte delivery of the whole login works."""
    c = Conn(password=SECRET, ready=False)
    d = c.proto.when_ready()
    for byte in b"ENTER PASSWORD:":
        c.feed(bytes([byte]))
    assert c.sent() == SECRET + b"\n"
    for byte in b"SUCCESS: password is correct\r\n" + BANNER:
        c.feed(bytes([byte]))
    assert result_of(d) is c.proto


def test_wrong_password_second_prompt():
    """A second prompt after the password was sent means it was refused: BadPassword, link dropped."""
    c = Conn(password=b"wrong", ready=False)
    d = c.proto.when_ready()
    gone = c.proto.when_disconnected()
    c.feed(b"ENTER PASSWORD:")
    assert c.sent() == b"wrong\n"
    c.feed(b"ENTER PASSWORD:")
    failure_of(d, BadPassword)
    assert c.transport.disconnecting
    assert c.sent() == b""
    failure_of(c.proto.pid(), ManagementDisconnected)
    assert_no_result(gone)
    c.lose()
    assert isinstance(result_of(gone), ConnectionDone)
    assert c.clock.getDelayedCalls() == []


def test_prompt_without_configured_password():
    """A password prompt with no password configured fails with BadPassword and sends nothing."""
    c = Conn(ready=False)
    d = c.proto.when_ready()
    c.feed(b"ENTER PASSWORD:")
    failure_of(d, BadPassword)
    assert c.sent() == b""
    assert c.transport.disconnecting


def test_explicit_bad_password_error_line():
    """Older servers' 'ERROR: bad password' line also yields BadPassword."""
    c = Conn(password=b"x", ready=False)
    d = c.proto.when_ready()
    c.feed(b"ENTER PASSWORD:")
    c.feed(b"ERROR: bad password\r\n")
    failure_of(d, BadPassword)


def test_password_with_newline_refused():
    """A password containing LF could inject commands; the constructor refuses it."""
    with pytest.raises(ValueError):
        ManagementProtocol(Clock(), password=b"a\nstatus")


def test_password_never_in_repr_or_logs():
    """Neither the management password nor a client's password appears in any repr or log."""
    client_secret = "client-pw-QWERTY"
    with capturedLogs() as logged:
        c = Conn(password=SECRET, ready=False)
        c.feed(b"ENTER PASSWORD:")
        c.feed(b"SUCCESS: password is correct\r\n" + BANNER)
        c.lines(">CLIENT:CONNECT,1,1", ">CLIENT:ENV,password=" + client_secret, ">CLIENT:ENV,END")
        c.lines(">CLIENT:ENV,password=" + client_secret)  # stray: logged as unrecognized
        c.lines("SUCCESS: stray reply with no command")
        c.proto.notify = lambda event: 1 / 0  # failure log includes the event repr
        c.lines(">CLIENT:REAUTH,1,2", ">CLIENT:ENV,password=" + client_secret, ">CLIENT:ENV,END")
        d = c.proto.pid()
        c.clock.advance(10)
        failure_of(d, CommandTimeout)
        c.lose()
    texts = [formatEvent(e) for e in logged] + [repr(c.proto)] + [repr(e) for e in c.events]
    texts += [repr(v) for e in logged for v in e.values()]
    assert len(logged) >= 4
    for text in texts:
        assert SECRET.decode() not in text
        assert client_secret not in text
    (connect,) = [e for e in c.events if isinstance(e, ClientConnect)]
    assert connect.env["password"] == client_secret


# --- notifications ------------------------------------------------------------------------------


def test_every_notification_type_is_delivered():
    """Each notification kind reaches notify as its event, in wire order."""
    c = Conn()
    c.lines(
        ">INFO:hello",
        ">HOLD:Waiting for hold release:10",
        ">LOG:1795375446,W,a,b",
        ">STATE:1795375446,ASSIGN_IP,,10.77.0.1,,,,",
        ">BYTECOUNT_CLI:2,10,20",
        ">CLIENT:CONNECT,0,1",
        ">CLIENT:ENV,n_clients=0",
        ">CLIENT:ENV,END",
        ">CLIENT:REAUTH,0,3",
        ">CLIENT:ENV,END",
        ">CLIENT:ADDRESS,0,10.8.0.50,1",
        ">CLIENT:ESTABLISHED,0",
        ">CLIENT:ENV,ifconfig_pool_remote_ip=10.8.0.50",
        ">CLIENT:ENV,END",
        ">CLIENT:CR_RESPONSE,0,3,YWJj",
        ">CLIENT:ENV,END",
        ">CLIENT:DISCONNECT,0",
        ">CLIENT:ENV,bytes_sent=5",
        ">CLIENT:ENV,END",
        ">UPDOWN:UP",
        ">FATAL:boom",
    )
    assert c.events == [
        Info("hello"),
        Hold("Waiting for hold release:10"),
        Log(1795375446, "W", "a,b"),
        State(
            1795375446, "ASSIGN_IP", "", "10.77.0.1", "", ("1795375446", "ASSIGN_IP", "", "10.77.0.1", "", "", "", "")
        ),
        ByteCountClient(2, 10, 20),
        ClientConnect(0, 1, {"n_clients": "0"}),
        ClientReauth(0, 3, {}),
        ClientAddress(0, "10.8.0.50", True),
        ClientEstablished(0, {"ifconfig_pool_remote_ip": "10.8.0.50"}),
        ClientCrResponse(0, 3, "YWJj", {}),
        ClientDisconnect(0, {"bytes_sent": "5"}),
        Unrecognized(">UPDOWN:UP"),
        Fatal("boom"),
    ]


def test_client_block_env_values_on_the_wire():
    """Empty values, '=' inside values and LF-only line ends survive the protocol."""
    c = Conn()
    c.feed(b">CLIENT:CONNECT,4,1\r\n>CLIENT:ENV,password=\r\n>CLIENT:ENV,X=a=b\n>CLIENT:ENV,END\r\n")
    assert c.events == [ClientConnect(4, 1, {"password": "", "X": "a=b"})]


def test_header_only_disconnect_on_the_wire():
    """'>CLIENT:DISCONNECT,5' directly followed by ENV,END gives a DISCONNECT with an empty env."""
    c = Conn()
    c.lines(">CLIENT:DISCONNECT,5", ">CLIENT:ENV,END")
    assert c.events == [ClientDisconnect(5, {})]


def test_address_between_blocks_not_misassigned():
    """ADDRESS between a CONNECT and an ESTABLISHED block is its own event, in order."""
    c = Conn()
    c.lines(
        ">CLIENT:CONNECT,1,1",
        ">CLIENT:ENV,END",
        ">CLIENT:ADDRESS,1,10.8.0.9,1",
        ">CLIENT:ESTABLISHED,1",
        ">CLIENT:ENV,common_name=a",
        ">CLIENT:ENV,END",
    )
    assert c.events == [
        ClientConnect(1, 1, {}),
        ClientAddress(1, "10.8.0.9", True),
        ClientEstablished(1, {"common_name": "a"}),
    ]


def test_notification_between_command_and_reply():
    """A DISCONNECT block arriving before client-auth's SUCCESS is delivered; the reply still correlates."""
    c = Conn()
    d = c.proto.client_auth(2, 1, ["ifconfig-push 10.8.0.50 255.255.255.0"])
    c.lines(">CLIENT:DISCONNECT,1", ">CLIENT:ENV,common_name=alice", ">CLIENT:ENV,END")
    assert_no_result(d)
    c.lines("SUCCESS: client-auth command succeeded")
    assert result_of(d) == "client-auth command succeeded"
    assert c.events == [ClientDisconnect(1, {"common_name": "alice"})]


def test_notifications_inside_multi_line_reply():
    """Notifications interleaved in a status 3 reply are delivered and not part of the result."""
    c = Conn()
    d = c.proto.multi("status 3")
    c.lines("TITLE\tx", ">BYTECOUNT_CLI:1,2,3", "TIME\tt\t5", ">CLIENT:ADDRESS,1,10.8.0.2,1", "END")
    assert result_of(d) == ["TITLE\tx", "TIME\tt\t5"]
    assert c.events == [ByteCountClient(1, 2, 3), ClientAddress(1, "10.8.0.2", True)]


def test_gt_line_never_completes_a_command():
    """Lines starting with '>' never answer a command, even if they look like replies."""
    c = Conn()
    single = c.proto.pid()
    c.lines(">SUCCESS: pid=1", ">ERROR: no", ">END")
    assert_no_result(single)
    c.lines("SUCCESS: pid=9")
    assert result_of(single) == 9
    multi = c.proto.version()
    c.lines(">END", "Management Version: 5", "END")
    assert result_of(multi) == ["Management Version: 5"]
    assert all(isinstance(e, Unrecognized) for e in c.events)


def test_notify_exception_is_logged_and_harmless():
    """An exception in notify is logged; later notifications and replies still work."""
    c = Conn()
    seen = []

    def notify(event):
        seen.append(event)
        if isinstance(event, Hold):
            raise RuntimeError("controller bug")

    c.proto.notify = notify
    d = c.proto.pid()
    with capturedLogs() as logged:
        c.lines(">HOLD:x", ">INFO:after", "SUCCESS: pid=3")
    assert seen == [Hold("x"), Info("after")]
    assert result_of(d) == 3
    assert any(e.get("log_failure") and e["log_failure"].check(RuntimeError) for e in logged)


def test_default_notify_drops_events():
    """Without a notify hook set, notifications are dropped silently."""
    proto = ManagementProtocol(Clock())
    proto.makeConnection(StringTransport())
    proto.dataReceived(BANNER + b">HOLD:x\r\n>CLIENT:DISCONNECT,1\r\n>CLIENT:ENV,END\r\n")
    assert proto.ready


def test_set_notify():
    """set_notify installs the hook (and None restores the no-op)."""
    c = Conn()
    got = []
    c.proto.set_notify(got.append)
    c.lines(">INFO:x")
    c.proto.set_notify(None)
    c.lines(">INFO:y")
    assert got == [Info("x")]


# --- commands, FIFO, shapes -------------------------------------------------------------------


def test_fifo_correlation_one_in_flight():
    """Commands go out one at a time and each reply answers the oldest outstanding command."""
    c = Conn()
    d_pid = c.proto.pid()
    d_state = c.proto.state_on()
    d_status = c.proto.status3()
    d_kill = c.proto.client_kill(4)
    assert c.sent() == b"pid\n"
    c.lines("SUCCESS: pid=4242")
    assert result_of(d_pid) == 4242
    assert c.sent() == b"state on\n"
    c.lines("SUCCESS: real-time state notification set to ON")
    assert result_of(d_state) == "real-time state notification set to ON"
    assert c.sent() == b"status 3\n"
    c.lines("TITLE\tOpenVPN 2.6.14", "TIME\tx\t12", "END", "SUCCESS: client-kill command succeeded")
    status = result_of(d_status)
    assert isinstance(status, Status) and status.time == 12 and status.title == "OpenVPN 2.6.14"
    assert c.sent() == b"client-kill 4\n"
    assert result_of(d_kill) == "client-kill command succeeded"
    assert c.clock.getDelayedCalls() == []


def test_error_on_single_and_multi():
    """ERROR: fails single and multi commands with CommandFailed carrying the text; the next command proceeds."""
    c = Conn()
    d1 = c.proto.client_deny(1, 1, "x")
    d2 = c.proto.multi("status 3")
    d3 = c.proto.pid()
    c.lines("ERROR: client-deny command failed")
    assert failure_of(d1, CommandFailed).value.text == "client-deny command failed"
    c.lines("ERROR: The 'status' command is not supported by the current daemon mode")
    assert (
        failure_of(d2, CommandFailed).value.text == "The 'status' command is not supported by the current daemon mode"
    )
    c.lines("SUCCESS: pid=1")
    assert result_of(d3) == 1


def test_error_line_inside_multi_reply_is_data():
    """Only a first-line ERROR: fails a multi command; later ones are ordinary lines."""
    c = Conn()
    d = c.proto.multi("log all")
    c.lines("1,I,ok", "ERROR: something logged", "END")
    assert result_of(d) == ["1,I,ok", "ERROR: something logged"]


def test_generic_command_and_none_shape():
    """command() sends the line as given; NONE fires once written and lets the next command go."""
    c = Conn()
    d_none = c.proto.command("echo on", NONE)
    d_next = c.proto.command("load-stats", SINGLE)
    assert result_of(d_none) is None
    assert c.sent() == b"echo on\nload-stats\n"
    c.lines("SUCCESS: nclients=0,bytesin=0,bytesout=0")
    assert result_of(d_next) == "nclients=0,bytesin=0,bytesout=0"
    d_multi = c.proto.command("help", MULTI)
    c.lines("Management Interface for OpenVPN", "END")
    assert result_of(d_multi) == ["Management Interface for OpenVPN"]


def test_unexpected_line_without_command_is_ignored():
    """A reply-looking line with nothing in flight is logged and dropped; the next command is unaffected."""
    c = Conn()
    with capturedLogs() as logged:
        c.lines("SUCCESS: stray")
    assert any("stray" in formatEvent(e) for e in logged)
    d = c.proto.pid()
    c.lines("SUCCESS: pid=2")
    assert result_of(d) == 2
    assert not c.transport.disconnecting


def test_non_reply_line_to_single_command_drops_connection():
    """A single-line command answered by neither SUCCESS nor ERROR: ProtocolViolation, link dropped."""
    c = Conn()
    d1 = c.proto.hold_release()
    d2 = c.proto.pid()
    c.lines("Management Version: 5")
    failure_of(d1, ProtocolViolation)
    failure_of(d2, ManagementDisconnected)
    assert c.transport.disconnecting
    assert c.clock.getDelayedCalls() == []


def test_pid_with_unexpected_text():
    """A SUCCESS reply to pid without 'pid=N' fails with ProtocolViolation but keeps the link."""
    c = Conn()
    d = c.proto.pid()
    c.lines("SUCCESS: something else")
    failure_of(d, ProtocolViolation)
    assert not c.transport.disconnecting


def test_cancel_queued_command_is_never_sent():
    """Cancelling a queued command removes it; the commands around it still correlate."""
    c = Conn()
    d1 = c.proto.pid()
    d2 = c.proto.state_on()
    d3 = c.proto.hold_release()
    d2.cancel()
    failure_of(d2, CancelledError)
    c.lines("SUCCESS: pid=1")
    assert c.sent() == b"pid\nhold release\n"
    c.lines("SUCCESS: hold release succeeded")
    assert result_of(d3) == "hold release succeeded"
    assert result_of(d1) == 1


def test_cancel_in_flight_command_discards_its_reply():
    """Cancelling the command on the wire consumes its reply silently; FIFO stays aligned."""
    c = Conn()
    d1 = c.proto.pid()
    d2 = c.proto.state_on()
    d1.cancel()
    failure_of(d1, CancelledError)
    c.lines("SUCCESS: pid=1", "SUCCESS: real-time state notification set to ON")
    assert result_of(d2) == "real-time state notification set to ON"


# --- exact bytes of every command -----------------------------------------------------------------


def test_client_auth_exact_bytes_one_write():
    """client-auth, its config lines and END go out in a single write; reply after END."""
    c = Conn()
    before = c.transport.writes
    d = c.proto.client_auth(0, 1, ["ifconfig-push 10.8.0.50 255.255.255.0", 'push "dhcp-option DNS 10.8.0.1"'])
    assert c.transport.writes == before + 1
    assert c.sent() == (
        b'client-auth 0 1\nifconfig-push 10.8.0.50 255.255.255.0\npush "dhcp-option DNS 10.8.0.1"\nEND\n'
    )
    c.lines("SUCCESS: client-auth command succeeded")
    assert result_of(d) == "client-auth command succeeded"


def test_client_auth_empty_config():
    """An empty config block is just the header and END."""
    c = Conn()
    c.proto.client_auth(12, 3, [])
    assert c.sent() == b"client-auth 12 3\nEND\n"


@pytest.mark.parametrize(
    "call, wire",
    [
        (lambda p: p.client_auth_nt(2, 3), b"client-auth-nt 2 3\n"),
        (lambda p: p.client_deny(3, 1, "device offline"), b'client-deny 3 1 "device offline"\n'),
        (
            lambda p: p.client_deny(3, 1, "device offline", "TEMP[backoff 30,advance no]: device offline"),
            b'client-deny 3 1 "device offline" "TEMP[backoff 30,advance no]: device offline"\n',
        ),
        (lambda p: p.client_deny(3, 1, 'bad "q" \\ x'), b'client-deny 3 1 "bad \\"q\\" \\\\ x"\n'),
        (lambda p: p.client_deny(3, 1, ""), b'client-deny 3 1 ""\n'),
        (lambda p: p.client_kill(9), b"client-kill 9\n"),
        (lambda p: p.client_kill(9, "HALT,bye now"), b'client-kill 9 "HALT,bye now"\n'),
        (lambda p: p.state_on(), b"state on\n"),
        (lambda p: p.hold_release(), b"hold release\n"),
        (lambda p: p.bytecount(5), b"bytecount 5\n"),
        (lambda p: p.bytecount(0), b"bytecount 0\n"),
        (lambda p: p.pid(), b"pid\n"),
        (lambda p: p.version(), b"version\n"),
        (lambda p: p.status3(), b"status 3\n"),
        (lambda p: p.single("load-stats"), b"load-stats\n"),
    ],
)
def test_command_exact_bytes(call, wire):
    """Each helper writes exactly OpenVPN's command syntax, quoted where needed."""
    c = Conn()
    call(c.proto)
    assert c.sent() == wire


def test_reasons_truncated_to_openvpn_parameter_limit():
    """Reasons longer than 256 UTF-8 bytes are cut on a character boundary (OpenVPN refuses longer params)."""
    c = Conn()
    c.proto.client_deny(1, 1, "é" * 200, "x" * 300)
    wire = c.sent()
    reason, client_reason = wire[len(b"client-deny 1 1 ") : -1].split(b" ")
    assert reason == b'"' + "é".encode() * 128 + b'"'
    assert client_reason == b'"' + b"x" * 256 + b'"'


def test_version_lines_and_status3_parsed():
    """version() returns its lines; status3() returns a parsed Status with pending rows."""
    c = Conn()
    dv = c.proto.version()
    c.lines("OpenVPN Version: OpenVPN 2.6.14", "Management Version: 5", "END")
    assert result_of(dv) == ["OpenVPN Version: OpenVPN 2.6.14", "Management Version: 5"]
    ds = c.proto.status3()
    c.lines(
        "HEADER\tCLIENT_LIST\tCommon Name\tReal Address\tVirtual Address\tClient ID",
        "CLIENT_LIST\tUNDEF\t1.2.3.4:5\t\t7",
        "END",
    )
    (client,) = result_of(ds).clients
    assert client.cid == 7 and client.pending


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda p: p.client_auth("1; pid", 1, []),
        lambda p: p.client_auth("1", 1, []),
        lambda p: p.client_auth(1, "1", []),
        lambda p: p.client_auth(True, 1, []),
        lambda p: p.client_auth(1, False, []),
        lambda p: p.client_auth(-1, 1, []),
        lambda p: p.client_auth(1, -1, []),
        lambda p: p.client_auth(1.0, 1, []),
        lambda p: p.client_auth(2**64, 1, []),
        lambda p: p.client_auth(1, 1, ["push x\npid"]),
        lambda p: p.client_auth(1, 1, ["push x\r"]),
        lambda p: p.client_auth(1, 1, ["push \0x"]),
        lambda p: p.client_auth(1, 1, ["END"]),
        lambda p: p.client_auth(1, 1, [" END "]),
        lambda p: p.client_auth(1, 1, ["x" * 1001]),
        lambda p: p.client_auth(1, 1, "ifconfig-push 1.2.3.4 255.0.0.0"),
        lambda p: p.client_auth(1, 1, [b"bytes"]),
        lambda p: p.client_auth_nt("0 0\npid", 1),
        lambda p: p.client_deny(1, 1, "line\nbreak"),
        lambda p: p.client_deny(1, 1, "ok", "tab\there"),
        lambda p: p.client_deny(1, 1, b"bytes"),
        lambda p: p.client_kill(None),
        lambda p: p.client_kill(1, "a\rb"),
        lambda p: p.bytecount(-1),
        lambda p: p.bytecount(True),
        lambda p: p.command("version 3", SINGLE),
        lambda p: p.command("version 5", NONE),
        lambda p: p.command("client-auth 1 1", SINGLE),
        lambda p: p.command('"client-auth" 1 1', SINGLE),
        lambda p: p.command("", SINGLE),
        lambda p: p.command("   ", SINGLE),
        lambda p: p.command("# comment", SINGLE),
        lambda p: p.command("status\n3", MULTI),
        lambda p: p.command("x" * 1001, SINGLE),
        lambda p: p.command("pid", "single"),
        lambda p: p.single(b"pid"),
    ],
)
def test_invalid_arguments_raise_synchronously_and_send_nothing(call):
    """Bad CID/KID, injected line breaks, END lines, oversize lines and 'version N' are refused up front."""
    c = Conn()
    with pytest.raises(InvalidArgument):
        call(c.proto)
    assert c.sent() == b""
    assert c.proto._inflight is None and not c.proto._queue


def test_line_of_exactly_1000_bytes_is_accepted():
    """The outgoing cap is inclusive: 1000 bytes pass, 1001 do not."""
    c = Conn()
    c.proto.client_auth(1, 1, ["x" * 1000])
    assert c.sent() == b"client-auth 1 1\n" + b"x" * 1000 + b"\nEND\n"


def test_invalid_argument_is_a_value_error():
    """InvalidArgument is a ValueError (not a ManagementError): a caller bug, not a server state."""
    assert issubclass(InvalidArgument, ValueError) and not issubclass(InvalidArgument, ManagementError)
    for exc in (CommandFailed, CommandTimeout, ManagementDisconnected, BadPassword, ProtocolViolation):
        assert issubclass(exc, ManagementError)


# --- timeouts and disconnects -----------------------------------------------------------------


def test_timeout_fails_command_drops_connection_and_leaves_no_timers():
    """A missing reply: CommandTimeout, connection dropped, queued commands fail, later ones fail at once."""
    c = Conn(timeout=5.0)
    d1 = c.proto.pid()
    d2 = c.proto.state_on()
    c.clock.advance(4.99)
    assert_no_result(d1)
    c.clock.advance(0.02)
    failure_of(d1, CommandTimeout)
    failure_of(d2, ManagementDisconnected)
    assert c.transport.disconnecting
    assert c.sent() == b"pid\n"
    failure_of(c.proto.hold_release(), ManagementDisconnected)
    failure_of(c.proto.when_ready(), CommandTimeout)
    c.lines("SUCCESS: pid=1")  # a late reply is ignored
    c.lose()
    assert c.clock.getDelayedCalls() == []


def test_timer_is_per_command_and_starts_on_send():
    """The next command gets its own full timeout from when it is written; replies cancel timers."""
    c = Conn(timeout=5.0)
    d1 = c.proto.pid()
    d2 = c.proto.pid()
    c.clock.advance(4)
    c.lines("SUCCESS: pid=1")
    assert result_of(d1) == 1
    c.clock.advance(4)
    assert_no_result(d2)
    c.lines("SUCCESS: pid=2")
    assert result_of(d2) == 2
    assert c.clock.getDelayedCalls() == []
    assert not c.transport.disconnecting


def test_no_timeout_when_disabled():
    """command_timeout=None disables per-command timers."""
    c = Conn(timeout=None)
    d = c.proto.pid()
    assert c.clock.getDelayedCalls() == []
    c.clock.advance(3600)
    assert_no_result(d)


def test_connection_lost_fails_everything_pending():
    """connectionLost fails the in-flight and queued commands; when_disconnected fires with the reason."""
    c = Conn()
    gone = c.proto.when_disconnected()
    d1 = c.proto.status3()
    d2 = c.proto.client_auth(1, 1, [])
    c.lines("TITLE\tpartial")
    c.lose(ConnectionLost("peer reset"))
    failure_of(d1, ManagementDisconnected)
    failure_of(d2, ManagementDisconnected)
    assert isinstance(result_of(gone), ConnectionLost)
    assert isinstance(result_of(c.proto.when_disconnected()), ConnectionLost)
    failure_of(c.proto.pid(), ManagementDisconnected)
    failure_of(c.proto.when_ready(), ManagementDisconnected)
    assert not c.proto.ready
    assert c.clock.getDelayedCalls() == []
    c.lines("SUCCESS: late")  # ignored after loss
    c.lose()  # idempotent


def test_connection_lost_before_ready():
    """Losing the connection during login fails when_ready and commands held for later."""
    c = Conn(ready=False)
    d = c.proto.when_ready()
    held = c.proto.pid()
    c.lose()
    failure_of(d, ManagementDisconnected)
    failure_of(held, ManagementDisconnected)
    assert c.clock.getDelayedCalls() == []


def test_when_disconnected_is_fresh_per_call_and_never_fails():
    """Each waiter gets its own Deferred; all fire with the reason value, even after an abort."""
    c = Conn()
    a, b = c.proto.when_disconnected(), c.proto.when_disconnected()
    assert a is not b
    failed = c.proto.pid()
    c.clock.advance(10)
    failure_of(failed, CommandTimeout)
    assert_no_result(a)
    c.lose()
    assert isinstance(result_of(a), ConnectionDone) and isinstance(result_of(b), ConnectionDone)


def test_callbacks_issuing_commands_during_failure_fail_cleanly():
    """A caller reacting to a failure by sending another command gets an immediate failure."""
    c = Conn()
    again = []
    c.proto.pid().addErrback(lambda f: again.append(c.proto.pid()))
    c.lose()
    failure_of(again[0], ManagementDisconnected)


# --- hostile or broken input -------------------------------------------------------------------


def test_oversized_line_is_skipped_and_protocol_keeps_working():
    """A line over MAX_LENGTH is logged (length only) and skipped; later lines still correlate."""
    c = Conn()
    d = c.proto.status3()
    with capturedLogs() as logged:
        c.feed(b"A" * (c.proto.MAX_LENGTH + 1) + b"\r\n")
    assert not c.transport.disconnecting
    assert not d.called
    assert any("skipped" in formatEvent(e) for e in logged)
    assert not any("AAAA" in formatEvent(e) for e in logged)
    c.lines(*status3_lines([], include_end=True))
    assert result_of(d).clients == ()
    assert c.clock.getDelayedCalls() == []


def test_oversized_partial_line_is_discarded_up_to_its_newline():
    """An unterminated line growing past MAX_LENGTH is not buffered; the rest of it is skipped too."""
    c = Conn()
    with capturedLogs() as logged:
        for _ in range(3):
            c.feed(b"B" * (c.proto.MAX_LENGTH // 2))
        assert c.proto._buffer == b""
        c.feed(b"BBBB\r\n>HOLD:Waiting for hold release:0\r\n")
    assert not c.transport.disconnecting
    assert c.events[-1] == Hold("Waiting for hold release:0")
    assert sum("skipped" in formatEvent(e) for e in logged) == 1


def test_oversized_single_reply_ends_in_timeout_not_desync():
    """A skipped single-line reply leaves its command to time out, which drops the connection."""
    c = Conn()
    d = c.proto.pid()
    c.feed(b"SUCCESS: " + b"9" * c.proto.MAX_LENGTH + b"\r\n")
    assert not d.called
    c.clock.advance(c.proto.command_timeout + 1)
    failure_of(d, CommandTimeout)
    assert c.transport.disconnecting


def test_garbage_and_invalid_utf8_do_not_break_the_protocol():
    """Binary garbage, NULs and invalid UTF-8 are logged/ignored; a later command still works."""
    c = Conn()
    c.feed(b"\xff\xfe\x00garbage\r\n\r\n>\xc3\x28\r\n>CLIENT:CONNECT,abc,1\r\n>CLIENT:ENV,a=b\r\n>CLIENT:ENV,END\r\n")
    assert c.events[-1] == Unrecognized(">CLIENT:CONNECT,abc,1")
    assert not c.transport.disconnecting
    d = c.proto.pid()
    c.lines("SUCCESS: pid=8")
    assert result_of(d) == 8


def test_repr_shows_state():
    """repr() shows the connection state and queue, useful in logs."""
    c = Conn()
    c.proto.pid()
    assert "ready" in repr(c.proto) and "'pid' in flight" in repr(c.proto)


# --- property-based robustness ------------------------------------------------------------------

_LINES = st.sampled_from(
    [
        b"ENTER PASSWORD:",
        b"ENTER PASS",
        b"SUCCESS: password is correct\r\n",
        BANNER,
        b">INFO:OpenVPN Management Interface Version 2 -- x\r\n",
        b">CLIENT:CONNECT,1,1\r\n",
        b">CLIENT:CONNECT,x,y\r\n",
        b">CLIENT:ENV,password=pw\r\n",
        b">CLIENT:ENV,END\r\n",
        b">CLIENT:ADDRESS,1,10.0.0.1,1\r\n",
        b">CLIENT:DISCONNECT,1\r\n",
        b">STATE:1,CONNECTED,SUCCESS,,,,,\r\n",
        b">STATE:x\r\n",
        b">BYTECOUNT_CLI:1,2\r\n",
        b"SUCCESS: pid=1\r\n",
        b"ERROR: nope\r\n",
        b"END\r\n",
        b"TITLE\tx\r\n",
        b"\r\n",
        b"\n",
    ]
)
_CHUNKS = st.lists(st.one_of(st.binary(max_size=64), _LINES), max_size=40)
_ACTIONS = st.lists(st.sampled_from(["pid", "status3", "auth", "deny", "advance", "none"]), max_size=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=_CHUNKS, actions=_ACTIONS, password=st.sampled_from([None, b"pw"]))
def test_random_input_never_raises(chunks, actions, password):
    """Arbitrary bytes and command interleavings never raise; after loss nothing is left pending."""
    clock = Clock()
    proto = ManagementProtocol(clock, password=password, command_timeout=2.0)
    proto.notify = lambda event: None
    proto.makeConnection(StringTransport())
    deferreds = [proto.when_ready(), proto.when_disconnected()]
    for i, chunk in enumerate(chunks):
        proto.dataReceived(chunk)
        action = actions[i % len(actions)] if actions else "none"
        if action == "pid":
            deferreds.append(proto.pid())
        elif action == "status3":
            deferreds.append(proto.status3())
        elif action == "auth":
            deferreds.append(proto.client_auth(1, 1, ["push x"]))
        elif action == "deny":
            deferreds.append(proto.client_deny(1, 1, "r", "c"))
        elif action == "advance":
            clock.advance(1)
    proto.connectionLost(Failure(ConnectionDone()))
    for d in deferreds:
        assert d.called
        d.addErrback(lambda f: f.trap(ManagementError))
    assert clock.getDelayedCalls() == []
