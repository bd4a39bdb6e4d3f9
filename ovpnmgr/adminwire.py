# -*- test-case-name: tests.unit.test_admin,tests.unit.test_ctl -*-
"""What the admin socket and ``pocketproxyctl`` must agree on, written once and free of
Twisted (the CLI imports it without a reactor): the password prompt, the byte columns of
``pp clients``, and how a nested ``pp stats`` snapshot becomes dotted ``key=value`` lines.
"""

#: OpenVPN's prompt (no line end) when the socket has a password.
PASSWORD_PROMPT = b"ENTER PASSWORD:"

#: The byte counters of a ``pp clients`` row (the CLI shows them human-readable).
CLIENT_BYTES = ("tunnel_bytes_in", "tunnel_bytes_out", "proxied_bytes_up", "proxied_bytes_down")


def flatten(value, prefix=""):
    """``[(dotted.key, leaf), ...]`` of a nested dict, keys sorted at every level."""
    if not isinstance(value, dict):
        return [(prefix, value)]
    out = []
    for key in sorted(value):
        out.extend(flatten(value[key], "%s.%s" % (prefix, key) if prefix else str(key)))
    return out
