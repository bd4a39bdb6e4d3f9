"""SNI and Host sniffing on real and hand-built client bytes, the cap, and hostname validation."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sniff import NEED_MORE, SNIFF_CAP, http_host, tls_sni, valid_hostname
from tests.unit.client_bytes import HEAD, client_hello, extension, handshake_of, real_hello, records, sni_extension

BOUNDED = settings(max_examples=300, deadline=None)


# --- feeding client bytes (built in tests/unit/client_bytes.py) ----------------------------------


def feed(sniff, data, chunk_sizes):
    """Play the server: grow a buffer chunk by chunk, stop at the first answer that is not NEED_MORE."""
    buf, pos, i = b"", 0, 0
    result = NEED_MORE
    while pos < len(data) and result is NEED_MORE:
        size = chunk_sizes[min(i, len(chunk_sizes) - 1)]
        buf += data[pos : pos + size]
        pos += size
        i += 1
        result = sniff(buf)
    return result


def assert_prefixes_need_more(sniff, data, answer):
    """Every proper prefix is NEED_MORE and the whole input gives ``answer``."""
    for n in range(len(data)):
        assert sniff(data[:n]) is NEED_MORE, n
    assert sniff(data) == answer


# --- NEED_MORE ------------------------------------------------------------------------------------


def test_need_more_is_a_named_singleton():
    """NEED_MORE reprs as its name and survives copy/pickle as the same object."""
    import copy
    import pickle

    assert repr(NEED_MORE) == "NEED_MORE"
    assert type(NEED_MORE)() is NEED_MORE
    assert copy.deepcopy(NEED_MORE) is NEED_MORE
    assert pickle.loads(pickle.dumps(NEED_MORE)) is NEED_MORE


# --- TLS: real hellos -----------------------------------------------------------------------------


def test_real_hello_with_sni():
    """OpenSSL's ClientHello for example.com yields example.com."""
    assert tls_sni(real_hello("example.com")) == "example.com"


def test_real_hello_without_sni():
    """A ClientHello without server_name yields None, not NEED_MORE."""
    assert tls_sni(real_hello(None)) is None


def test_real_hello_idna_name_is_the_a_label():
    """A Unicode server_hostname goes on the wire as its A-label, which is returned as is."""
    assert tls_sni(real_hello("münchen.de")) == "xn--mnchen-3ya.de"


@pytest.mark.parametrize("name,answer", [("example.com", "example.com"), (None, None)])
def test_every_prefix_of_real_hello_needs_more(name, answer):
    """Any cut of a genuine hello, down to zero bytes, is a valid prefix."""
    assert_prefixes_need_more(tls_sni, real_hello(name), answer)


def test_real_hello_fed_byte_by_byte():
    """Single-byte segments give the same answer as one segment."""
    assert feed(tls_sni, real_hello("example.com"), [1]) == "example.com"


def test_real_hello_refragmented_over_three_records():
    """The same handshake message split over three records (one cut inside the header) still parses."""
    hs = handshake_of(real_hello("example.com"))
    flight = records(hs, 2, 200, 16384)
    assert flight.count(b"\x16\x03\x01") >= 3
    assert_prefixes_need_more(tls_sni, flight, "example.com")
    assert feed(tls_sni, flight, [1]) == "example.com"


def test_hello_followed_by_other_records():
    """Records after a complete hello (middlebox CCS, early data) do not matter."""
    flight = real_hello("example.com") + b"\x14\x03\x03\x00\x01\x01" + b"\x17\x03\x03\x00\x05hello"
    assert tls_sni(flight) == "example.com"


# --- TLS: hand-built hellos -----------------------------------------------------------------------


def test_hand_built_hello():
    """The builder itself produces a hello the sniffer accepts (guards the builder)."""
    assert tls_sni(records(client_hello())) == "example.com"


def test_large_hello_spanning_records():
    """A 6 KiB hello (padding before SNI, like a post-quantum key share) over two records and many segments."""
    hs = client_hello([extension(51, bytes(1200)), sni_extension(b"pq.example.net")], size=6000)
    flight = records(hs, 4096)
    assert len(flight) == 6010
    assert_prefixes_need_more(tls_sni, flight, "pq.example.net")
    assert feed(tls_sni, flight, [1448]) == "pq.example.net"
    assert feed(tls_sni, flight, [7]) == "pq.example.net"


def test_many_tiny_records():
    """A hello in one-byte records still parses (it fits the cap: 6 bytes per hello byte)."""
    hs = client_hello()
    assert tls_sni(records(hs, 1)) == "example.com"


def test_non_name_entries_are_skipped():
    """server_name entries of other types are skipped, the host_name entry is found."""
    assert tls_sni(records(client_hello([sni_extension(b"xyz", name_type=7)]))) is None
    entries = b"\x07\x00\x03xyz" + b"\x00\x00\x0bexample.com"
    ext = extension(0, len(entries).to_bytes(2, "big") + entries)
    assert tls_sni(records(client_hello([ext]))) == "example.com"


def test_sni_after_other_extensions():
    """The extension walk reaches server_name wherever it is in the list."""
    exts = [extension(10, b"\x00\x02\x00\x1d"), extension(43, b"\x02\x03\x04"), sni_extension(b"late.example")]
    assert tls_sni(records(client_hello(exts))) == "late.example"


def test_hello_without_extensions():
    """An old-style hello with no extensions block has no SNI."""
    hs = client_hello()
    body = hs[4 : 4 + 2 + 32 + 1 + 32 + 2 + 4 + 2]
    assert tls_sni(records(b"\x01" + len(body).to_bytes(3, "big") + body)) is None


@pytest.mark.parametrize(
    "flight",
    [
        pytest.param(b"\x15\x03\x03\x00\x02\x02\x28", id="alert-first"),
        pytest.param(b"\x17\x03\x03\x00\x05hello", id="application-data-first"),
        pytest.param(b"\x14\x03\x03\x00\x01\x01", id="ccs-first"),
        pytest.param(b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10", id="sslv2-hello"),
        pytest.param(b"\x16\x02", id="record-version-2"),
        pytest.param(b"\x16\x03\x01\x00\x00", id="zero-length-record"),
        pytest.param(b"\x16\x03\x01\x40\x01", id="record-over-16k"),
        pytest.param(b"\x16\x03\x01\x00\x04\x02", id="server-hello"),
        pytest.param(b"GET / HTTP/1.1\r\n", id="http"),
        pytest.param(b"SSH-2.0-OpenSSH_9.2\r\n", id="ssh"),
    ],
)
def test_not_a_client_hello_is_none(flight):
    """Anything that is not a handshake record carrying a ClientHello is rejected at once."""
    assert tls_sni(flight) is None


def test_interleaved_record_between_fragments():
    """A non-handshake record between two hello fragments is a protocol violation."""
    hs = client_hello()
    flight = records(hs[:50]) + b"\x17\x03\x03\x00\x01x" + records(hs[50:])
    assert tls_sni(flight) is None


def _with_exts(*exts):
    return records(client_hello(list(exts)))


@pytest.mark.parametrize(
    "flight",
    [
        pytest.param(records(client_hello(version=b"\x02\x00")), id="client-version-2"),
        pytest.param(records(client_hello(session_id=bytes(33))), id="session-id-33"),
        pytest.param(records(client_hello(suites=b"\x13\x01\x13")), id="odd-cipher-suites"),
        pytest.param(records(client_hello(suites=b"")), id="no-cipher-suites"),
        pytest.param(records(client_hello(compression=b"")), id="no-compression-methods"),
        pytest.param(_with_exts(sni_extension(b"a.example"), sni_extension(b"b.example")), id="two-sni-extensions"),
        pytest.param(_with_exts(sni_extension(b"a.example", b"b.example")), id="two-host-names"),
        pytest.param(_with_exts(extension(0, b"")), id="empty-sni-extension"),
        pytest.param(_with_exts(extension(0, b"\x00\x00")), id="empty-server-name-list"),
        pytest.param(_with_exts(extension(0, b"\x00\x05\x00\x00\x01a")), id="list-length-mismatch"),
        pytest.param(_with_exts(sni_extension(b"")), id="empty-host-name"),
        pytest.param(_with_exts(sni_extension("bücher.de".encode())), id="non-ascii-name"),
        pytest.param(_with_exts(extension(5, b"")[:3]), id="truncated-extension-header"),
        pytest.param(_with_exts(extension(10, b"\x00\x02\x00\x1d"), extension(10, b"")), id="duplicate-extension"),
    ],
)
def test_malformed_hello_is_none(flight):
    """Structural errors give None on the complete hello."""
    assert tls_sni(flight) is None


def test_handshake_length_shorter_than_body():
    """A handshake length that cuts the extension block makes the hello malformed."""
    hs = bytearray(client_hello())
    hs[1:4] = (len(hs) - 4 - 3).to_bytes(3, "big")
    assert tls_sni(records(bytes(hs))) is None


def test_malformation_is_seen_before_the_hello_ends():
    """A bad session-id length is rejected from a prefix, without waiting for the rest."""
    flight = records(client_hello(session_id=bytes(33)))
    assert tls_sni(flight[: 5 + 4 + 2 + 32 + 1]) is None


# --- TLS: the cap ---------------------------------------------------------------------------------


def test_hello_filling_the_cap_exactly():
    """A hello whose single record ends at byte SNIFF_CAP is found, with or without bytes after it."""
    flight = records(client_hello(size=SNIFF_CAP - 5))
    assert len(flight) == SNIFF_CAP
    assert tls_sni(flight) == "example.com"
    assert tls_sni(flight + b"\x17\x03\x03\x00\x01x") == "example.com"
    assert tls_sni(flight[:-1]) is NEED_MORE


def test_hello_too_big_for_the_cap_is_refused_early():
    """A hello that cannot fit within the cap is None as soon as its length is known."""
    flight = records(client_hello(size=SNIFF_CAP - 4), 16000)
    assert tls_sni(flight[:8]) is NEED_MORE
    assert tls_sni(flight[:9]) is None
    assert tls_sni(flight) is None


def test_cap_reached_mid_hello_is_none():
    """Small records push a hello past the cap: None at the cap, never NEED_MORE."""
    hs = client_hello(size=16300)
    assert tls_sni(records(hs)) == "example.com"
    flight = records(hs, 1000)
    assert len(flight) == SNIFF_CAP + 1
    assert tls_sni(flight[: SNIFF_CAP - 1]) is NEED_MORE
    assert tls_sni(flight[:SNIFF_CAP]) is None
    assert tls_sni(flight) is None


# --- HTTP -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head,answer",
    [
        pytest.param(HEAD, "www.example.com", id="origin-form"),
        pytest.param(b"GET http://abs.example:8080/x HTTP/1.1\r\nHost: other.example\r\n\r\n", None, id="abs"),
        pytest.param(b"GET https://abs.example/ HTTP/1.1\r\n\r\n", None, id="absolute-https-no-host"),
        pytest.param(b"GET HTTP://[2001:db8::2]/ HTTP/1.1\r\n\r\n", None, id="absolute-ipv6"),
        pytest.param(b"POST /api HTTP/1.1\r\nHost: api.example:8080\r\n\r\n", "api.example", id="port"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:8080\r\n\r\n", "2001:db8::1", id="ipv6-port"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n", "::1", id="ipv6"),
        pytest.param(b"GET / HTTP/1.0\nAccept: */*\nHost: lf.example\n\n", "lf.example", id="lf-only"),
        pytest.param(b"GET / HTTP/1.1\r\nhost: lower.example\r\n\r\n", "lower.example", id="lowercase-name"),
        pytest.param(b"GET / HTTP/1.1\r\nHOST:\t tab.example \t\r\n\r\n", "tab.example", id="ows"),
        pytest.param(b"GET / HTTP/1.1\r\nHost:bare.example\r\n\r\n", "bare.example", id="no-ows"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: Mixed.Example.\r\n\r\n", "Mixed.Example.", id="raw-not-canonical"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x.example:\r\n\r\n", "x.example", id="empty-port"),
        pytest.param(b"OPTIONS * HTTP/1.1\r\nHost: star.example\r\n\r\n", "star.example", id="asterisk"),
        pytest.param(b"PROPFIND /dav HTTP/1.1\r\nHost: dav.example\r\n\r\n", "dav.example", id="other-method"),
        pytest.param(b"CONNECT target.example:443 HTTP/1.1\r\nHost: h.example:443\r\n\r\n", None, id="connect"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a.example\r\nhost: A.EXAMPLE:80\r\n\r\n", "a.example", id="same-dup"),
        pytest.param(b"GET /%C3%BC\xc3\xbc HTTP/1.1\r\nHost: u.example\r\n\r\n", "u.example", id="obs-text-path"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", "a b", id="raw-for-the-caller-to-reject"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: dup.example\r\nHost: other.example\r\n\r\n", None, id="conflict"),
        pytest.param(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", None, id="no-host"),
        pytest.param(b"GET / HTTP/1.1\r\nHost:\r\n\r\n", None, id="empty-host"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: \xc3\xbc.example\r\n\r\n", None, id="non-ascii-host"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a.example:80a\r\n\r\n", None, id="bad-port"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: ::1\r\n\r\n", None, id="ipv6-without-brackets"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", None, id="unclosed-bracket"),
        pytest.param(b"GET / HTTP/1.1\r\nHost : a.example\r\n\r\n", None, id="space-before-colon"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a.example\r\n folded.example\r\n\r\n", None, id="obs-fold"),
        pytest.param(b"GET / HTTP/1.1\r\nX: 1\r\n\tHost: a.example\r\n\r\n", None, id="obs-fold-tab"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a.example\rX: y\r\n\r\n", None, id="bare-cr"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\x00.example\r\n\r\n", None, id="nul"),
        pytest.param(b"GET / HTTP/1.1\r\nNo colon here\r\nHost: a.example\r\n\r\n", None, id="bad-field"),
        pytest.param(b"GET http://user@abs.example/ HTTP/1.1\r\n\r\n", None, id="userinfo"),
        pytest.param(b"GET ftp://abs.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n", None, id="ftp-scheme"),
        pytest.param(b"GET http:///x HTTP/1.1\r\nHost: a.example\r\n\r\n", None, id="absolute-empty-host"),
        pytest.param(b"GET abs.example:80 HTTP/1.1\r\nHost: a.example\r\n\r\n", None, id="authority-not-connect"),
        pytest.param(b"CONNECT / HTTP/1.1\r\nHost: a.example\r\n\r\n", None, id="connect-origin-form"),
        pytest.param(b"CONNECT target.example HTTP/1.1\r\nHost: a.example\r\n\r\n", None, id="connect-no-port"),
        pytest.param(b"GET * HTTP/1.1\r\nHost: a.example\r\n\r\n", None, id="asterisk-not-options"),
        pytest.param(b"G@T / HTTP/1.1\r\nHost: a.example\r\n\r\n", None, id="bad-method"),
        pytest.param(b"A" * 33 + b" / HTTP/1.1\r\nHost: a.example\r\n\r\n", None, id="method-too-long"),
        pytest.param(b"GET / HTTP/2.0\r\nHost: a.example\r\n\r\n", None, id="http2-version"),
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", None, id="h2-preface"),
        pytest.param(b"GET /\r\n", None, id="http-0.9"),
        pytest.param(b"GET  / HTTP/1.1\r\nHost: a.example\r\n\r\n", None, id="double-space"),
        pytest.param(b"GET / HTTP/1.1 \r\nHost: a.example\r\n\r\n", None, id="trailing-space"),
        pytest.param(b"\r\nGET / HTTP/1.1\r\nHost: a.example\r\n\r\n", None, id="leading-crlf"),
    ],
)
def test_http_host(head, answer):
    """Complete request heads: the host the request names, or None."""
    assert http_host(head) == answer


def test_absolute_form_is_not_a_destination():
    """A request to the client's own proxy (absolute-form, CONNECT) gives no name: the IP is used.

    The original destination *is* that proxy; CONNECTing to the named host would bypass it.
    """
    assert http_host(b"GET http://abs.example/ HTTP/1.1\r\nHost: h.example\r\nAcc") is None
    assert http_host(b"GET http://abs.example/ HTTP/1.1\r\nAccept: */*\r\n") is None
    assert http_host(b"CONNECT abs.example:443 HTTP/1.1\r\nHost: abs.example:443\r\n\r\n") is None


@pytest.mark.parametrize("head", [HEAD, b"GET /x HTTP/1.1\nAccept: */*\nHost: h.example\nAccept: */*\n\n"])
def test_every_prefix_of_a_head_is_need_more_or_the_answer(head):
    """Growing a well-formed head never gives a different answer than the whole head."""
    answer = http_host(head)
    assert answer is not None and answer is not NEED_MORE
    for n in range(len(head) + 1):
        assert http_host(head[:n]) in (NEED_MORE, answer), n
    assert feed(http_host, head, [1]) == answer


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(real_hello("example.com"), id="tls-on-port-80"),
        pytest.param(bytes(range(256)), id="binary"),
        pytest.param(b"\x00\x00\x00\x00", id="zeros"),
        pytest.param(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n", id="ssh"),
        pytest.param(b"EHLO mail.example\r\n", id="smtp"),
        pytest.param(b"GET / HTTP/1.1\r\n\x80\x81", id="binary-after-request-line"),
    ],
)
def test_not_http_is_none(data):
    """Non-HTTP bytes are rejected as soon as they cannot be a request head."""
    assert http_host(data) is None
    assert http_host(data[: max(1, len(data) // 2)]) in (None, NEED_MORE)


def test_garbage_rejected_on_first_byte():
    """A first byte that cannot start a method is enough to give up."""
    assert http_host(b"\x16") is None
    assert http_host(b"\x00") is None


def test_long_request_line_hits_the_cap():
    """A request line longer than the cap is NEED_MORE below the cap and None from the cap on."""
    line = b"GET /" + b"a" * (2 * SNIFF_CAP) + b" HTTP/1.1\r\nHost: a.example\r\n\r\n"
    assert http_host(line[: SNIFF_CAP - 1]) is NEED_MORE
    assert http_host(line[:SNIFF_CAP]) is None
    assert http_host(line) is None


def test_head_filling_the_cap_exactly():
    """A head whose Host line is confirmed by byte SNIFF_CAP is found; one byte later it is not."""
    top = b"GET / HTTP/1.1\r\nX-Pad: "
    tail = b"\r\nHost: a.example\r\n\r\n"
    head = top + b"p" * (SNIFF_CAP + 1 - len(top) - len(tail)) + tail
    assert len(head) == SNIFF_CAP + 1  # byte SNIFF_CAP - 1 is the blank line's CR
    assert http_host(head) == "a.example"
    longer = top + b"p" + head[len(top) :]
    assert http_host(longer) is None
    assert http_host(longer[:SNIFF_CAP]) is None


# --- valid_hostname -------------------------------------------------------------------------------

LONG_LABEL = "a" * 63
NAME_253 = ".".join([LONG_LABEL] * 3 + ["b" * 61])


@pytest.mark.parametrize(
    "name,canonical",
    [
        ("example.com", "example.com"),
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("localhost", "localhost"),  # syntactically a name; proxy.destinations refuses it
        ("db.localhost", "db.localhost"),
        ("a", "a"),
        ("_dmarc.example.com", "_dmarc.example.com"),
        ("my_host.lan", "my_host.lan"),
        ("a-b.example", "a-b.example"),
        ("1.2.3.com", "1.2.3.com"),
        ("123.example", "123.example"),
        ("xn--mnchen-3ya.de", "xn--mnchen-3ya.de"),
        ("münchen.de", "xn--mnchen-3ya.de"),
        ("MÜNCHEN.DE", "xn--mnchen-3ya.de"),
        ("www.bücher.de.", "www.xn--bcher-kva.de"),
        (LONG_LABEL + ".com", LONG_LABEL + ".com"),
        (NAME_253, NAME_253),
        (NAME_253 + ".", NAME_253),
        ("evil.com\r\nX: y", None),
        ("evil.com\n", None),
        ("a b", None),
        ("a\tb", None),
        ("a\x00b", None),
        ("10.0.0.1", None),
        ("10.0.0.1.", None),
        ("127.1", None),
        ("2130706433", None),
        ("0x7f.1", None),
        ("0x7f000001", None),
        ("::1", None),
        ("[::1]", None),
        ("2001:db8::1", None),
        ("example.com:443", None),
        ("user@example.com", None),
        ("example.com/path", None),
        ("exa%6dple.com", None),
        ("*.example.com", None),
        ("", None),
        (".", None),
        ("..", None),
        ("example.com..", None),
        (".example.com", None),
        ("a..b", None),
        ("-a.example", None),
        ("a-.example", None),
        ("a" * 64 + ".com", None),
        (NAME_253 + "b", None),
        ("a" * 64 + ".münchen.de", None),
        ("℀.com", None),
        ("ex\uff1aample.com", None),
        ("\u200b", None),
        ("\udcff.example", None),
        ("x" * 5000, None),
        (None, None),
        (b"example.com", None),
    ],
)
def test_valid_hostname(name, canonical):
    """Good names come back canonical; IPs, injection and bad lengths/labels are refused."""
    assert valid_hostname(name) == canonical


def test_valid_hostname_254_chars():
    """253 characters is the limit for the name without its trailing dot."""
    assert len(NAME_253) == 253
    assert valid_hostname(NAME_253 + "b") is None
    assert len(NAME_253 + "b") == 254


# --- properties -----------------------------------------------------------------------------------

HELLO = real_hello("example.com")
HELLOS = st.sampled_from([HELLO, real_hello(None), real_hello("münchen.de"), records(handshake_of(HELLO), 100)])
HEADS = st.sampled_from(
    [HEAD, b"GET http://abs.example/ HTTP/1.1\nHost: h.example\n\n", b"CONNECT a:1 HTTP/1.1\r\nHost: a\r\n\r\n"]
)


def is_answer(value):
    """A sniffer result is a str, None or NEED_MORE, nothing else."""
    return value is None or value is NEED_MORE or isinstance(value, str)


@st.composite
def mutated(draw, base):
    """A base input truncated and with a few bytes overwritten, inserted or deleted."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["set", "insert", "delete"]))
        pos = draw(st.integers(0, len(data)))
        byte = draw(st.integers(0, 255))
        if op == "set" and pos < len(data):
            data[pos] = byte
        elif op == "insert":
            data.insert(pos, byte)
        elif pos < len(data):
            del data[pos]
    return bytes(data[: draw(st.integers(0, len(data)))])


@BOUNDED
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data):
    """Arbitrary bytes give a well-typed answer from both sniffers."""
    assert is_answer(tls_sni(data))
    assert is_answer(http_host(data))


@BOUNDED
@given(mutated(HELLOS))
def test_mutated_hellos_never_raise(data):
    """Truncated and mutated real hellos give a well-typed answer."""
    assert is_answer(tls_sni(data))
    assert is_answer(http_host(data))


@BOUNDED
@given(mutated(HEADS))
def test_mutated_heads_never_raise(data):
    """Truncated and mutated request heads give a well-typed answer."""
    assert is_answer(http_host(data))
    assert is_answer(tls_sni(data))


@BOUNDED
@given(HELLOS, st.lists(st.integers(1, 600), min_size=1, max_size=20))
def test_hello_segment_splits_do_not_matter(hello, sizes):
    """Any segmentation of a hello gives the answer of the whole hello."""
    assert feed(tls_sni, hello, sizes) == tls_sni(hello)


@BOUNDED
@given(
    st.one_of(mutated(HELLOS), mutated(HEADS), st.binary(max_size=200)),
    st.binary(min_size=1, max_size=8),
    st.integers(0, 3000),
)
def test_cap_bounds_what_is_read(base, filler, extra):
    """Past SNIFF_CAP the answer is final and equals the answer for data[:SNIFF_CAP]."""
    data = base + filler * ((SNIFF_CAP + extra) // len(filler) + 1)
    for sniff in (tls_sni, http_host):
        answer = sniff(data)
        assert answer is not NEED_MORE
        assert answer == sniff(data[:SNIFF_CAP])
        assert answer == sniff(bytearray(data[: SNIFF_CAP + 1]))


@BOUNDED
@given(st.text(max_size=300))
def test_valid_hostname_output_is_canonical(name):
    """Any accepted name is short lowercase ASCII with no separators, and canonicalising is idempotent."""
    out = valid_hostname(name)
    if out is not None:
        assert out.isascii() and out == out.lower() and 0 < len(out) <= 253
        assert not set(out) & set(" \t\r\n\x00/@:[]%*?#")
        assert valid_hostname(out) == out
