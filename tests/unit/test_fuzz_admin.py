"""Hostile admin-socket clients: random bytes before authentication, over-long lines, and
clients that never finish a line or never authenticate.

The bounded-buffer and three-strikes rules hold (proven here for random input), and two
timeouts (``admin.login_timeout``, ``admin.idle_timeout``) cut a client that stays silent,
never authenticates, or trickles a partial line (only complete lines count as activity).
"""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

try:
    from twisted.internet.testing import StringTransport
except ImportError:  # Twisted 22.4
    from twisted.test.proto_helpers import StringTransport

from ovpnmgr.admin import MAX_LINE, PASSWORD_PROMPT, PASSWORD_TRIES, AdminProtocol

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _connected(password=b"s3cret"):
    proto = AdminProtocol(operations=None, password=password)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


@FUZZ
@given(st.lists(st.one_of(st.binary(max_size=300), st.sampled_from([b"\n", b"\r\n", b"s3cre", b"x" * 900])), max_size=30))
def test_unauthenticated_random_bytes(chunks):
    """Before the password, random bytes never raise, the line buffer stays bounded, and the
    connection is closed after PASSWORD_TRIES wrong lines or one over-long line."""
    proto, transport = _connected()
    lines = 0
    for chunk in chunks:
        if transport.disconnecting:
            break
        proto.dataReceived(chunk)
        assert len(proto._buffer) <= MAX_LINE + len(chunk)
        lines += chunk.count(b"\n")
    if not transport.disconnecting:
        assert not proto._authenticated or b"s3cret" in b"".join(chunks)
        assert transport.value().count(PASSWORD_PROMPT) <= PASSWORD_TRIES


def test_overlong_line_is_refused_and_closed():
    """1,001 bytes without a newline: ERROR and close (never an unbounded buffer)."""
    proto, transport = _connected(password=None)
    transport.clear()
    proto.dataReceived(b"y" * (MAX_LINE + 1))
    assert transport.value() == b"ERROR: line too long (limit %d bytes)\r\n" % MAX_LINE
    assert transport.disconnecting




def _with_clock(password, **timeouts):
    clock = Clock()
    proto = AdminProtocol(operations=None, password=password, **timeouts)
    proto.callLater = clock.callLater  # TimeoutMixin's hook; ignored while there is no timeout
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, clock


def test_client_that_never_authenticates_is_cut():
    """A client that opens the socket and never sends the password is closed within an hour."""
    proto, transport, clock = _with_clock(b"s3cret")
    clock.advance(3600)
    assert transport.disconnecting


def test_client_trickling_a_partial_line_is_cut():
    """A client sending one byte a minute, never a newline, is closed within two hours."""
    proto, transport, clock = _with_clock(None)
    for byte in b"pp stats pp stats pp stats pp stats pp stats pp stats pp stats pp stats pp stats pp stats pp st"[:120]:
        proto.dataReceived(bytes([byte]))
        clock.advance(60)
        if transport.disconnecting:
            break
    assert transport.disconnecting


def test_login_timeout_closes_exactly_at_its_deadline_despite_wrong_attempts():
    """Wrong passwords do not extend the login window: closed at login_timeout, not before."""
    proto, transport, clock = _with_clock(b"s3cret", login_timeout=30)
    clock.advance(20)
    proto.dataReceived(b"wrong\n")
    clock.advance(9.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting
    assert clock.getDelayedCalls() == []


def test_idle_timeout_counts_from_the_last_complete_line_and_zero_disables_it():
    """A complete line restarts the idle clock; idle_timeout=0 never schedules anything."""
    proto, transport, clock = _with_clock(None, idle_timeout=100)
    clock.advance(90)
    proto.dataReceived(b"quit-not\n")  # any complete line is activity, even an unknown command
    clock.advance(90)
    assert not transport.disconnecting
    clock.advance(11)
    assert transport.disconnecting
    proto, transport, clock = _with_clock(None, idle_timeout=0)
    assert clock.getDelayedCalls() == []
    clock.advance(10**6)
    assert not transport.disconnecting


def test_after_the_password_the_idle_timeout_applies():
    """Once authenticated the (longer) idle timeout replaces the login timeout."""
    proto, transport, clock = _with_clock(b"s3cret", login_timeout=30, idle_timeout=600)
    proto.dataReceived(b"s3cret\n")
    clock.advance(599)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting
