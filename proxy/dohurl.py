# -*- test-case-name: tests.unit.test_dns_doh -*-
"""The address of a DNS-over-HTTPS resolver (RFC 8484), checked once at configuration time.

Kept free of Twisted so the configuration loader can validate ``dns.resolver`` cheaply. The
host is what the device proxy is asked to CONNECT to *and* the name the TLS certificate must
carry, so the device resolves it from its own network and nothing leaks from the server.
"""

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["DoHURL", "parse_doh_url", "is_doh"]

_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})*\.?")


@dataclass(frozen=True)
class DoHURL:
    """``https://host[:port]/path[?query]``; ``host`` is bare (no IPv6 brackets)."""

    url: str
    host: str
    port: int

    def query_url(self, encoded):
        """The RFC 8484 GET URL (bytes) carrying ``encoded`` (base64url without padding)."""
        sep = "&" if "?" in self.url else "?"
        return ("%s%sdns=%s" % (self.url, sep, encoded)).encode("ascii")

    def __str__(self):
        return self.url


def is_doh(text):
    """True when a resolver setting names a DoH URL rather than ``HOST[:PORT]``."""
    return isinstance(text, str) and text.lower().startswith("https://")


def parse_doh_url(text):
    """A :class:`DoHURL` for ``text``.

    :raises ValueError: saying what is wrong (scheme, host, port, credentials, fragment).
    """
    if not isinstance(text, str) or not text.isascii() or any(c.isspace() for c in text):
        raise ValueError("expected an https:// URL of ASCII characters without spaces, got %r" % (text,))
    parts = urlsplit(text)
    if parts.scheme.lower() != "https":
        raise ValueError("a DNS-over-HTTPS resolver must be an https:// URL, got %r" % text)
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the resolver URL are not supported: %r" % _without_userinfo(parts))
    if parts.fragment or text.endswith("#"):
        raise ValueError("the resolver URL must not have a #fragment, got %r" % text)
    try:
        port = 443 if parts.port is None else parts.port
    except ValueError:
        raise ValueError("the resolver URL has a bad port: %r" % text) from None
    if not 1 <= port <= 65535:
        raise ValueError("the resolver URL's port must be between 1 and 65535, got %r" % text)
    host = parts.hostname or ""
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if "[" in parts.netloc or not _NAME.fullmatch(host):
            raise ValueError("the resolver URL needs a DNS name or IP address as host, got %r" % text) from None
        host = host.rstrip(".")
    if not parts.path.startswith("/") or parts.path == "/" and not parts.query:
        raise ValueError("the resolver URL needs a path such as /dns-query, got %r" % text)
    return DoHURL(url=text, host=host, port=port)


def _without_userinfo(parts):
    return "%s://%s%s" % (parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path)
