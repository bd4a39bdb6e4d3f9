# -*- test-case-name: tests.unit.test_sniff -*-
"""Find the hostname a client is about to talk to, so CONNECT can name it instead of an IP.

Domain-ACL device proxies refuse bare IPs, so on client-first ports the server peeks
at the first bytes (TLS ClientHello SNI, HTTP ``Host``) before sending CONNECT.

The sniffers are pure functions over everything received so far and are called again
whenever more bytes arrive:

- a ``str`` is the answer;
- ``NEED_MORE`` means the bytes are a valid prefix of something that may still yield a
  name, so wait for more (within the peek budget);
- ``None`` means there is no name to be had: another protocol, no SNI/Host, malformed
  input, or ``SNIFF_CAP`` bytes seen without an answer. The caller falls back to the IP.
  Absurdly fragmented input counts as malformed: a hello spread over more than
  ``MAX_RECORDS`` records, with more than ``MAX_EXTENSIONS`` extensions or more than
  ``MAX_SERVER_NAMES`` server_name entries, or a request head with more than
  ``MAX_HEADER_LINES`` lines before an answer.

Only ``data[:SNIFF_CAP]`` is ever looked at, and once that many bytes are present the
answer is final (never ``NEED_MORE``), so the peek buffer is bounded. The sniffers never
raise on any bytes. The caller re-sniffs the whole buffer after every read, so the structure
limits above also bound the work per read: without them a client trickling a hello of
thousands of one-byte records or empty extensions made every read re-walk all of them
(seconds of reactor CPU per connection for 16 KiB sent). Names they return are raw; pass them through ``valid_hostname``
before they go anywhere near a request line.
"""

import re

SNIFF_CAP = 16384

#: Structure limits (far above what real clients send: 1-3 records, ~20 extensions, 1 name,
#: 10-30 header lines); beyond them the answer is None.
MAX_RECORDS = 128
MAX_EXTENSIONS = 128
MAX_SERVER_NAMES = 8
MAX_HEADER_LINES = 100

_MAX_RECORD = 16384  # TLS plaintext fragment limit (RFC 8446 §5.1)
_RECORD_HEADER = 5
_HANDSHAKE = 22
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_HOST_NAME = 0


class _NeedMore:
    """Type of the ``NEED_MORE`` sentinel; one instance, compared with ``is``."""

    __slots__ = ()
    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self):
        return "NEED_MORE"

    def __reduce__(self):
        return "NEED_MORE"

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


NEED_MORE = _NeedMore()


def _capped(sniff, data):
    """Apply ``sniff`` to ``data[:SNIFF_CAP]``; a cap reached without an answer is final."""
    view = bytes(data[:SNIFF_CAP])
    result = sniff(view)
    if result is NEED_MORE and len(view) >= SNIFF_CAP:
        return None
    return result


# --- TLS ------------------------------------------------------------------------------------------


class _Malformed(Exception):
    """The bytes cannot be a ClientHello, whatever follows."""


class _Truncated(Exception):
    """The bytes are a valid ClientHello prefix that ends too early."""


class _Reader:
    """Cursor over a possibly truncated buffer with a known logical end.

    Running past ``end`` is a structural error (malformed); running past the bytes
    received so far but not past ``end`` only means more bytes are needed.
    """

    def __init__(self, buf, pos, end):
        self.buf = buf
        self.pos = pos
        self.end = end

    def take(self, n):
        if self.pos + n > self.end:
            raise _Malformed()
        if self.pos + n > len(self.buf):
            raise _Truncated()
        chunk = self.buf[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def number(self, size):
        return int.from_bytes(self.take(size), "big")

    def vector(self, size, low=0, high=None):
        """A ``size``-byte length prefix and that many bytes, length checked before reading."""
        length = self.number(size)
        if length < low or (high is not None and length > high):
            raise _Malformed()
        return self.take(length)


def tls_sni(data):
    """The server_name of a TLS ClientHello, ``NEED_MORE``, or None (see the module docstring).

    The handshake layer is reassembled across records, and the last record may be cut
    short, because large (e.g. post-quantum) hellos span several segments and some
    clients fragment them over several records.
    """
    return _capped(_tls_sni, data)


def _tls_sni(data):
    handshake = bytearray()
    pos = 0
    count = 0
    while pos < len(data):
        count += 1
        if count > MAX_RECORDS:
            return None
        header = data[pos : pos + _RECORD_HEADER]
        if header[0] != _HANDSHAKE:
            return None  # alert, application data, SSLv2-style hello, not TLS at all
        if len(header) > 1 and header[1] != 3:
            return None
        if len(header) < _RECORD_HEADER:
            break
        length = int.from_bytes(header[3:5], "big")
        if length == 0 or length > _MAX_RECORD:
            return None
        start = pos + _RECORD_HEADER
        handshake += data[start : start + length]
        pos = start + length
        if len(handshake) >= 4 and len(handshake) >= 4 + int.from_bytes(handshake[1:4], "big"):
            break  # the hello is complete; what follows (CCS, early data) is not ours
    try:
        return _client_hello(handshake)
    except _Truncated:
        return NEED_MORE
    except _Malformed:
        return None


def _client_hello(hs):
    """Walk a (possibly truncated) ClientHello handshake message to its host_name."""
    if not hs:
        raise _Truncated()
    if hs[0] != _CLIENT_HELLO:
        raise _Malformed()
    if len(hs) < 4:
        raise _Truncated()
    end = 4 + int.from_bytes(hs[1:4], "big")
    if end + _RECORD_HEADER * -(-end // _MAX_RECORD) > SNIFF_CAP:
        raise _Malformed()  # cannot complete within the cap, even in full-size records
    r = _Reader(hs, 4, end)
    if r.take(2)[0] != 3:
        raise _Malformed()
    r.take(32)  # random
    r.vector(1, high=32)  # legacy session id
    suites = r.vector(2, low=2)
    if len(suites) % 2:
        raise _Malformed()
    r.vector(1, low=1)  # compression methods
    if r.pos == end:
        return None  # no extensions, so no SNI
    if r.pos + 2 + r.number(2) != end:
        raise _Malformed()
    seen = set()
    name = None
    while r.pos < end:
        if len(seen) >= MAX_EXTENSIONS:
            raise _Malformed()
        ext_type = r.number(2)
        body = r.vector(2)
        if ext_type in seen:
            raise _Malformed()  # RFC 8446 §4.2: one of each; two server_names would be ambiguous
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            name = _server_name(body)
    return name


def _server_name(body):
    """The host_name entry of a server_name extension body (RFC 6066 §3)."""
    r = _Reader(body, 0, len(body))
    if r.number(2) != len(body) - 2 or len(body) == 2:
        raise _Malformed()
    name = None
    count = 0
    while r.pos < len(body):
        count += 1
        if count > MAX_SERVER_NAMES:
            raise _Malformed()
        name_type = r.take(1)[0]
        value = r.vector(2, low=1)
        if name_type != _HOST_NAME:
            continue
        if name is not None or not value.isascii():
            raise _Malformed()
        name = value.decode("ascii")
    return name


# --- HTTP -----------------------------------------------------------------------------------------

_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_TARGET = rb"[\x21-\x7e\x80-\xff]"
_REQUEST_LINE = re.compile(rb"(%s{1,32}) (%s+) HTTP/1\.[0-9]" % (_TCHAR, _TARGET))
_REQUEST_PREFIX = re.compile(
    rb"%s{0,32}|%s{1,32} %s*|%s{1,32} %s+ (?:H(?:T(?:T(?:P(?:/(?:1(?:\.(?:[0-9]\r?)?)?)?)?)?)?)?)?"
    % (_TCHAR, _TCHAR, _TARGET, _TCHAR, _TARGET)
)
_FIELD = re.compile(rb"(%s+):([^\x00-\x08\x0a-\x1f\x7f]*)" % _TCHAR)
_FIELD_PREFIX = re.compile(rb"\r|%s*|%s+:[^\x00-\x08\x0a-\x1f\x7f]*\r?" % (_TCHAR, _TCHAR))
_AUTHORITY = re.compile(r"(\[[^\]]*\]|[^:\[\]]*)(?::[0-9]*)?")


def http_host(data):
    """The host of an HTTP/1.x request, ``NEED_MORE``, or None (see the module docstring).

    Only origin-form requests yield a name: an absolute-form or ``CONNECT``
    request is addressed to a proxy *at* the original destination, so its target
    is not where this connection goes (None → the caller uses the IP). The answer may
    come before the blank line once a ``Host`` line is complete, i.e. followed by a byte
    that is not an obs-fold continuation; conflicts are judged on the lines seen so far.
    """
    return _capped(_http_host, data)


def _http_host(data):
    eol = data.find(b"\n")
    if eol < 0:
        return NEED_MORE if _REQUEST_PREFIX.fullmatch(data) else None
    line = data[:eol]
    match = _REQUEST_LINE.fullmatch(line[:-1] if line.endswith(b"\r") else line)
    if match is None:
        return None
    method, target = match.groups()
    if method == b"CONNECT" or not (target.startswith(b"/") or target == b"*"):
        # Absolute-form or authority-form: the client is talking to *its own*
        # proxy at the original destination, and the named host is that proxy's
        # next hop. CONNECTing to it would bypass the client's proxy: use the IP.
        return None
    if target == b"*" and method != b"OPTIONS":
        return None

    hosts = set()
    first = None
    host_end = None
    pos = eol + 1
    lines = 0
    while True:
        lines += 1
        if lines > MAX_HEADER_LINES:
            return first  # a Host line already seen is the answer the caller had by now
        eol = data.find(b"\n", pos)
        if eol < 0:
            rest = data[pos:]
            if rest[:1] in (b" ", b"\t") or not _FIELD_PREFIX.fullmatch(rest):
                return None
            ended = False
            break
        line = data[pos:eol]
        pos = eol + 1
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            ended = True
            break
        if line[:1] in (b" ", b"\t"):
            return None  # obs-fold: a continuation line could smuggle a second value
        field = _FIELD.fullmatch(line)
        if field is None:
            return None
        if field.group(1).lower() == b"host":
            host = _host_of(field.group(2).strip(b" \t"))
            if host is None:
                return None
            hosts.add(host.lower())
            if len(hosts) > 1:
                return None
            first = first or host
            host_end = pos

    if ended or (first is not None and host_end < len(data)):
        return first
    return NEED_MORE


def _host_of(authority, port_required=False):
    """The host of ``host[:port]`` / ``[v6][:port]`` without brackets and port, or None."""
    if not authority.isascii() or b"@" in authority:
        return None  # userinfo only hides the real authority (RFC 9110 §4.2.4)
    text = authority.decode("ascii")
    match = _AUTHORITY.fullmatch(text)
    if match is None:
        return None
    host = match.group(1)
    if host.startswith("["):
        host = host[1:-1]
    if not host or (port_required and ":" not in text[match.end(1) :]):
        return None
    return host


# --- names ----------------------------------------------------------------------------------------

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_NUMERIC = re.compile(r"[0-9]+|0x[0-9a-f]*")
_MAX_INPUT = 1024


def valid_hostname(name):
    """The canonical form of ``name`` for a CONNECT line, or None if it is not a DNS name.

    The result is lowercase ASCII (IDNA A-labels), so it cannot carry CR/LF, spaces,
    ``:``/``/``/``@`` or anything else that would change the meaning of the request.
    Whether a name may be asked for at all (``localhost``, ``.local``...) is
    :mod:`proxy.destinations`' call, not a syntax question. IP literals are refused too (including inet_aton's numeric forms such as
    ``0x7f.1``): the caller already has the IP, and a sniffed IP is not a name.
    """
    if not isinstance(name, str) or not name or len(name) > _MAX_INPUT:
        return None
    if name.endswith("."):
        name = name[:-1]
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    name = name.lower()
    if not name or len(name) > 253:
        return None
    labels = name.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return None
    if _NUMERIC.fullmatch(labels[-1]):
        return None
    return name
