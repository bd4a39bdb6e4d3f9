"""DNS messages for the unit tests, built with twisted.names (the same library a real client or
resolver would not be, so bytes are checked too): queries, replies, records, and decoding.

Shared by ``test_dns_message.py``, ``test_dns_cache.py``, ``test_dns_server.py``,
``test_dns_upstream.py`` and ``test_dns_doh.py``. Helpers, not tests.
"""

from twisted.names import dns

NAME = b"WwW.Example.COM"


def opt(size):
    return dns.RRHeader(name=b"", type=dns.OPT, cls=size, ttl=0, payload=dns.UnknownRecord(b""))


def make_query(name=NAME, qtype=dns.A, qid=0x1234, edns=None, rd=1):
    """A client query's bytes."""
    m = dns.Message(id=qid, recDes=rd, maxSize=0)
    m.queries = [dns.Query(name, qtype, dns.IN)]
    if edns is not None:
        m.additional = [opt(edns)]
    return m.toStr()


def a_record(name, address="192.0.2.1", ttl=300):
    return dns.RRHeader(name=name, type=dns.A, ttl=ttl, payload=dns.Record_A(address, ttl=ttl))


def soa_record(name=b"example.com", ttl=3600, minimum=60):
    payload = dns.Record_SOA(b"ns.example.com", b"hostmaster.example.com", 1, 7200, 900, 86400, minimum, ttl=ttl)
    return dns.RRHeader(name=name, type=dns.SOA, ttl=ttl, payload=payload)


def make_reply(query_wire, answers=None, rcode=dns.OK, authority=(), count=1, ttl=300, edns=None):
    """A resolver's reply to ``query_wire`` (same ID and question); ``count`` A records by default."""
    q = dns.Message()
    q.fromStr(query_wire)
    m = dns.Message(id=q.id, answer=1, recDes=q.recDes, recAv=1, rCode=rcode, maxSize=0)
    m.queries = q.queries
    if answers is None:
        name = q.queries[0].name.name
        answers = [a_record(name, "198.51.%d.%d" % (i // 250, i % 250 + 1), ttl) for i in range(count)]
    m.answers = list(answers) if rcode == dns.OK else []
    m.authority = list(authority)
    if edns is not None:
        m.additional = [opt(edns)]
    return m.toStr()


def decode(wire):
    m = dns.Message()
    m.fromStr(wire)
    return m
