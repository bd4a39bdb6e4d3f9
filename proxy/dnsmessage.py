# -*- test-case-name: tests.unit.test_dns_message -*-
"""DNS wire helpers for the customer DNS service, on top of ``twisted.names.dns.Message``.

Queries are validated strictly (a reply, another opcode or several questions are dropped, not
answered) because the server only forwards queries. Replies from the device are relayed as the
resolver sent them, with only the ID rewritten; replies we build ourselves (errors, truncated
UDP answers, cache hits) keep the client's ID, question casing and EDNS presence.
"""

import struct
from dataclasses import dataclass

from twisted.names import dns

from proxy.settings import MAX_UDP_PAYLOAD

__all__ = [
    "CLASSIC_UDP",
    "MAX_UDP_PAYLOAD",
    "Malformed",
    "Query",
    "parse_query",
    "parse_reply",
    "with_id",
    "reply_id",
    "reply_rcode",
    "error_reply",
    "truncated_reply",
    "cached_reply",
    "same_question",
]

CLASSIC_UDP = 512  # RFC 1035 limit without EDNS
_HEADER = 12


class Malformed(ValueError):
    """Not a single standard query we are willing to answer."""


@dataclass(frozen=True)
class Query:
    """A validated client query.

    :ivar wire: the bytes as received (forwarded verbatim, ID rewritten).
    :ivar edns: the client's advertised UDP payload size, or None without an OPT record.
    """

    wire: bytes
    id: int
    name: bytes
    qtype: int
    qclass: int
    recursion_desired: bool
    checking_disabled: bool
    edns: int | None
    dnssec_ok: bool = False  # the EDNS DO bit

    @property
    def key(self):
        """Cache key within a device: case-insensitive name, type and class, and the CD and DO
        bits (they change what a validating resolver returns: RRSIGs, unvalidated data)."""
        return (self.name.lower(), self.qtype, self.qclass, self.checking_disabled, self.dnssec_ok)

    def udp_limit(self, cap=MAX_UDP_PAYLOAD):
        """Largest UDP reply this client accepts: 512 without EDNS, else its size capped."""
        if self.edns is None:
            return CLASSIC_UDP
        return max(CLASSIC_UDP, min(self.edns, cap))


def parse_query(data):
    """Validate and decode a client query.

    :raises Malformed: unparseable, QR=1, opcode other than QUERY, QDCOUNT != 1, several OPTs.
    """
    if len(data) < _HEADER:
        raise Malformed("shorter than a DNS header")
    if data[2] & 0x80:
        raise Malformed("QR bit set (a reply, not a query)")
    if (data[2] >> 3) & 0xF != dns.OP_QUERY:
        raise Malformed("opcode %d is not QUERY" % ((data[2] >> 3) & 0xF))
    if struct.unpack_from("!H", data, 4)[0] != 1:
        raise Malformed("QDCOUNT is not 1")
    message = dns.Message()
    try:
        message.fromStr(data)
    except Exception as e:  # twisted.names raises whatever its decoders hit
        raise Malformed("undecodable: %s" % type(e).__name__)
    if len(message.queries) != 1:  # Message.decode stops quietly at a truncated question
        raise Malformed("truncated question")
    expected = struct.unpack_from("!H", data, 10)[0]
    if len(message.additional) != expected:
        raise Malformed("truncated additional section")
    opts = [r for r in message.additional if r.type == dns.OPT]
    if len(opts) > 1:
        raise Malformed("more than one OPT record")
    q = message.queries[0]
    return Query(
        wire=bytes(data),
        id=message.id,
        name=q.name.name,
        qtype=q.type,
        qclass=q.cls,
        recursion_desired=bool(message.recDes),
        checking_disabled=bool(message.checkingDisabled),
        edns=opts[0].cls if opts else None,
        dnssec_ok=bool(opts and opts[0].ttl & 0x8000),
    )


def parse_reply(data):
    """Decode a resolver's reply; None when it cannot be decoded completely."""
    if len(data) < _HEADER:
        return None
    message = dns.Message()
    try:
        message.fromStr(data)
    except Exception:
        return None
    counts = struct.unpack_from("!4H", data, 4)
    sections = (message.queries, message.answers, message.authority, message.additional)
    if tuple(len(s) for s in sections) != counts:
        return None
    return message


def with_id(wire, message_id):
    """``wire`` with its 16-bit ID replaced (no re-encoding: the rest stays byte-identical)."""
    return struct.pack("!H", message_id) + bytes(wire[2:])


def reply_id(wire):
    """The ID of a message (``None`` when shorter than a header)."""
    return struct.unpack_from("!H", wire)[0] if len(wire) >= _HEADER else None


def reply_rcode(wire):
    """The 4-bit RCODE from a message header (``None`` when shorter than a header)."""
    return wire[3] & 0xF if len(wire) >= _HEADER else None


def same_question(query, message):
    """Does ``message`` answer ``query``'s question (name compared case-insensitively)?"""
    if len(message.queries) != 1:
        return False
    q = message.queries[0]
    return (q.name.name.lower(), q.type, q.cls) == query.key[:3]


def _opt(size=MAX_UDP_PAYLOAD):
    """Our own OPT pseudo-record (RFC 6891): advertise ``size``, no options."""
    return dns.RRHeader(name=b"", type=dns.OPT, cls=size, ttl=0, payload=dns.UnknownRecord(b""))


def _reply_to(query, rcode, source=None):
    """A reply header for ``query``: client's ID and question, flags from ``source`` if given."""
    m = dns.Message(
        id=query.id,
        answer=1,
        opCode=dns.OP_QUERY,
        recDes=int(query.recursion_desired),
        recAv=1,
        rCode=rcode,
        maxSize=0,  # Message.encode would cut the body at maxSize otherwise
        checkingDisabled=int(query.checking_disabled),
    )
    if source is not None:
        m.auth = source.auth
        m.recAv = source.recAv
        m.authenticData = source.authenticData
    m.queries = [dns.Query(query.name, query.qtype, query.qclass)]
    if query.edns is not None:
        m.additional = [_opt()]
    return m


def error_reply(query, rcode):
    """A reply with no records: REFUSED, SERVFAIL... (OPT kept when the client used EDNS)."""
    return _reply_to(query, rcode).toStr()


def truncated_reply(query, reply):
    """``reply`` cut for UDP: TC=1, the question kept, every record section empty but our OPT.

    The client then retries over TCP, where it gets the full answer.
    """
    if len(reply) < _HEADER:
        return error_reply(query, dns.ESERVER)
    source = dns.Message()
    source.auth = (reply[2] >> 2) & 1
    source.recAv = (reply[3] >> 7) & 1
    source.authenticData = (reply[3] >> 5) & 1
    m = _reply_to(query, reply_rcode(reply), source)
    m.trunc = 1
    return m.toStr()


def _aged(record, age):
    return dns.RRHeader(
        name=record.name.name,
        type=record.type,
        cls=record.cls,
        ttl=max(0, record.ttl - age),
        payload=record.payload,
        auth=record.auth,
    )


def cached_reply(query, message, age):
    """Encode a cached ``message`` for ``query``: TTLs minus ``age`` whole seconds, client's ID
    and question casing, an OPT only when the client sent one (cached messages hold none)."""
    m = _reply_to(query, message.rCode, message)
    m.answers = [_aged(r, age) for r in message.answers]
    m.authority = [_aged(r, age) for r in message.authority]
    m.additional = [_aged(r, age) for r in message.additional] + m.additional
    return m.toStr()
