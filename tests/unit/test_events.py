"""Management notifications, >CLIENT: block assembly, status 3 parsing and argument quoting."""

import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ovpnmgr import events
from ovpnmgr.events import (
    REDACTED,
    ByteCountClient,
    ClientAddress,
    ClientBlockAssembler,
    ClientConnect,
    ClientCrResponse,
    ClientDisconnect,
    ClientEstablished,
    ClientReauth,
    Env,
    Fatal,
    Hold,
    Info,
    Log,
    State,
    Unrecognized,
    parse_notification,
    parse_status3,
    quote,
    redacted,
    scrub_line,
)


def feed_all(lines):
    """Feed lines to a fresh assembler; return the non-None results."""
    assembler = ClientBlockAssembler()
    out = [assembler.feed(line) for line in lines]
    return [e for e in out if e is not None], assembler


# --- CLIENT blocks -----------------------------------------------------------------------------


def test_connect_block_env_values_split_on_first_equals():
    """A CONNECT block becomes one event; values keep later '=' and may be empty; no '=' gives ''."""
    got, assembler = feed_all(
        [
            ">CLIENT:CONNECT,7,1",
            ">CLIENT:ENV,n_clients=0",
            ">CLIENT:ENV,password=",
            ">CLIENT:ENV,X509_0_CN=a=b=c",
            ">CLIENT:ENV,foo",
            ">CLIENT:ENV,username=alice",
            ">CLIENT:ENV,END",
        ]
    )
    assert got == [
        ClientConnect(7, 1, {"n_clients": "0", "password": "", "X509_0_CN": "a=b=c", "foo": "", "username": "alice"})
    ]
    assert list(got[0].env) == ["n_clients", "password", "X509_0_CN", "foo", "username"]
    assert not assembler.in_block


def test_block_returns_nothing_until_env_end():
    """Header and ENV lines yield None; only ENV,END completes the event."""
    assembler = ClientBlockAssembler()
    assert assembler.feed(">CLIENT:REAUTH,3,4") is None
    assert assembler.in_block
    assert assembler.feed(">CLIENT:ENV,common_name=bob") is None
    assert assembler.feed(">CLIENT:ENV,END") == ClientReauth(3, 4, {"common_name": "bob"})


def test_header_only_disconnect():
    """A never-admitted client's DISCONNECT is just the header and ENV,END: empty env."""
    got, _ = feed_all([">CLIENT:DISCONNECT,5", ">CLIENT:ENV,END"])
    assert got == [ClientDisconnect(5, {})]
    assert len(got[0].env) == 0


def test_established_and_cr_response_blocks():
    """ESTABLISHED carries only a CID; CR_RESPONSE carries CID, KID and the base64 response."""
    got, _ = feed_all(
        [
            ">CLIENT:ESTABLISHED,2",
            ">CLIENT:ENV,ifconfig_pool_remote_ip=10.8.0.50",
            ">CLIENT:ENV,END",
            ">CLIENT:CR_RESPONSE,2,6,c2VjcmV0",
            ">CLIENT:ENV,username=alice",
            ">CLIENT:ENV,END",
        ]
    )
    assert got == [
        ClientEstablished(2, {"ifconfig_pool_remote_ip": "10.8.0.50"}),
        ClientCrResponse(2, 6, "c2VjcmV0", {"username": "alice"}),
    ]


def test_address_is_single_line_and_not_assigned_to_next_block():
    """ADDRESS is complete at once; the following ESTABLISHED block does not absorb it."""
    assembler = ClientBlockAssembler()
    assert assembler.feed(">CLIENT:ADDRESS,0,10.8.0.50,1") == ClientAddress(0, "10.8.0.50", True)
    assert not assembler.in_block
    assembler.feed(">CLIENT:ESTABLISHED,0")
    assembler.feed(">CLIENT:ENV,common_name=alice")
    event = assembler.feed(">CLIENT:ENV,END")
    assert event == ClientEstablished(0, {"common_name": "alice"})
    assert assembler.feed(">CLIENT:ADDRESS,0,10.9.0.0/255.255.255.0,0") == ClientAddress(
        0, "10.9.0.0/255.255.255.0", False
    )


def test_repeated_env_key_keeps_first_occurrence():
    """ENV lines come newest-first, so the first occurrence of a key wins."""
    got, _ = feed_all([">CLIENT:ESTABLISHED,1", ">CLIENT:ENV,a=new", ">CLIENT:ENV,a=old", ">CLIENT:ENV,END"])
    assert got[0].env["a"] == "new"


@pytest.mark.parametrize(
    "header",
    [
        ">CLIENT:CONNECT,x,1",
        ">CLIENT:CONNECT,1",
        ">CLIENT:CONNECT,-1,1",
        ">CLIENT:CONNECT, 1,1",
        ">CLIENT:CONNECT,\u0661,1",  # ARABIC-INDIC DIGIT ONE: int() would accept it
        ">CLIENT:DISCONNECT,",
        ">CLIENT:CR_RESPONSE,1,2",
        ">CLIENT:WHATEVER,1",
    ],
)
def test_malformed_header_is_unrecognized_and_its_env_swallowed(header):
    """A bad header yields Unrecognized; its ENV lines are dropped; the next block still parses."""
    got, assembler = feed_all(
        [
            header,
            ">CLIENT:ENV,username=x",
            ">CLIENT:ENV,END",
            ">CLIENT:DISCONNECT,9",
            ">CLIENT:ENV,END",
        ]
    )
    assert got == [Unrecognized(header), ClientDisconnect(9, {})]
    assert not assembler.in_block


def test_env_outside_block_is_unrecognized():
    """ENV lines without a header are reported, not attached to anything."""
    got, _ = feed_all([">CLIENT:ENV,a=b", ">CLIENT:ENV,END"])
    assert got == [Unrecognized(">CLIENT:ENV,a=b"), Unrecognized(">CLIENT:ENV,END")]


def test_new_header_discards_incomplete_block():
    """A header inside an open block drops the partial block and starts a new one."""
    got, _ = feed_all(
        [
            ">CLIENT:CONNECT,1,1",
            ">CLIENT:ENV,username=a",
            ">CLIENT:CONNECT,2,1",
            ">CLIENT:ENV,username=b",
            ">CLIENT:ENV,END",
        ]
    )
    assert got == [ClientConnect(2, 1, {"username": "b"})]


def test_reset_forgets_partial_block():
    """reset() (connection lost) forgets a partial block."""
    assembler = ClientBlockAssembler()
    assembler.feed(">CLIENT:CONNECT,1,1")
    assembler.reset()
    assert not assembler.in_block
    assert assembler.feed(">CLIENT:ENV,END") == Unrecognized(">CLIENT:ENV,END")


# --- single-line notifications ---------------------------------------------------------------


@pytest.mark.parametrize(
    "line, event",
    [
        (">INFO:OpenVPN Management Interface Version 5 -- type 'help' for more info",
         Info("OpenVPN Management Interface Version 5 -- type 'help' for more info")),
        (">HOLD:Waiting for hold release:0", Hold("Waiting for hold release:0")),
        (">FATAL:cannot allocate TUN/TAP dev", Fatal("cannot allocate TUN/TAP dev")),
        (">LOG:1795375446,D,MANAGEMENT: CMD 'signal SIGHUP', with, commas",
         Log(1795375446, "D", "MANAGEMENT: CMD 'signal SIGHUP', with, commas")),
        (">BYTECOUNT_CLI:3,1000,2000", ByteCountClient(3, 1000, 2000)),
        (">CLIENT:ADDRESS,4,10.8.0.9,1", ClientAddress(4, "10.8.0.9", True)),
        (">STATE:1795375446,CONNECTED,SUCCESS,10.77.0.1,,,127.0.0.1,21194",
         State(1795375446, "CONNECTED", "SUCCESS", "10.77.0.1", "",
               ("1795375446", "CONNECTED", "SUCCESS", "10.77.0.1", "", "", "127.0.0.1", "21194"))),
        (">STATE:1795375446,RECONNECTING,SIGHUP,,,,,",
         State(1795375446, "RECONNECTING", "SIGHUP", "", "",
               ("1795375446", "RECONNECTING", "SIGHUP", "", "", "", "", ""))),
        (">STATE:1795375446,EXITING", State(1795375446, "EXITING", "", "", "", ("1795375446", "EXITING"))),
    ],
)  # fmt: skip
def test_parse_single_line_notifications(line, event):
    """Each single-line notification type parses into its event, fields typed."""
    assert parse_notification(line) == event


@pytest.mark.parametrize(
    "line",
    [
        ">LOG:notatime,I,text",
        ">LOG:123",
        ">STATE:abc,CONNECTED",
        ">STATE:123",
        ">BYTECOUNT_CLI:1,2",
        ">BYTECOUNT_CLI:a,1,2",
        ">CLIENT:ADDRESS,1,10.0.0.1,yes",
        ">CLIENT:ADDRESS,z,10.0.0.1,1",
        ">CLIENT:ADDRESS,1,,1",
        ">UPDOWN:UP",
        ">",
        ">PASSWORD:Need 'Auth' username/password",
    ],
)
def test_malformed_or_unknown_notification_is_unrecognized(line):
    """Bad numbers, wrong field counts and unknown types give Unrecognized, never an exception."""
    assert parse_notification(line) == Unrecognized(line)


def test_parse_notification_returns_none_for_block_lines_and_non_notifications():
    """CLIENT block lines belong to the assembler; lines without '>' are not notifications."""
    assert parse_notification(">CLIENT:CONNECT,1,1") is None
    assert parse_notification(">CLIENT:ENV,a=b") is None
    assert parse_notification("SUCCESS: pid=1") is None
    assert parse_notification("") is None


# --- immutability and redaction ----------------------------------------------------------------


def test_env_is_an_immutable_copy():
    """Event envs are copies that cannot be mutated, but behave like read-only dicts."""
    source = {"username": "alice"}
    event = ClientConnect(1, 1, source)
    source["username"] = "mallory"
    assert event.env["username"] == "alice"
    assert event.env.get("missing", "d") == "d"
    assert dict(event.env) == {"username": "alice"}
    with pytest.raises(TypeError):
        event.env["username"] = "x"
    with pytest.raises(AttributeError):
        event.env._data = {}
    with pytest.raises(AttributeError):
        event.cid = 2


def test_events_are_hashable_and_picklable():
    """Events (with env) can be set members and survive pickling."""
    a = ClientConnect(1, 1, {"x": "y"})
    assert {a, ClientConnect(1, 1, {"x": "y"})} == {a}
    assert pickle.loads(pickle.dumps(a)) == a


def test_repr_never_shows_password():
    """The plaintext password is redacted from every repr/str of envs and events."""
    secret = "hunter2-XYZZY"
    event = ClientConnect(1, 1, {"username": "alice", "password": secret})
    for text in (repr(event), str(event), repr(event.env), str(event.env), repr(ClientReauth(1, 2, event.env))):
        assert secret not in text
        assert "password" in text and REDACTED in text
    assert "alice" in repr(event)
    assert event.env["password"] == secret


def test_redacted_helper():
    """redacted() returns a new dict with only sensitive values replaced."""
    env = Env({"password": "pw", "username": "u"})
    assert redacted(env) == {"password": REDACTED, "username": "u"}
    assert redacted({"a": "b"}) == {"a": "b"}
    assert env["password"] == "pw"


def test_cr_response_repr_hides_response():
    """The challenge response is a credential too and stays out of the repr."""
    assert "c2VjcmV0" not in repr(ClientCrResponse(1, 2, "c2VjcmV0"))


def test_scrub_line_and_unrecognized_repr():
    """Raw password ENV lines are scrubbed for logs, also inside Unrecognized's repr."""
    line = ">CLIENT:ENV,password=s3cr=et"
    assert scrub_line(line) == ">CLIENT:ENV,password=" + REDACTED
    assert scrub_line(">CLIENT:ENV,username=bob") == ">CLIENT:ENV,username=bob"
    assert "s3cr" not in repr(Unrecognized(line))
    assert Unrecognized(line).line == line


# --- status 3 --------------------------------------------------------------------------------

STATUS_26 = [
    "TITLE\tOpenVPN 2.6.14 x86_64-pc-linux-gnu [SSL (OpenSSL)] [LZO] [LZ4] [EPOLL] [PKCS11] [MH/PKTINFO] [AEAD] [DCO]",
    "TIME\t2026-11-22 20:24:06\t1795375446",
    "HEADER\tCLIENT_LIST\tCommon Name\tReal Address\tVirtual Address\tVirtual IPv6 Address\tBytes Received\tBytes Sent"
    "\tConnected Since\tConnected Since (time_t)\tUsername\tClient ID\tPeer ID\tData Channel Cipher",
    "CLIENT_LIST\talice\t203.0.113.5:51234\t10.8.0.50\t\t3456\t2345\t2026-11-22 20:23:06\t1795375386\talice\t0\t0"
    "\tAES-256-GCM",
    "CLIENT_LIST\tUNDEF\t203.0.113.6:40000\t\t\t0\t0\t2026-11-22 20:24:01\t1795375441\tUNDEF\t3\t1\tBF-CBC",
    "HEADER\tROUTING_TABLE\tVirtual Address\tCommon Name\tReal Address\tLast Ref\tLast Ref (time_t)",
    "ROUTING_TABLE\t10.8.0.50\talice\t203.0.113.5:51234\t2026-11-22 20:24:00\t1795375440",
    "GLOBAL_STATS\tMax bcast/mcast queue length\t0",
    "GLOBAL_STATS\tdco_enabled\t0",
]


def test_parse_status3_26_format():
    """A 2.6.14 status 3 parses into typed clients (pending included), routes and stats."""
    status = parse_status3(STATUS_26)
    assert status.title.startswith("OpenVPN 2.6.14 ")
    assert status.time == 1795375446
    alice, pending = status.clients
    assert alice == events.StatusClient(
        common_name="alice",
        real_address="203.0.113.5:51234",
        virtual_address="10.8.0.50",
        virtual_ipv6="",
        bytes_received=3456,
        bytes_sent=2345,
        connected_since=1795375386,
        username="alice",
        cid=0,
        peer_id="0",
        cipher="AES-256-GCM",
    )
    assert not alice.pending
    assert pending.pending and pending.cid == 3 and pending.username == "UNDEF" and pending.cipher == "BF-CBC"
    assert status.routes == (events.StatusRoute("10.8.0.50", "alice", "203.0.113.5:51234", 1795375440),)
    assert status.global_stats["dco_enabled"] == "0"


def test_parse_status3_by_header_name_with_extra_columns():
    """Columns are found by name: reordered and unknown columns (and 2.7 address prefixes) are fine."""
    lines = [
        "TITLE\tOpenVPN 2.7.0",
        "TIME\t2026-11-22 20:24:06\t100",
        "HEADER\tCLIENT_LIST\tClient ID\tShiny New\tCommon Name\tReal Address\tVirtual Address\tBytes Received"
        "\tBytes Sent\tConnected Since (time_t)\tUsername",
        "CLIENT_LIST\t12\tfoo\tbob\tudp4:192.0.2.1:1194\t10.8.0.7\t1\t2\t99\tbob",
        "HEADER\tROUTING_TABLE\tCommon Name\tVirtual Address\tLast Ref (time_t)",
        "ROUTING_TABLE\tbob\t10.8.0.7\t98",
        "END",
    ]
    status = parse_status3(lines)
    (bob,) = status.clients
    assert (bob.cid, bob.common_name, bob.real_address, bob.virtual_address) == (
        12,
        "bob",
        "udp4:192.0.2.1:1194",
        "10.8.0.7",
    )
    assert (bob.bytes_received, bob.bytes_sent, bob.connected_since, bob.username) == (1, 2, 99, "bob")
    assert bob.peer_id == "" and bob.cipher == "" and bob.virtual_ipv6 == ""
    assert status.routes == (events.StatusRoute("10.8.0.7", "bob", "", 98),)


def test_parse_status3_skips_bad_rows():
    """A row with a bad number is skipped; the rest of the output still parses."""
    lines = list(STATUS_26)
    lines.insert(4, lines[3].replace("\t3456\t", "\t34x6\t").replace("\t0\t0\t", "\t8\t8\t"))
    lines.insert(5, "CLIENT_LIST\ttoo-short")
    lines.append("ROUTING_TABLE\t10.8.0.9\tx\ty\tz\tnot-a-time")
    status = parse_status3(lines)
    assert [c.cid for c in status.clients] == [0, 3]
    assert len(status.routes) == 1


def test_parse_status3_without_client_id_column_skips_rows():
    """Without a Client ID column a row cannot be keyed, so it is dropped rather than guessed."""
    lines = ["HEADER\tCLIENT_LIST\tCommon Name\tVirtual Address", "CLIENT_LIST\talice\t10.8.0.5"]
    assert parse_status3(lines).clients == ()


def test_parse_status3_empty_and_garbage():
    """Empty or garbage input gives an empty Status, never an exception."""
    assert parse_status3([]) == events.Status("", 0, (), ())
    status = parse_status3(["", "\t\t", "TIME\tnope\tnope", "HEADER", "GLOBAL_STATS\tx", "junk\tline"])
    assert (status.time, status.clients, status.routes) == (0, (), ())


def test_status_rows_before_header_use_default_layout():
    """A CLIENT_LIST row before any HEADER is read with the standard 2.6 column order."""
    status = parse_status3([STATUS_26[3]])
    assert status.clients[0].cid == 0 and status.clients[0].virtual_address == "10.8.0.50"


# --- quoting ---------------------------------------------------------------------------------


def openvpn_lex(line):
    """A transcription of OpenVPN's parse_line() (options_util.c) for double quotes and backslashes."""
    params, parm, state, backslash = [], "", "initial", False
    for ch in line + "\0":
        out = None
        if not backslash and ch == "\\":
            backslash = True
            continue
        space = ch == "\0" or ch.isspace()
        if state == "initial":
            if not space:
                if not backslash and ch == '"':
                    state = "quoted"
                else:
                    out, state = ch, "unquoted"
        elif state == "unquoted":
            if not backslash and space:
                state = "done"
            else:
                out = ch
        elif state == "quoted":
            if not backslash and ch == '"':
                state = "done"
            else:
                out = ch
        if state == "done":
            params.append(parm)
            parm, state = "", "initial"
        if backslash and out is not None and not (out in '\\"' or out.isspace()):
            raise ValueError("bad backslash")
        backslash = False
        if out is not None:
            parm += out
    assert state == "initial", "unterminated quote"
    return params


@pytest.mark.parametrize(
    "arg, quoted",
    [
        ("plain", '"plain"'),
        ("", '""'),
        ("two words", '"two words"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ('\\"', '"\\\\\\""'),
        ("TEMP[backoff 30,advance no]: device offline", '"TEMP[backoff 30,advance no]: device offline"'),
        ("ünïcode ✓", '"ünïcode ✓"'),
    ],
)
def test_quote_escapes(arg, quoted):
    """quote() wraps in double quotes and escapes backslash and double quote only."""
    assert quote(arg) == quoted
    assert openvpn_lex("client-deny 1 2 " + quoted) == ["client-deny", "1", "2", arg]


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "tab\there", "nul\0", "del\x7f", "c1\x85", "\ud800"])
def test_quote_rejects_control_characters(bad):
    """CR, LF and every other control character (or a lone surrogate) raise ValueError."""
    with pytest.raises(ValueError):
        quote(bad)


def test_quote_rejects_non_str():
    """Bytes are not silently str()-ed into b'...'."""
    with pytest.raises(TypeError):
        quote(b"bytes")


@given(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs"))))
def test_quote_round_trips_through_openvpn_lexer(arg):
    """For any printable text, OpenVPN's lexer reads back exactly one argument equal to the input."""
    assert openvpn_lex(quote(arg)) == [arg]
