# -*- test-case-name: tests.unit.test_mappings -*-
"""Where a client's traffic exits: a device's HTTP CONNECT or SOCKS5 proxy.

Only the value type lives here for now; the handshakes join it when the data
path is built. Credentials never appear in ``repr``/``str`` so an ``Upstream``
can be logged safely.
"""

import ipaddress
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

SCHEMES = {"http": 8080, "socks5": 1080}


@dataclass(frozen=True)
class Upstream:
    """A device proxy endpoint; ``username``/``password`` are hidden from repr."""

    scheme: str
    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url):
        """Parse ``http://[user:pass@]host:port`` or ``socks5://…``; raise ValueError naming the problem."""
        if not isinstance(url, str) or not url:
            raise ValueError("expected a proxy URL such as http://user:pass@192.0.2.10:8080")
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise ValueError("unsupported proxy scheme %r (use http or socks5)" % parts.scheme)
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("a proxy URL has no path, query or fragment")
        try:
            port = parts.port
        except ValueError:
            raise ValueError("invalid port in proxy URL")
        host = parts.hostname
        if not host:
            raise ValueError("proxy URL has no host")
        if any(c in host for c in " \r\n\t"):
            raise ValueError("proxy host contains whitespace")
        if host.startswith("[") or ":" in host:
            ipaddress.IPv6Address(host.strip("[]"))
        username = unquote(parts.username) if parts.username is not None else None
        password = unquote(parts.password) if parts.password is not None else None
        return cls(scheme, host, port or SCHEMES[scheme], username, password)

    def __str__(self):
        auth = "%s:***@" % self.username if self.username is not None else ""
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s://%s%s:%d" % (self.scheme, auth, host, self.port)
