"""A client's first bytes for the sniffing tests: genuine TLS ClientHellos from Python's own
client, hand-built ones (extensions, SNI, padding), TLS record framing, and an HTTP head.

Shared by ``test_sniff.py`` and ``test_fuzz_sniff.py``. Helpers, not tests.
"""

import functools
import ssl

import pytest

HEAD = b"GET /index.html?q=1 HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: curl/8.5\r\nAccept: */*\r\n\r\n"


@functools.lru_cache(maxsize=None)
def real_hello(server_hostname):
    """The first flight of Python's own TLS client: genuine ClientHello record(s) from OpenSSL."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if server_hostname is None:
        context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def handshake_of(flight):
    """The handshake-layer bytes carried by a sequence of TLS records."""
    out, pos = b"", 0
    while pos < len(flight):
        assert flight[pos] == 22
        length = int.from_bytes(flight[pos + 3 : pos + 5], "big")
        out += flight[pos + 5 : pos + 5 + length]
        pos += 5 + length
    return out


def records(handshake, *sizes, content_type=22, version=b"\x03\x01"):
    """Frame handshake bytes as TLS records of the given fragment sizes (the last size repeats)."""
    out, pos, i = b"", 0, 0
    sizes = sizes or (16384,)
    while pos < len(handshake):
        size = sizes[min(i, len(sizes) - 1)]
        fragment = handshake[pos : pos + size]
        out += bytes([content_type]) + version + len(fragment).to_bytes(2, "big") + fragment
        pos += size
        i += 1
    return out


def extension(ext_type, body):
    """One TLS extension: type, length, body."""
    return ext_type.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body


def sni_extension(*names, name_type=0):
    """A server_name extension listing ``names`` (bytes) with ``name_type``."""
    entries = b"".join(bytes([name_type]) + len(n).to_bytes(2, "big") + n for n in names)
    return extension(0, len(entries).to_bytes(2, "big") + entries)


def client_hello(
    extensions=None,
    size=None,
    version=b"\x03\x03",
    session_id=bytes(32),
    suites=b"\x13\x01\x13\x02",
    compression=b"\x00",
):
    """A hand-built ClientHello handshake message; ``size`` pads it (extension 21) to that many bytes."""
    if extensions is None:
        extensions = [sni_extension(b"example.com")]
    fixed = (
        version
        + bytes(range(32))
        + bytes([len(session_id)])
        + session_id
        + len(suites).to_bytes(2, "big")
        + suites
        + bytes([len(compression)])
        + compression
    )
    exts = b"".join(extensions)
    if size is not None:
        pad = size - (4 + len(fixed) + 2 + len(exts) + 4)
        assert pad >= 0
        exts = extension(21, bytes(pad)) + exts
    body = fixed + len(exts).to_bytes(2, "big") + exts
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    assert size is None or len(message) == size
    return message
