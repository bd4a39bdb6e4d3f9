# -*- test-case-name: tests.unit.test_upstream -*-
"""SOCKS5 CONNECT (RFC 1928) to a device proxy, with username/password (RFC 1929) when configured.

Kept out of :mod:`proxy.upstream` so the SOCKS5 messages and the mapping of reply codes to typed
errors read on their own. The connection, its timer and the choice of protocol stay with
:class:`proxy.upstream.HandshakeClient`, whose context (``ctx``: names the device proxy, scrubs
secrets from what the proxy echoes) builds every error raised here.
"""

import ipaddress

from proxy.upstreamerrors import AuthRefused, Forbidden, MalformedReply, Unreachable

__all__ = ["greeting", "auth_request", "connect_request", "Socks5Reply"]

_SOCKS_REPLIES = {
    1: (Unreachable, "general SOCKS server failure"),
    2: (Forbidden, "connection not allowed by ruleset"),
    3: (Unreachable, "network unreachable"),
    4: (Unreachable, "host unreachable"),
    5: (Unreachable, "connection refused"),
    6: (Unreachable, "TTL expired"),
    7: (MalformedReply, "command not supported"),
    8: (MalformedReply, "address type not supported"),
}
_NO_AUTH, _USER_PASS, _NO_ACCEPTABLE = 0x00, 0x02, 0xFF


def greeting(auth):
    """The method selection: only username/password with an :func:`auth_request`, else only no authentication."""
    return b"\x05\x01" + bytes([_USER_PASS if auth is not None else _NO_AUTH])


def auth_request(upstream):
    """The RFC 1929 username/password request; ValueError when a field does not fit its length byte."""
    user = (upstream.username or "").encode("utf-8")
    password = (upstream.password or "").encode("utf-8")
    if len(user) > 255 or len(password) > 255:
        raise ValueError("SOCKS5 username and password are limited to 255 bytes each")
    return b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password


def connect_request(ip, name, port):
    """The RFC 1928 CONNECT request: ATYP 3 for names, 1 for IPv4, 4 for IPv6."""
    if ip is None:
        address = b"\x03" + bytes([len(name)]) + name
    else:
        address = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
    return b"\x05\x01\x00" + address + port.to_bytes(2, "big")


class Socks5Reply:
    """Incremental parser of the server's side of RFC 1928/1929: method choice, auth status, reply.

    Returns the next client message as soon as the previous server message is complete, and
    copes with every message arriving split at any byte.
    """

    def __init__(self, ctx, auth, request):
        self._ctx = ctx
        self._auth = auth  # RFC 1929 request bytes, or None when no credentials are configured
        self._request = request
        self._buf = bytearray()
        self._step = self._method
        self.bound = None  # (host, port) from BND.ADDR/BND.PORT after success

    def feed(self, data):
        """Consume bytes; return ``(bytes to send, leftover or None)``.

        :raises UpstreamError: a refusal or a malformed reply.
        """
        self._buf += data
        out = []
        while True:
            step = self._step
            result = step(out)
            if result is not None:
                return b"".join(out), result
            if self._step is step:
                return b"".join(out), None

    def _method(self, out):
        if not self._version(5, "method selection"):
            return None
        if len(self._buf) < 2:
            return None
        method = self._buf[1]
        del self._buf[:2]
        offered = _USER_PASS if self._auth is not None else _NO_AUTH
        if method == _NO_ACCEPTABLE:
            what = "username/password" if self._auth is not None else "no authentication"
            raise self._ctx.error(AuthRefused, "accepts none of the offered SOCKS5 methods (offered %s)" % what)
        if method != offered:
            raise self._ctx.error(MalformedReply, "chose SOCKS5 method 0x%02x, which was not offered" % method)
        if self._auth is not None:
            out.append(self._auth)
            self._step = self._auth_status
        else:
            out.append(self._request)
            self._step = self._reply
        return None

    def _auth_status(self, out):
        if not self._version(1, "username/password reply"):
            return None
        if len(self._buf) < 2:
            return None
        status = self._buf[1]
        del self._buf[:2]
        if status != 0:
            raise self._ctx.error(AuthRefused, "rejected the SOCKS5 username/password (RFC 1929 status %d)" % status)
        out.append(self._request)
        self._step = self._reply
        return None

    def _reply(self, out):
        if not self._version(5, "reply") or len(self._buf) < 2:
            return None
        rep = self._buf[1]
        if rep != 0:
            cls, text = _SOCKS_REPLIES.get(rep, (MalformedReply, "unknown reply code"))
            raise self._ctx.error(cls, "refused %s: %s (SOCKS5 reply %d)" % (self._ctx.target, text, rep))
        if len(self._buf) < 5:
            return None
        atyp = self._buf[3]
        if atyp == 1:
            size = 4
        elif atyp == 4:
            size = 16
        elif atyp == 3:
            size = 1 + self._buf[4]
        else:
            raise self._ctx.error(MalformedReply, "sent SOCKS5 reply with unknown address type %d" % atyp)
        end = 4 + size + 2
        if len(self._buf) < end:
            return None
        raw = bytes(self._buf[4 : 4 + size])
        if atyp == 3:
            host = raw[1:].decode("ascii", "replace")
        else:
            host = str(ipaddress.ip_address(raw))
        self.bound = (host, int.from_bytes(self._buf[end - 2 : end], "big"))
        leftover = bytes(self._buf[end:])
        del self._buf[:]
        return leftover

    def _version(self, expected, what):
        """False until the version byte is in; raise at once when it is wrong."""
        if not self._buf:
            return False
        if self._buf[0] != expected:
            raise self._ctx.error(
                MalformedReply, "sent SOCKS5 %s with version %d (expected %d)" % (what, self._buf[0], expected)
            )
        return True
