# -*- test-case-name: tests.unit.test_profile -*-
"""Client profiles (``.ovpn``) for pocketproxy users: ``pocketproxyctl client-config USER``.

A profile is :data:`TEMPLATE` (the same text as ``conf/openvpn/client.ovpn.in``)
with three placeholders filled in:

- ``@USER@``: the user's name (a comment);
- ``@REMOTE@``: one ``remote HOST PORT`` line per ``--remote``;
- ``@INLINE@``: ``<ca>``, and where given ``<cert>``, ``<key>``, ``<tls-crypt>``
  blocks holding the files' PEM text, so the profile is one self-contained file.

The template's ``auth-user-pass`` line is kept for users with a password
(the client prompts for it, or reads it from a file the user adds) and dropped
for certificate-only users. It pairs with ``conf/openvpn/server.conf``.
"""

import ipaddress
import re

__all__ = ["TEMPLATE", "ProfileError", "parse_remote", "pem_block", "render", "certificate_cn"]

DEFAULT_PORT = 1194

#: The client profile template; ``conf/openvpn/client.ovpn.in`` holds the same text.
TEMPLATE = """\
# OpenVPN client profile for pocketproxy user @USER@
# (made by "pocketproxyctl client-config"; pairs with pocketproxy's example server
# config, /usr/share/doc/pocketproxy/examples/openvpn/server.conf)
client
dev tun
proto udp
@REMOTE@
resolv-retry infinite
nobind
persist-key
persist-tun
remote-cert-tls server
# pocketproxy refuses temporarily ("TEMP[backoff N]") while the user's phone is
# unreachable or admissions are paused: retry with the same credentials instead of
# exiting or prompting again.
auth-retry nointeract
# The pocketproxy user's name and password (prompted for; or "auth-user-pass FILE"
# with the name on the first line and the password on the second).
# Certificate-only users have no such line.
auth-user-pass
# Tell the server at once when leaving, so the address and proxy mapping are freed.
explicit-exit-notify 1
# Throughput (measured by pocketproxy's "make bench-path"): 4 MiB UDP socket buffers, so
# bursts are not dropped (on Linux capped by net.core.rmem_max/wmem_max), and no poll()
# before each write (OpenVPN ignores it on Windows). Routes, IPv6 and DNS come from the server.
sndbuf 4194304
rcvbuf 4194304
fast-io
verb 3
@INLINE@
"""

_PLACEHOLDER = re.compile(r"@[A-Z_]+@")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")
_PEM_BEGIN = re.compile(r"^-----BEGIN [A-Za-z0-9 ]+-----\r?$", re.M)


class ProfileError(Exception):
    """Bad input for a profile; the message says what and which argument."""


def parse_remote(text, default_port=DEFAULT_PORT):
    """``HOST``, ``HOST:PORT``, ``[IPv6]`` or ``[IPv6]:PORT`` → ``(host, port)``.

    :raises ProfileError: for an empty or malformed host or a port outside 1-65535.
    """
    text = text.strip()
    port = default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ProfileError("--remote %r: missing ']' after the IPv6 address" % text)
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ProfileError("--remote %r: expected [IPv6]:PORT" % text)
            port = _port(rest[1:], text)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ProfileError("--remote %r: %r is not an IPv6 address" % (text, host))
        return host, port
    if text.count(":") > 1:  # a bare IPv6 address, no port
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise ProfileError("--remote %r: write IPv6 addresses as [ADDRESS]:PORT" % text)
        return text, port
    host, sep, rest = text.partition(":")
    if sep:
        port = _port(rest, text)
    if not _HOSTNAME.match(host):
        raise ProfileError("--remote %r: %r is not a host name or IPv4 address" % (text, host))
    return host, port


def _port(text, whole):
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ProfileError("--remote %r: port must be 1-65535, got %r" % (whole, text))
    return int(text)


def pem_block(tag, text, what):
    """``<tag>`` … ``</tag>`` holding ``text``, which must contain a PEM block.

    :param what: names the source in errors (e.g. ``--ca /etc/openvpn/server/ca.crt``).
    :raises ProfileError: when there is no ``-----BEGIN …-----`` line or the text
        would end the inline block early.
    """
    if not _PEM_BEGIN.search(text):
        raise ProfileError("%s: no PEM block (-----BEGIN ...-----) found" % what)
    if "</%s>" % tag in text or "<%s>" % tag in text:
        raise ProfileError("%s: contains an inline <%s> tag" % (what, tag))
    # Keep only the PEM part(s): drop e.g. easy-rsa's human-readable certificate dump.
    body = _pem_only(text)
    return "<%s>\n%s\n</%s>" % (tag, body, tag)


def _pem_only(text):
    lines, inside = [], False
    for line in text.splitlines():
        line = line.rstrip("\r")
        if line.startswith("-----BEGIN "):
            inside = True
        if inside:
            lines.append(line)
        if line.startswith("-----END "):
            inside = False
    return "\n".join(lines)


def certificate_cn(pem_text):
    """The subject CN of the first certificate in ``pem_text``, or None if it has none.

    :raises ProfileError: when the text is not a PEM certificate.
    """
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(pem_text.encode("ascii", "replace"))
    except ValueError as e:
        raise ProfileError("not a PEM certificate (%s)" % e)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return names[0].value if names else None


def render(user, remotes, ca, cert=None, key=None, tls_crypt=None, password=True, template=TEMPLATE):
    """The profile text for ``user``.

    :param remotes: ``[(host, port)]``, at least one (see :func:`parse_remote`).
    :param ca: the CA certificate text (inlined as ``<ca>``); ``cert``/``key``:
        the client certificate and key text, both or neither; ``tls_crypt``: the
        server's ``tls-crypt`` key text, if it uses one.
    :param password: keep the ``auth-user-pass`` line (False for certificate-only users).
    :raises ProfileError: on missing or inconsistent input, or unknown placeholders.
    """
    if not remotes:
        raise ProfileError("give at least one --remote HOST[:PORT]")
    if (cert is None) != (key is None):
        raise ProfileError("--cert and --key go together")
    remote_lines = []
    for host, port in remotes:
        remote_lines.append("remote %s %d" % (host, port))
    blocks = [pem_block("ca", ca, "--ca")]
    if cert is not None:
        blocks.append(pem_block("cert", cert, "--cert"))
        blocks.append(pem_block("key", key, "--key"))
    if tls_crypt is not None:
        blocks.append(pem_block("tls-crypt", tls_crypt, "--tls-crypt"))
    values = {"@USER@": user, "@REMOTE@": "\n".join(remote_lines), "@INLINE@": "\n".join(blocks)}
    unknown = sorted(set(_PLACEHOLDER.findall(template)) - set(values))
    if unknown:
        raise ProfileError("template has unknown placeholder(s): %s" % ", ".join(unknown))
    for name in ("@REMOTE@", "@INLINE@"):
        if name not in template:
            raise ProfileError("template lacks the %s placeholder" % name)
    out = []
    for line in template.splitlines():
        if not password and line.strip() == "auth-user-pass":
            continue
        out.append(_PLACEHOLDER.sub(lambda m: values[m.group(0)], line))
    return "\n".join(out).rstrip("\n") + "\n"
