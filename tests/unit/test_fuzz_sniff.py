"""Hostile input for the SNI and Host sniffers, alone and inside the proxy connection.

Proven for every generated input:

* ``tls_sni``/``http_host`` return a ``str``, ``None`` or ``NEED_MORE`` and never raise, for
  random bytes, truncated/mutated ClientHellos with lying length fields (record, handshake,
  extensions, server_name list, host_name) and mutated request heads;
* only ``data[:SNIFF_CAP]`` matters and from ``SNIFF_CAP`` bytes on the answer is final;
* fed the way the server feeds them (the whole buffer again after every read), the total
  work stays bounded: a hello split into one-byte records or a head of thousands of tiny
  header lines is given up on early instead of being re-parsed in full after every read;
* :class:`~proxy.server.ProxyConnection` stops sniffing and pauses the client by the time
  its buffer reaches ``SNIFF_CAP``, so the peek buffer is bounded by the cap plus one read.
"""

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.sniff import NEED_MORE, SNIFF_CAP, http_host, tls_sni
from tests.unit.client_bytes import HEAD, client_hello, extension, real_hello, records, sni_extension
from tests.unit.proxy_world import World

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _answer(value):
    return value is None or value is NEED_MORE or isinstance(value, str)


def _u(n, size):
    return (n % (1 << (8 * size))).to_bytes(size, "big")


@st.composite
def lying_hellos(draw):
    """A ClientHello whose length fields are drawn independently of the bytes that follow them."""
    name = draw(st.binary(min_size=0, max_size=40))
    big = st.one_of(st.integers(0, 70000), st.sampled_from([0, 1, 0xFFFF, 0xFFFFFF, SNIFF_CAP, SNIFF_CAP - 1]))
    entry = b"\x00" + _u(draw(big), 2) + name
    sni_body = _u(draw(big), 2) + entry
    exts = _u(0, 2) + _u(draw(big), 2) + sni_body
    if draw(st.booleans()):
        exts = extension(21, bytes(draw(st.integers(0, 600)))) + exts
    fixed = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body = fixed + _u(draw(big), 2) + exts
    hs = b"\x01" + _u(draw(big), 3) + body
    record_len = draw(st.one_of(st.none(), big))
    if record_len is None:
        flight = records(hs, draw(st.integers(1, 600)))
    else:
        flight = b"\x16\x03\x01" + _u(record_len, 2) + hs
    return flight[: draw(st.integers(0, len(flight)))]


def _mutate(draw, data):
    data = bytearray(data)
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["set", "insert", "delete", "dup"]))
        pos = draw(st.integers(0, len(data)))
        if op == "set" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and pos < len(data):
            del data[pos : pos + draw(st.integers(1, 4))]
        elif op == "dup":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 64))]
    return bytes(data[: draw(st.integers(0, len(data)))])


_BASES = [
    records(client_hello()),
    records(client_hello(), 7),
    records(client_hello(size=9000), 1000),
    real_hello("example.com"),
    real_hello(None),
    HEAD,
    b"GET / HTTP/1.1\nHost: a.example\nHost: b.example\n\n",
    b"OPTIONS * HTTP/1.1\r\nHost: [2001:db8::1]:8080\r\n\r\n",
    b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
]


@st.composite
def mutated(draw):
    return _mutate(draw, draw(st.sampled_from(_BASES)))


@FUZZ
@given(st.one_of(st.binary(max_size=3000), lying_hellos(), mutated()))
def test_sniffers_answer_every_input(data):
    """Random, lying and mutated inputs give a well-typed answer from both sniffers (and as bytearray)."""
    for sniff in (tls_sni, http_host):
        answer = sniff(data)
        assert _answer(answer)
        assert sniff(bytearray(data)) == answer


@FUZZ
@given(st.one_of(lying_hellos(), mutated(), st.binary(max_size=64)), st.binary(min_size=1, max_size=16))
def test_cap_makes_the_answer_final(base, filler):
    """Padded past SNIFF_CAP, the answer is final and equals the answer for the first SNIFF_CAP bytes."""
    data = base + filler * ((SNIFF_CAP - len(base)) // len(filler) + 2)
    for sniff in (tls_sni, http_host):
        answer = sniff(data)
        assert answer is not NEED_MORE
        assert answer == sniff(data[:SNIFF_CAP])


@FUZZ
@given(st.one_of(lying_hellos(), mutated()), st.lists(st.integers(1, 700), min_size=1, max_size=30))
def test_incremental_feeding_agrees_with_the_whole(data, sizes):
    """Re-sniffing a growing buffer (as the server does) ends in the same answer as the whole input,
    unless an earlier prefix already gave a final answer (which the server would have used)."""
    for sniff in (tls_sni, http_host):
        whole = sniff(data)
        buf, pos, i, answer = b"", 0, 0, NEED_MORE
        while pos < len(data) and answer is NEED_MORE:
            size = sizes[i % len(sizes)]
            buf += data[pos : pos + size]
            pos += size
            i += 1
            answer = sniff(buf)
        assert _answer(answer)
        if answer is NEED_MORE:
            assert whole is NEED_MORE


def _server_feed_cost(sniff, data, step):
    """CPU seconds spent re-sniffing the growing buffer every ``step`` bytes until a final answer."""
    started = time.process_time()
    answer = NEED_MORE
    for end in range(step, len(data) + step, step):
        answer = sniff(data[:end])
        if answer is not NEED_MORE:
            break
    return time.process_time() - started, answer


def test_one_byte_records_are_not_reparsed_without_end():
    """A 16 KiB hello in one-byte records, one record per read: bounded total work.

    Before the fix the whole record chain was walked again after each of ~2,700 reads
    (≈3 s of reactor CPU per connection for ~16 KiB sent); now the sniffer gives up
    after ``_MAX_RECORDS`` records and the answer is final.
    """
    hs = client_hello(size=SNIFF_CAP // 6)
    spent, answer = _server_feed_cost(tls_sni, records(hs, 1), 6)
    assert answer is None
    assert spent < 1.0, spent


def test_thousands_of_empty_extensions_are_not_reparsed_without_end():
    """A hello of 3,500 empty extensions trickled 4 bytes per read: bounded total work (was ≈8 s)."""
    hs = client_hello([extension(1000 + i, b"") for i in range(3500)] + [sni_extension(b"example.com")])
    spent, answer = _server_feed_cost(tls_sni, records(hs, 16000), 4)
    assert answer is None
    assert spent < 1.0, spent


def test_thousands_of_server_name_entries_are_malformed():
    """2,000 server_name entries of an unknown type before the host_name: malformed, at once."""
    entries = b"\x01\x00\x01x" * 2000 + b"\x00\x00\x0bexample.com"
    hs = client_hello([extension(0, len(entries).to_bytes(2, "big") + entries), extension(21, bytes(7000))])
    flight = records(hs, 16000)
    assert tls_sni(flight) is None
    spent, answer = _server_feed_cost(tls_sni, flight, 4)
    assert answer is None and spent < 1.0, spent


def test_a_realistic_tiny_record_hello_still_parses():
    """A short hello in one-byte records (100-odd records) still yields its name."""
    assert tls_sni(records(client_hello(), 1)) == "example.com"


def test_thousands_of_tiny_header_lines_are_not_reparsed_without_end():
    """A head of 3,000 ``X:a`` lines, one line per read: bounded total work, answer None."""
    head = b"GET / HTTP/1.1\r\n" + b"X:a\r\n" * 3000
    spent, answer = _server_feed_cost(http_host, head, 5)
    assert answer is None
    assert spent < 1.0, spent


def test_host_after_a_normal_number_of_headers_is_found():
    """Dozens of headers before Host are fine (real browsers send 10-30)."""
    head = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(60)) + b"Host: late.example\r\n\r\n"
    assert http_host(head) == "late.example"


# --- inside the proxy connection ------------------------------------------------------------------


@FUZZ
@given(
    st.one_of(lying_hellos(), mutated(), st.binary(max_size=200)),
    st.binary(min_size=1, max_size=8),
    st.lists(st.integers(1, 5000), min_size=1, max_size=20),
    st.sampled_from([443, 80]),
)
def test_proxy_connection_peek_buffer_is_bounded(prefix, filler, sizes, port):
    """However the client trickles bytes, sniffing ends and the client is paused by SNIFF_CAP bytes."""
    w = World(sniff_budget=5.0)
    proto, transport = w.accept(port=port)
    data = prefix + filler * ((2 * SNIFF_CAP) // len(filler))
    pos, i = 0, 0
    while pos < len(data) and proto._sniffing:
        size = sizes[i % len(sizes)]
        proto.dataReceived(data[pos : pos + size])
        pos += size
        i += 1
        if len(proto._buffer) >= SNIFF_CAP:
            assert not proto._sniffing
    assert not proto._sniffing
    assert transport.producerState == "paused"
    assert len(proto._buffer) < SNIFF_CAP + max(sizes)
    assert sum(w.factory.stats.sniffed.values()) == 1
