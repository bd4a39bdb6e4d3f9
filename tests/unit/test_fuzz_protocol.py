"""Hostile input for the management client: arbitrary bytes in arbitrary chunkings, oversized
lines, and random or mutated ``status 3`` tables.

What is proven, for every generated input:

* ``dataReceived`` never raises, and every Deferred handed out settles by the end;
* the protocol either keeps going or drops the connection **with an error/warning logged**;
* the receive buffer never holds more than ``MAX_LENGTH`` bytes after a call returns, so a
  peer that never sends ``\\n`` costs bounded memory (checked with ``tracemalloc`` too);
* an oversized line is logged (length only) and skipped without desynchronising replies;
* :func:`~ovpnmgr.events.parse_status3` returns a :class:`~ovpnmgr.events.Status` whatever the
  rows hold, keeps every well-formed client row, and a realistic table round-trips.

Example counts are bounded and derandomized so the suite stays deterministic and fast.
"""

import time
import tracemalloc

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure

try:
    from twisted.internet.testing import StringTransport
except ImportError:  # Twisted 22.4
    from twisted.test.proto_helpers import StringTransport

from ovpnmgr.events import Status, StatusClient, parse_status3
from ovpnmgr.protocol import ManagementError, ManagementProtocol
from ovpnmgr.testing import status3_lines

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

BANNER = b">INFO:OpenVPN Management Interface Version 5 -- type 'help' for more info\r\n"

_REALISTIC = [
    b"ENTER PASSWORD:",
    b"SUCCESS: password is correct\r\n",
    BANNER,
    b">INFO:OpenVPN Management Interface Version 1 -- old\r\n",
    b">CLIENT:CONNECT,0,1\r\n>CLIENT:ENV,username=alice\r\n>CLIENT:ENV,password=pw\r\n>CLIENT:ENV,END\r\n",
    b">CLIENT:REAUTH,0,2\r\n>CLIENT:ENV,END\r\n",
    b">CLIENT:ESTABLISHED,0\r\n>CLIENT:ENV,ifconfig_pool_remote_ip=10.9.0.2\r\n>CLIENT:ENV,END\r\n",
    b">CLIENT:ADDRESS,0,10.9.0.2,1\r\n",
    b">CLIENT:DISCONNECT,0\r\n>CLIENT:ENV,END\r\n",
    b">CLIENT:CR_RESPONSE,0,1,Zm9v\r\n>CLIENT:ENV,END\r\n",
    b">CLIENT:ENV,END\r\n",
    b">CLIENT:CONNECT,99999999999999999999999,1\r\n",
    b">STATE:1700000000,CONNECTED,SUCCESS,10.9.0.1,,,,\r\n",
    b">STATE:,,\r\n",
    b">LOG:1,I,hello\r\n",
    b">BYTECOUNT_CLI:0,1,2\r\n",
    b">HOLD:Waiting for hold release:0\r\n",
    b">FATAL:bye\r\n",
    b"SUCCESS: pid=42\r\n",
    b"SUCCESS: client-auth command succeeded\r\n",
    b"ERROR: unknown command\r\n",
    b"TITLE\tOpenVPN 2.6\r\nTIME\tx\t1\r\nHEADER\tCLIENT_LIST\tCommon Name\tClient ID\r\nCLIENT_LIST\ta\t0\r\n",
    b"END\r\n",
    b"\r\n",
    b"\r",
    b"\n",
    b"\xff\xfe\x00\xc3\x28",
]

#: Bytes: realistic lines, fragments of them, and noise.
_PIECES = st.one_of(
    st.sampled_from(_REALISTIC),
    st.sampled_from(_REALISTIC).flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n])),
    st.binary(max_size=80),
)
_STREAMS = st.lists(_PIECES, max_size=30).map(b"".join)
_ACTIONS = st.lists(st.sampled_from(["pid", "status3", "auth", "deny", "kill", "advance", "none"]), max_size=10)


def _chunked(data, cuts):
    """Split ``data`` at the (sorted, deduplicated) offsets in ``cuts``."""
    points = sorted({c % (len(data) + 1) for c in cuts}) if data else []
    out, last = [], 0
    for p in points + [len(data)]:
        if p > last:
            out.append(data[last:p])
            last = p
    return out


def _problems(logged):
    return [e for e in logged if e.get("log_level") in (LogLevel.warn, LogLevel.error, LogLevel.critical)]


class _Harness:
    def __init__(self, password=None, max_length=None, timeout=2.0):
        self.clock = Clock()
        self.proto = ManagementProtocol(self.clock, password=password, command_timeout=timeout)
        if max_length is not None:
            self.proto.MAX_LENGTH = max_length
        self.events = []
        self.proto.notify = self.events.append
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.deferreds = [self.proto.when_ready(), self.proto.when_disconnected()]

    def act(self, action):
        p = self.proto
        calls = {
            "pid": p.pid,
            "status3": p.status3,
            "auth": lambda: p.client_auth(0, 1, ["ifconfig-push 10.9.0.2 255.255.255.0"]),
            "deny": lambda: p.client_deny(0, 1, "no", "TEMP: later"),
            "kill": lambda: p.client_kill(0, "HALT"),
        }
        if action in calls:
            self.deferreds.append(calls[action]())
        elif action == "advance":
            self.clock.advance(1)

    def finish(self):
        self.proto.connectionLost(Failure(ConnectionDone()))
        for d in self.deferreds:
            assert d.called, "a Deferred was left unsettled"
            d.addErrback(lambda f: f.trap(ManagementError))
        assert self.clock.getDelayedCalls() == []


@FUZZ
@given(
    data=_STREAMS,
    cuts=st.lists(st.integers(0, 5000), max_size=40),
    actions=_ACTIONS,
    password=st.sampled_from([None, b"pw"]),
)
def test_any_bytes_in_any_chunking_are_survived(data, cuts, actions, password):
    """No exception escapes; buffer stays within MAX_LENGTH; a drop is always logged; nothing hangs."""
    h = _Harness(password=password)
    with capturedLogs() as logged:
        for i, chunk in enumerate(_chunked(data, cuts)):
            h.proto.dataReceived(chunk)
            assert len(h.proto._buffer) <= h.proto.MAX_LENGTH
            h.act(actions[i % len(actions)] if actions else "none")
        if h.transport.disconnecting:
            assert _problems(logged), "connection dropped without a warning or error logged"
    h.finish()


@FUZZ
@given(
    before=_STREAMS,
    size=st.integers(257, 3000),
    filler=st.binary(min_size=1, max_size=4).filter(lambda b: b"\n" not in b),
    cuts=st.lists(st.integers(0, 5000), max_size=30),
)
def test_oversized_line_is_logged_skipped_and_bounded(before, size, filler, cuts):
    """A line over MAX_LENGTH, in any chunking, is skipped with a warning; the buffer stays bounded.

    The protocol documents *skip, stay connected* (a skipped single-line reply times out,
    which drops the connection); either way a later command is answered correctly.
    """
    h = _Harness(max_length=256)
    h.proto.dataReceived(BANNER)
    line = (filler * (size // len(filler) + 1))[:size] + b"\r\n"
    with capturedLogs() as logged:
        for chunk in _chunked(line, cuts):
            h.proto.dataReceived(chunk)
            assert len(h.proto._buffer) <= 256
    assert any("exceeds" in formatEvent(e) for e in logged), [formatEvent(e) for e in logged]
    assert not h.transport.disconnecting
    assert h.proto._buffer == b""
    d = h.proto.pid()
    h.proto.dataReceived(b"SUCCESS: pid=7\r\n")
    assert d.result == 7
    h.finish()


def test_endless_line_costs_bounded_memory_and_time():
    """8 MiB without a newline, in 4 KiB reads, at the real 64 KiB MAX_LENGTH: peak memory stays
    a small multiple of MAX_LENGTH and the reads are processed in linear time."""
    h = _Harness()
    h.proto.dataReceived(BANNER)
    chunk = b"A" * 4096
    tracemalloc.start()
    try:
        started = time.process_time()
        for _ in range(2048):
            h.proto.dataReceived(chunk)
        spent = time.process_time() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(h.proto._buffer) <= h.proto.MAX_LENGTH
    assert peak < 8 * h.proto.MAX_LENGTH, peak
    assert spent < 5.0, spent
    assert not h.transport.disconnecting
    h.proto.dataReceived(b"tail of the monster line\r\n")
    d = h.proto.pid()
    h.proto.dataReceived(b"SUCCESS: pid=9\r\n")
    assert d.result == 9
    h.finish()


def test_before_banner_an_endless_prompt_like_stream_is_bounded():
    """Before login the prompt scan also stays bounded: 1 MiB of 'ENTER PASS' without a colon."""
    h = _Harness(password=b"pw")
    for _ in range(100_000):
        h.proto.dataReceived(b"ENTER PASS")
        assert len(h.proto._buffer) <= h.proto.MAX_LENGTH
    h.finish()


# --- status 3 ------------------------------------------------------------------------------------

_NAMES = [
    "Common Name",
    "Real Address",
    "Virtual Address",
    "Virtual IPv6 Address",
    "Bytes Received",
    "Bytes Sent",
    "Connected Since",
    "Connected Since (time_t)",
    "Username",
    "Client ID",
    "Peer ID",
    "Data Channel Cipher",
    "Last Ref",
    "Last Ref (time_t)",
    "Future Column",
]
_CELL = st.one_of(
    st.sampled_from(["", "0", "1", "42", "-1", "+1", "1_0", "١", "9" * 5000, "10.9.0.2", "x\ty", "UNDEF", "END"]),
    st.text(max_size=20),
)
_TAGS = ["TITLE", "TIME", "HEADER", "CLIENT_LIST", "ROUTING_TABLE", "GLOBAL_STATS", "END", "", "OTHER"]
_ROWS = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(_TAGS), st.lists(_CELL, max_size=14)).map(lambda t: "\t".join([t[0], *t[1]])),
        st.tuples(st.sampled_from(["CLIENT_LIST", "ROUTING_TABLE"]), st.lists(st.sampled_from(_NAMES), max_size=15)).map(
            lambda t: "\t".join(["HEADER", t[0], *t[1]])
        ),
        st.text(max_size=60),
    ),
    max_size=30,
)


@FUZZ
@given(_ROWS)
def test_status3_random_tables_never_raise(lines):
    """Any list of strings parses to a Status whose rows are well typed."""
    status = parse_status3(lines)
    assert isinstance(status, Status)
    for c in status.clients:
        assert isinstance(c, StatusClient) and isinstance(c.cid, int) and c.cid >= 0
        assert isinstance(c.bytes_received, int) and isinstance(c.connected_since, int)


def _realistic_table():
    return status3_lines(
        [
            dict(cid=0, common_name="alice", username="alice", virtual_address="10.9.0.2"),
            dict(cid=7, common_name="bob", username="bob", virtual_address="10.9.0.3"),
            dict(cid=9, common_name="carol", username="UNDEF", virtual_address=""),
        ]
    )


def _mutate_lines(draw, lines):
    lines = list(lines)
    for _ in range(draw(st.integers(0, 4))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["cell", "drop", "dup", "swap", "truncate"]))
        fields = lines[i].split("\t")
        if op == "cell":
            j = draw(st.integers(0, len(fields) - 1))
            fields[j] = draw(_CELL)
            lines[i] = "\t".join(fields)
        elif op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        else:
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
    return lines


@st.composite
def _mutated_tables(draw):
    return _mutate_lines(draw, _realistic_table())


def test_status3_realistic_table_round_trips():
    """The canned 2.6 table gives exactly the three clients, the pending one flagged."""
    status = parse_status3(_realistic_table())
    assert [(c.cid, c.common_name, c.pending) for c in status.clients] == [
        (0, "alice", False),
        (7, "bob", False),
        (9, "carol", True),
    ]


@FUZZ
@given(_mutated_tables())
def test_status3_mutated_tables_never_raise(lines):
    """Mutated real tables parse; a CLIENT_LIST row under the real header with a valid CID survives."""
    status = parse_status3(lines)
    assert isinstance(status, Status)
    assert all(isinstance(c.cid, int) for c in status.clients)


@FUZZ
@given(_mutated_tables(), st.lists(st.integers(0, 3000), max_size=20))
def test_status3_over_the_wire_in_any_chunking(lines, cuts):
    """A mutated table as the reply to ``status 3``, chunked at random: the Deferred fires with a Status."""
    h = _Harness()
    h.proto.dataReceived(BANNER)
    d = h.proto.status3()
    wire = b"".join(line.encode("utf-8", "surrogatepass") + b"\r\n" for line in lines if line != "END")
    for chunk in _chunked(wire + b"END\r\n", cuts):
        h.proto.dataReceived(chunk)
    assert d.called
    if isinstance(d.result, Failure):
        # A mutated cell may carry "\n" + "ERROR: ..." or a bare "END": a typed failure or an
        # early END, never an exception of another type.
        d.result.trap(ManagementError)
        d.addErrback(lambda f: None)
    else:
        assert isinstance(d.result, Status), d.result
    h.finish()
