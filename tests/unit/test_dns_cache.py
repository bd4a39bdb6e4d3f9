"""proxy.dnscache: TTL policy (RFC 1035/2308), caps, aging and expiry by Clock, LRU, per-device isolation."""

from twisted.internet.task import Clock
from twisted.names import dns

from proxy.dnscache import DNSCache, cache_ttl
from tests.unit.dns_wire import a_record, decode, make_query, make_reply, soa_record

KEY = (b"www.example.com", dns.A, dns.IN)


def reply(**kw):
    return decode(make_reply(make_query(name=b"www.example.com"), **kw))


def test_positive_ttl_is_the_minimum_of_the_answer_capped():
    """The smallest answer TTL wins; a huge TTL is capped."""
    answers = [a_record(b"www.example.com", ttl=300), a_record(b"www.example.com", "192.0.2.2", ttl=120)]
    assert cache_ttl(reply(answers=answers)) == 120
    assert cache_ttl(reply(ttl=10**7), max_ttl=86400) == 86400


def test_negative_ttl_uses_soa_minimum_or_soa_ttl_capped():
    """RFC 2308 §5: min(SOA TTL, SOA MINIMUM) for NXDOMAIN and NODATA, capped."""
    assert cache_ttl(reply(rcode=dns.ENAME, authority=[soa_record(ttl=3600, minimum=60)])) == 60
    assert cache_ttl(reply(answers=[], authority=[soa_record(ttl=30, minimum=600)])) == 30
    huge = reply(rcode=dns.ENAME, authority=[soa_record(ttl=86400, minimum=86400)])
    assert cache_ttl(huge, max_negative_ttl=900) == 900


def test_uncacheable_replies():
    """SERVFAIL, REFUSED, truncated, negative without SOA and zero TTLs are not cached."""
    assert cache_ttl(reply(rcode=dns.ESERVER)) is None
    assert cache_ttl(reply(rcode=dns.EREFUSED)) is None
    assert cache_ttl(reply(rcode=dns.ENAME)) is None
    assert cache_ttl(reply(ttl=0)) is None
    truncated = reply()
    truncated.trunc = 1
    assert cache_ttl(truncated) is None


def test_hit_ages_and_expires_with_the_clock():
    """A hit reports its age in whole seconds; at the TTL it is gone."""
    clock = Clock()
    cache = DNSCache(clock)
    assert cache.put("dev1", KEY, reply(ttl=300))
    message, age = cache.get("dev1", KEY)
    assert age == 0 and message.answers[0].ttl == 300
    clock.advance(100.7)
    assert cache.get("dev1", KEY)[1] == 100
    clock.advance(199.2)
    assert cache.get("dev1", KEY) is not None
    clock.advance(0.1)
    assert cache.get("dev1", KEY) is None
    assert cache.size() == 0, "an expired entry is dropped on lookup"


def test_servfail_is_not_stored():
    """put() refuses what cache_ttl refuses."""
    cache = DNSCache(Clock())
    assert not cache.put("dev1", KEY, reply(rcode=dns.ESERVER))
    assert cache.get("dev1", KEY) is None


def test_devices_are_isolated_and_forget_drops_one_device():
    """One device's answers are never served to another; forget() clears only that device."""
    cache = DNSCache(Clock())
    cache.put("dev1", KEY, reply())
    assert cache.get("dev2", KEY) is None
    cache.put("dev2", KEY, reply())
    cache.forget("dev1")
    assert cache.get("dev1", KEY) is None
    assert cache.get("dev2", KEY) is not None


def test_lru_bound_per_device_evicts_the_least_recently_used():
    """With 2 entries per device, touching the oldest makes the middle one the victim."""
    cache = DNSCache(Clock(), entries=2)
    keys = [(b"n%d.example" % i, dns.A, dns.IN) for i in range(3)]
    cache.put("dev1", keys[0], reply())
    cache.put("dev1", keys[1], reply())
    cache.put("dev2", keys[2], reply())  # other devices do not count against dev1
    assert cache.get("dev1", keys[0]) is not None
    cache.put("dev1", keys[2], reply())
    assert cache.get("dev1", keys[1]) is None
    assert cache.get("dev1", keys[0]) is not None and cache.get("dev1", keys[2]) is not None
    assert cache.size("dev1") == 2 and cache.size() == 3


def test_opt_records_are_not_stored():
    """EDNS is per client: the cached copy holds no OPT (the server adds one per client)."""
    cache = DNSCache(Clock())
    cache.put("dev1", KEY, reply(edns=4096))
    message, _ = cache.get("dev1", KEY)
    assert [r.type for r in message.additional] == []
    assert message.rCode == dns.OK and message.recAv == 1
