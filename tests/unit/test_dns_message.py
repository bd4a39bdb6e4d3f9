"""proxy.dnsmessage: strict query validation, ID rewriting, error/truncated/cached replies.

The message builders (shared with the other DNS tests) are in ``tests/unit/dns_wire.py``.
"""

import struct

import pytest
from twisted.names import dns

from proxy import dnsmessage
from proxy.dnsmessage import Malformed
from tests.unit.dns_wire import NAME, decode, make_query, make_reply, opt, soa_record


# --- parse_query ----------------------------------------------------------------------------------


def test_parse_query_fields_and_key():
    """A plain query decodes with its ID, name casing, type; the key is lowercase."""
    q = dnsmessage.parse_query(make_query(qtype=dns.AAAA, qid=7))
    assert (q.id, q.name, q.qtype, q.qclass, q.edns) == (7, NAME, dns.AAAA, dns.IN, None)
    assert q.key == (b"www.example.com", dns.AAAA, dns.IN, False, False)
    assert q.recursion_desired is True
    assert q.wire == make_query(qtype=dns.AAAA, qid=7)


def test_cd_and_do_bits_are_part_of_the_key():
    """A validating resolver answers DO=1 with RRSIGs and CD=1 without validation: never mixed."""
    plain = dnsmessage.parse_query(make_query())
    m = dns.Message(id=1, recDes=1, maxSize=0, checkingDisabled=1)
    m.queries = [dns.Query(NAME, dns.A, dns.IN)]
    cd = dnsmessage.parse_query(m.toStr())
    m = dns.Message(id=1, recDes=1, maxSize=0)
    m.queries = [dns.Query(NAME, dns.A, dns.IN)]
    m.additional = [dns.RRHeader(name=b"", type=dns.OPT, cls=1232, ttl=0x8000, payload=dns.UnknownRecord(b""))]
    do = dnsmessage.parse_query(m.toStr())
    assert (cd.checking_disabled, do.dnssec_ok, plain.dnssec_ok) == (True, True, False)
    assert len({plain.key, cd.key, do.key}) == 3
    assert dnsmessage.parse_query(make_query(edns=1232)).key == plain.key


@pytest.mark.parametrize("edns, limit", [(None, 512), (4096, 1232), (1000, 1000), (100, 512)])
def test_udp_limit_follows_edns_capped(edns, limit):
    """512 without EDNS; the client's EDNS size, at least 512 and at most the cap."""
    assert dnsmessage.parse_query(make_query(edns=edns)).udp_limit(1232) == limit


def _with_flags(wire, byte2):
    return wire[:2] + bytes([byte2]) + wire[3:]


@pytest.mark.parametrize(
    "data, why",
    [
        (b"\x12\x34\x01\x00", "shorter"),
        (_with_flags(make_query(), 0x81), "QR bit"),
        (_with_flags(make_query(), 0x20 | 0x01), "opcode 4"),  # NOTIFY
        (_with_flags(make_query(), 0x10), "opcode 2"),  # STATUS
        (make_query()[:4] + b"\x00\x00" + make_query()[6:], "QDCOUNT"),
        (make_query()[:4] + b"\x00\x02" + make_query()[6:], "QDCOUNT"),
        (make_query()[:12] + b"\x03www", "truncated question"),
        (make_query()[:11] + b"\x01" + make_query()[12:], "additional"),  # ARCOUNT 1, no record
        (make_query(edns=1232)[:10] + b"\x00\x02" + make_query(edns=1232)[12:], "additional"),
    ],
)
def test_malformed_queries_are_rejected(data, why):
    """Replies, other opcodes, zero or two questions and truncated packets are Malformed."""
    with pytest.raises(Malformed, match=why):
        dnsmessage.parse_query(data)


def test_two_opt_records_are_malformed():
    """RFC 6891: more than one OPT is a FORMERR; we drop it."""
    m = dns.Message(id=1, maxSize=0)
    m.queries = [dns.Query(NAME, dns.A, dns.IN)]
    m.additional = [opt(1232), opt(4096)]
    with pytest.raises(Malformed, match="OPT"):
        dnsmessage.parse_query(m.toStr())


# --- IDs and headers ------------------------------------------------------------------------------


def test_with_id_changes_only_the_first_two_bytes():
    """The forwarded query is byte-identical but for the ID."""
    wire = make_query(qid=0x1234, edns=1232)
    out = dnsmessage.with_id(wire, 0xBEEF)
    assert out[:2] == b"\xbe\xef" and out[2:] == wire[2:]
    assert dnsmessage.reply_id(out) == 0xBEEF
    assert dnsmessage.reply_id(b"\x00") is None


# --- replies we build -----------------------------------------------------------------------------


def test_error_reply_keeps_id_question_casing_and_edns_presence():
    """REFUSED/SERVFAIL carry the client's ID and question; an OPT only if the client sent one."""
    plain = decode(dnsmessage.error_reply(dnsmessage.parse_query(make_query(qid=99)), dns.EREFUSED))
    assert (plain.id, plain.answer, plain.rCode, plain.recDes) == (99, 1, dns.EREFUSED, 1)
    assert plain.queries[0].name.name == NAME
    assert plain.additional == []
    edns = decode(dnsmessage.error_reply(dnsmessage.parse_query(make_query(edns=4096)), dns.ESERVER))
    assert edns.rCode == dns.ESERVER
    assert [(r.type, r.cls) for r in edns.additional] == [(dns.OPT, 1232)]


@pytest.mark.parametrize("edns", [None, 4096])
def test_truncated_reply_has_tc_question_and_no_records(edns):
    """TC=1, question kept, answer/authority empty; additional holds only our OPT when EDNS was used."""
    query = dnsmessage.parse_query(make_query(qid=5, edns=edns))
    big = make_reply(make_query(qid=999, edns=edns), count=100, edns=edns)
    wire = dnsmessage.truncated_reply(query, big)
    m = decode(wire)
    assert (m.id, m.trunc, m.rCode, m.recAv) == (5, 1, dns.OK, 1)
    assert m.queries[0].name.name == NAME
    assert m.answers == [] and m.authority == []
    assert struct.unpack_from("!H", wire, 10)[0] == (0 if edns is None else 1)
    assert len(wire) <= 512


def test_cached_reply_ages_ttls_and_restores_client_view():
    """A cached message is served with TTLs minus age, the client's ID and casing."""
    stored = decode(make_reply(make_query(name=b"www.example.com"), ttl=300, authority=[soa_record(ttl=900)]))
    query = dnsmessage.parse_query(make_query(name=b"WWW.example.COM", qid=42))
    m = decode(dnsmessage.cached_reply(query, stored, 100))
    assert m.id == 42 and m.answer == 1
    assert m.queries[0].name.name == b"WWW.example.COM"
    assert [r.ttl for r in m.answers] == [200]
    assert [r.ttl for r in m.authority] == [800]
    assert m.additional == []
    old = decode(dnsmessage.cached_reply(query, stored, 1000))
    assert [r.ttl for r in old.answers] == [0], "TTLs never go negative"
    with_edns = decode(dnsmessage.cached_reply(dnsmessage.parse_query(make_query(edns=1400)), stored, 0))
    assert [r.type for r in with_edns.additional] == [dns.OPT]


def test_parse_reply_rejects_incomplete_messages_and_same_question_compares_case():
    """A cut reply is None (never cached); question matching ignores case only."""
    reply = make_reply(make_query(), count=3)
    assert dnsmessage.parse_reply(reply[:-5]) is None
    assert dnsmessage.parse_reply(b"\x00" * 5) is None
    m = dnsmessage.parse_reply(reply)
    assert len(m.answers) == 3
    assert dnsmessage.same_question(dnsmessage.parse_query(make_query(name=b"www.EXAMPLE.com")), m)
    assert not dnsmessage.same_question(dnsmessage.parse_query(make_query(qtype=dns.AAAA)), m)
    assert not dnsmessage.same_question(dnsmessage.parse_query(make_query(name=b"example.com")), m)
