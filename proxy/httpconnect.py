# -*- test-case-name: tests.unit.test_upstream -*-
"""HTTP CONNECT (RFC 9110 §9.3.6) to a device proxy: the request and the parser of the reply head.

Kept out of :mod:`proxy.upstream` so the HTTP wire format, its size limits and the mapping of
status codes to typed errors read on their own. The connection, its timer and the choice of
protocol stay with :class:`proxy.upstream.HandshakeClient`, whose context (``ctx``: names the
device proxy, scrubs secrets from what the proxy echoes) builds every error raised here.
"""

import base64
import re

from proxy.upstreamerrors import AuthRefused, Forbidden, MalformedReply, Unreachable

__all__ = ["MAX_STATUS_LINE", "MAX_HEAD", "MAX_HEADERS", "basic_token", "connect_request", "HTTPConnectReply"]

MAX_STATUS_LINE = 4096  # bytes, including the line end
MAX_HEAD = 16384  # bytes of status line, headers and the blank line
MAX_HEADERS = 100  # header lines


def basic_token(upstream):
    """The RFC 7617 Basic credentials, UTF-8 encoded."""
    user, password = upstream.username or "", upstream.password or ""
    if ":" in user:
        raise ValueError("the username contains ':', which Basic authentication cannot carry")
    return base64.b64encode(("%s:%s" % (user, password)).encode("utf-8")).decode("ascii")


def connect_request(authority, token):
    """The request head for ``authority``; a :func:`basic_token` (or None) is pre-sent, so no 407 round trip."""
    lines = ["CONNECT %s HTTP/1.1" % authority, "Host: %s" % authority]
    if token is not None:
        lines.append("Proxy-Authorization: Basic %s" % token)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


_STATUS = re.compile(rb"HTTP/1\.[0-9] ([0-9]{3})(?: (.*))?\Z", re.DOTALL)


class HTTPConnectReply:
    """Incremental parser of the head of a CONNECT reply (LF or CRLF line ends, bounded).

    A non-2xx status decides the outcome at once: its headers and body are never read.
    """

    def __init__(self, ctx, credentials_sent):
        self._ctx = ctx
        self._credentials_sent = credentials_sent
        self._buf = bytearray()
        self._size = 0  # bytes of complete head lines consumed so far
        self._status = None
        self._headers = 0

    def feed(self, data):
        """Consume bytes; return ``(b"", leftover)`` once the head is complete, ``(b"", None)`` before.

        :raises UpstreamError: a refusal or a malformed reply.
        """
        self._buf += data
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            self._size += nl + 1
            if self._size > MAX_HEAD:
                raise self._malformed("reply head exceeds %d bytes" % MAX_HEAD)
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if self._status is None:
                if nl + 1 > MAX_STATUS_LINE:
                    raise self._malformed("status line exceeds %d bytes" % MAX_STATUS_LINE)
                self._status_line(line)
            elif not line:
                return b"", bytes(self._buf)
            else:
                self._header_line(line)
        room = MAX_STATUS_LINE if self._status is None else MAX_HEAD - self._size
        if len(self._buf) >= room:
            what = "status line exceeds %d bytes" % MAX_STATUS_LINE if self._status is None else None
            raise self._malformed(what or "reply head exceeds %d bytes" % MAX_HEAD)
        return b"", None

    def _status_line(self, line):
        match = _STATUS.match(line)
        if match is None:
            raise self._malformed("status line %s" % self._ctx.quote(line))
        status = int(match.group(1))
        if 200 <= status < 300:
            self._status = status
            return
        reason = self._ctx.text(match.group(2) or b"")
        text = "answered %d %s to %s" % (status, reason, self._ctx.target)
        if status == 407:
            sent = "credentials were sent" if self._credentials_sent else "no credentials configured"
            raise self._ctx.error(AuthRefused, "%s (%s)" % (text, sent))
        if 400 <= status < 500:
            raise self._ctx.error(Forbidden, text)
        if 500 <= status < 600:
            raise self._ctx.error(Unreachable, text)
        raise self._ctx.error(MalformedReply, "unexpectedly " + text)

    def _header_line(self, line):
        self._headers += 1
        if self._headers > MAX_HEADERS:
            raise self._malformed("more than %d header lines" % MAX_HEADERS)
        if line[:1] in (b" ", b"\t"):  # obsolete line folding: part of the previous header
            return
        name, colon, _ = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise self._malformed("header line %s" % self._ctx.quote(line))

    def _malformed(self, why):
        return self._ctx.error(MalformedReply, "sent a malformed reply to %s: %s" % (self._ctx.target, why))
