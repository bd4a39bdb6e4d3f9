"""The lab's DNS origin zone (tests/lab/dns_origin.py) answers what the lab and bench-dns rely on.

Pure: :meth:`Zone.respond` on wire bytes from the bench's own stdlib encoder, decoded by the
bench's stdlib parser, so both halves are checked against each other. No sockets, no root.
"""

from twisted.names import dns

from tests.bench.dns_load import check_reply, encode_query, parse_reply
from tests.lab.dns_origin import BIG_COUNT, ORIGIN_IP, Zone, bench_address, big_addresses


def _ask(zone, qname, qtype=dns.A, udp=True, edns=None, qid=4242):
    if edns is None:
        raw = encode_query(qid, qname, qtype)
    else:
        raw = dns._EDNSMessage(id=qid, queries=[dns.Query(qname, qtype)], maxSize=edns).toStr()
    query = dns.Message()
    query.fromStr(raw)
    action, data = zone.respond(query, udp)
    return action, (parse_reply(data) if data is not None else None), data


def test_origin_name_and_ttl():
    """origin.test is A 203.0.113.10 with the configured TTL, authoritative, no recursion offered."""
    _, reply, data = _ask(Zone(ttl=123), "origin.test")
    assert reply["rcode"] == 0 and not reply["tc"]
    assert reply["answers"] == [(1, 123, ORIGIN_IP)]
    flags = int.from_bytes(data[2:4], "big")
    assert flags & 0x0400 and not flags & 0x0080  # AA set, RA clear


def test_ttl_names():
    """<N>.ttl.test carries TTL N, for cache expiry tests."""
    _, reply, _ = _ask(Zone(), "7.ttl.test")
    assert reply["answers"] == [(1, 7, ORIGIN_IP)]


def test_big_answer_truncated_over_plain_udp_whole_over_tcp_and_edns():
    """big.test does not fit 512 bytes: TC over plain UDP, all 40 records over TCP or with EDNS 1232."""
    _, reply, data = _ask(Zone(), "big.test", udp=True)
    assert reply["tc"] and reply["answers"] == [] and len(data) <= 512
    _, reply, data = _ask(Zone(), "big.test", udp=False)
    assert not reply["tc"] and len(data) > 512
    assert [value for _, _, value in reply["answers"]] == big_addresses() and len(big_addresses()) == BIG_COUNT
    _, reply, data = _ask(Zone(), "big.test", udp=True, edns=1232)
    assert not reply["tc"] and len(reply["answers"]) == BIG_COUNT


def test_long_txt():
    """txt.test is one TXT record of over 512 bytes (TC over plain UDP)."""
    _, reply, _ = _ask(Zone(), "txt.test", dns.TXT, udp=False)
    assert len(reply["answers"]) == 1 and len(reply["answers"][0][2]) > 512
    _, reply, _ = _ask(Zone(), "txt.test", dns.TXT, udp=True)
    assert reply["tc"]


def test_nxdomain_and_nodata_carry_the_soa():
    """A missing name is NXDOMAIN, a missing type NODATA; both with the SOA (negative TTL)."""
    for qname, qtype, rcode in (("missing.test", dns.A, 3), ("origin.test", dns.AAAA, 0)):
        _, _, data = _ask(Zone(negative_ttl=11), qname, qtype)
        message = dns.Message()
        message.fromStr(data)
        assert message.rCode == rcode and message.answers == []
        assert [(r.type, r.ttl, r.payload.minimum) for r in message.authority] == [(dns.SOA, 11, 11)]


def test_outside_zone_refused_and_drop_unanswered():
    """Names outside test. are REFUSED; drop.test gets no reply; <M>.delay.test is delayed."""
    assert _ask(Zone(), "example.com")[1]["rcode"] == 5
    assert _ask(Zone(), "drop.test")[2] is None
    action, reply, _ = _ask(Zone(), "250.delay.test")
    assert action == ("delay", 0.25) and reply["answers"] == [(1, 300, ORIGIN_IP)]


def test_bench_wildcard_matches_the_checker():
    """*.bench.test answers bench_address(name), whatever the case; the bench's checker accepts it."""
    _, reply, _ = _ask(Zone(), "U1-17.Bench.Test", qid=9)
    assert reply["answers"] == [(1, 300, bench_address("u1-17.bench.test"))]
    assert check_reply(reply, 9, "u1-17.bench.test") is None
    assert bench_address("a.bench.test") != bench_address("b.bench.test")
