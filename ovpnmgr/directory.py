# -*- test-case-name: tests.unit.test_directory -*-
"""Users and devices: who may connect, how they prove it, and which phone carries them.

The users file (YAML) defines devices (name → upstream proxy URL) and users
(name → scrypt password hash and/or certificate CN, device, optional static
address). Passwords are checked with the standard library's ``hashlib.scrypt``
off the reactor thread (it costs tens of milliseconds by design); a verified
password is remembered as a keyed HMAC so reconnects and re-authentications
do not pay for scrypt again.
"""

import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
import re
from dataclasses import dataclass, field

from twisted.internet import defer

from ovpnmgr.config import ConfigError, load_yaml, read_text
from ovpnmgr.tunnel import MODES as TUNNEL_MODES
from proxy.probe import ProbeTarget
from proxy.upstream import Upstream

SCRYPT_N, SCRYPT_R, SCRYPT_P = 16384, 8, 1
# \Z, not $: "$" also matches before a trailing newline ("alice\n" was a valid user name).
_HASH = re.compile(r"^scrypt\$([0-9]+)\$([0-9]+)\$([0-9]+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)\Z")
_USER_NAME = re.compile(r"^[A-Za-z0-9_.@+-]{1,64}\Z")
#: scrypt's memory limit for hashing and verifying; hashes needing more are refused at load.
SCRYPT_MAXMEM = 64 * 1024 * 1024


class AuthFailed(Exception):
    """The credentials do not identify a permitted user (a plain, final deny)."""


@dataclass(frozen=True)
class RotateAction:
    """How an operator changes a phone's exit address: run ``command`` (argv, no shell) or send
    an HTTP ``method`` request to ``url`` (the phone app's or the modem's API)."""

    command: tuple | None = None
    url: str | None = None
    method: str = "POST"

    def __str__(self):
        return " ".join(self.command) if self.command else "%s %s" % (self.method, self.url)


@dataclass(frozen=True)
class Device:
    """A customer's phone and the proxy it exposes."""

    name: str
    upstream: Upstream
    dns: str | None = None  # "via_device" or "host"; None: the daemon's dns.policy
    max_clients: int | None = None  # the phone proxy's own client limit; its users share it fairly
    health_target: ProbeTarget | None = None  # where this phone's health probes go; None: health.target
    rotate: RotateAction | None = None  # what "pp rotate" runs to change its exit address


@dataclass(frozen=True)
class User:
    """A customer account."""

    name: str
    device: Device
    password_hash: str | None = field(default=None, repr=False)
    common_name: str | None = None
    address: ipaddress.IPv4Address | None = None
    tunnel: str | None = None  # "full" or "split"; None: the daemon's openvpn.tunnel
    private_networks: str = "deny"  # "allow": this user may reach private ranges through the phone


def hash_password(password, salt=None, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P):
    """Hash ``password`` for the users file: ``scrypt$N$r$p$salt$hash`` (base64 parts)."""
    if not isinstance(password, str) or not password:
        raise ValueError("password must be a non-empty string")
    salt = os.urandom(16) if salt is None else salt
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=SCRYPT_MAXMEM, dklen=32)
    return "scrypt$%d$%d$%d$%s$%s" % (n, r, p, base64.b64encode(salt).decode(), base64.b64encode(digest).decode())


def verify_password(password, encoded):
    """True if ``password`` matches the ``scrypt$…`` hash ``encoded`` (constant-time compare)."""
    match = _HASH.match(encoded)
    if match is None:
        return False
    n, r, p = (int(x) for x in match.group(1, 2, 3))
    salt = base64.b64decode(match.group(4))
    expected = base64.b64decode(match.group(5))
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=SCRYPT_MAXMEM, dklen=len(expected)
    )
    return hmac.compare_digest(digest, expected)


def _check_hash(value):
    match = _HASH.match(value)
    if match is None:
        raise ValueError("not a scrypt hash; create one with 'pocketproxyctl hash-password'")
    n, r, p = (int(x) for x in match.group(1, 2, 3))
    if n < 2 or n & (n - 1) or n > 1 << 20 or not 1 <= r <= 64 or not 1 <= p <= 16:
        raise ValueError("scrypt parameters out of range (N a power of two up to 2^20, r 1-64, p 1-16)")
    # OpenSSL's scrypt needs 128*r*(N+2) + 128*r*p bytes; above SCRYPT_MAXMEM every login would
    # fail with ValueError instead of being checked (e.g. N=2^16 with r=8).
    if 128 * r * (n + 2 + p) > SCRYPT_MAXMEM:
        raise ValueError("scrypt parameters need more than %d MiB (lower N or r)" % (SCRYPT_MAXMEM >> 20))
    try:
        salt = base64.b64decode(match.group(4), validate=True)
        digest = base64.b64decode(match.group(5), validate=True)
    except binascii.Error:
        raise ValueError("the salt or hash part is not valid base64") from None
    if not salt or not digest:
        raise ValueError("the salt or hash part is empty")
    return value


class Directory:
    """An immutable snapshot of the users file."""

    def __init__(self, devices, users, path="<memory>"):
        self.path = str(path)
        self.devices = dict(devices)
        self.users = dict(users)
        self._by_cn = {u.common_name: u for u in self.users.values() if u.common_name}
        self._verified = {}
        self._secret = os.urandom(32)

    # --- loading ---

    @classmethod
    def load(cls, path, subnet=None, server_address=None):
        """Read and validate the users file; raise :class:`ConfigError` naming file, key and problem."""
        return cls.parse(read_text(path, "users file"), path, subnet, server_address)

    @classmethod
    def parse(cls, text, path="<memory>", subnet=None, server_address=None):
        """Validate users-file YAML ``text``; see :meth:`load`."""
        return cls.from_mapping(load_yaml(text, path), path, subnet, server_address)

    @classmethod
    def from_mapping(cls, raw, path="<memory>", subnet=None, server_address=None):
        """Validate ``{"devices": {...}, "users": {...}}`` as the users file holds it (also what
        :mod:`ovpnmgr.pgdirectory` builds from the database's rows); errors name ``path``."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(path, None, "expected a mapping with 'devices' and 'users'")
        for key in raw:
            if key not in ("devices", "users"):
                raise ConfigError(path, key, "unknown section (known: devices, users)")
        devices = {}
        for name, spec in _mapping(path, "devices", raw.get("devices")).items():
            key = "devices.%s" % name
            spec = _fields(path, key, spec, {"upstream", "dns", "max_clients", "health_target", "rotate"}, {"upstream"})
            try:
                upstream = Upstream.parse(spec["upstream"])
            except ValueError as e:
                raise ConfigError(path, key + ".upstream", str(e))
            dns = spec.get("dns")
            if dns not in (None, "via_device", "host"):
                raise ConfigError(path, key + ".dns", "expected via_device or host, got %r" % (dns,))
            max_clients = spec.get("max_clients")
            if max_clients is not None and (
                isinstance(max_clients, bool) or not isinstance(max_clients, int) or not 1 <= max_clients <= 1_000_000
            ):
                raise ConfigError(
                    path, key + ".max_clients", "expected the phone proxy's client limit (1-1000000), got %r" % (max_clients,)
                )
            health_target = spec.get("health_target")
            if health_target is not None:
                try:
                    health_target = ProbeTarget.parse(health_target)
                except ValueError as e:
                    raise ConfigError(path, key + ".health_target", str(e))
            rotate = _rotate_action(path, key + ".rotate", spec.get("rotate"))
            devices[name] = Device(str(name), upstream, dns, max_clients, health_target, rotate)
        users, cns, addresses = {}, {}, {}
        for name, spec in _mapping(path, "users", raw.get("users")).items():
            key = "users.%s" % name
            if not isinstance(name, str) or not _USER_NAME.match(name):
                raise ConfigError(path, key, "user names are 1-64 characters of letters, digits and _.@+-")
            spec = _fields(
                path, key, spec, {"password", "common_name", "device", "address", "tunnel", "private_networks"}, {"device"}
            )
            device = spec.get("device")
            try:
                known = device in devices
            except TypeError:  # a list or a mapping is unhashable
                known = False
            if not known:
                raise ConfigError(path, key + ".device", "no such device %r" % (spec.get("device"),))
            password_hash = spec.get("password")
            if password_hash is not None:
                try:
                    _check_hash(str(password_hash))
                except ValueError as e:
                    raise ConfigError(path, key + ".password", str(e))
            cn = spec.get("common_name")
            if cn is not None:
                if not isinstance(cn, str) or not cn:
                    raise ConfigError(path, key + ".common_name", "expected a non-empty string")
                if cn in cns:
                    raise ConfigError(path, key + ".common_name", "already used by user %s" % cns[cn])
                cns[cn] = name
            if password_hash is None and cn is None:
                raise ConfigError(path, key, "needs a password hash, a common_name, or both")
            address = spec.get("address")
            if address is not None:
                try:
                    address = ipaddress.IPv4Address(str(address))
                except ValueError as e:
                    raise ConfigError(path, key + ".address", str(e))
                if subnet is not None and (
                    address not in subnet
                    or address in (subnet.network_address, subnet.broadcast_address, server_address)
                ):
                    raise ConfigError(path, key + ".address", "%s is not a usable client address in %s" % (address, subnet))
                if address in addresses:
                    raise ConfigError(path, key + ".address", "already assigned to user %s" % addresses[address])
                addresses[address] = name
            tunnel = spec.get("tunnel")
            if tunnel not in (None,) + TUNNEL_MODES:
                raise ConfigError(path, key + ".tunnel", "expected %s, got %r" % (" or ".join(TUNNEL_MODES), tunnel))
            private = spec.get("private_networks", "deny")
            if private not in ("allow", "deny"):
                raise ConfigError(path, key + ".private_networks", "expected allow or deny, got %r" % (private,))
            users[name] = User(name, devices[spec["device"]], password_hash, cn, address, tunnel, private)
        return cls(devices, users, path)

    # --- queries ---

    def static_addresses(self):
        """Every address reserved for a particular user."""
        return {u.address for u in self.users.values() if u.address is not None}

    def find(self, username=None, common_name=None):
        """The user known by ``username`` (preferred) or certificate ``common_name``, or None."""
        if username and username != "UNDEF" and username in self.users:
            return self.users[username]
        if common_name:
            return self._by_cn.get(common_name)
        return None

    def authenticate(self, username, password, common_name, run_blocking=None):
        """Identify a connecting client; fires with a :class:`User` or fails with :class:`AuthFailed`.

        With a password: the user named ``username`` must have a matching hash
        (and, if it names a certificate CN, the client's CN must match). Without
        one: the certificate CN must belong to a user that has no password.

        :param run_blocking: ``f(callable, *args) -> Deferred`` to run scrypt off
            the reactor thread; None runs it inline (tests).
        """
        try:
            user = self._identify(username, password, common_name)
        except AuthFailed as e:
            return defer.fail(e)
        if user.password_hash is None:
            return defer.succeed(user)
        token = hmac.new(self._secret, password.encode("utf-8"), hashlib.sha256).digest()
        if hmac.compare_digest(self._verified.get(user.name, b""), token):
            return defer.succeed(user)
        if run_blocking is None:
            d = defer.maybeDeferred(verify_password, password, user.password_hash)
        else:
            d = run_blocking(verify_password, password, user.password_hash)

        def checked(ok):
            if not ok:
                raise AuthFailed("wrong password for user %s" % user.name)
            self._verified[user.name] = token
            return user

        return d.addCallback(checked)

    def _identify(self, username, password, common_name):
        if password:
            user = self.users.get(username)
            if user is None:
                raise AuthFailed("unknown user %r" % (username,))
            if user.password_hash is None:
                raise AuthFailed("user %s has no password (certificate only)" % user.name)
            if user.common_name is not None and user.common_name != common_name:
                raise AuthFailed("user %s: certificate CN %r does not match" % (user.name, common_name))
            return user
        user = self._by_cn.get(common_name) if common_name else None
        if user is None:
            raise AuthFailed("no password and no user for certificate CN %r" % (common_name,))
        if user.password_hash is not None:
            raise AuthFailed("user %s requires a password" % user.name)
        return user


def _rotate_action(path, key, spec):
    """A device's ``rotate:`` entry: ``{command: [argv...]}`` or ``{url: http(s)://..., method: POST}``."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or len(set(spec) & {"command", "url"}) != 1:
        raise ConfigError(path, key, "expected {command: [program, args...]} or {url: http(s)://..., method: POST}")
    unknown = set(spec) - {"command", "url", "method"}
    if unknown:
        raise ConfigError(path, "%s.%s" % (key, sorted(unknown)[0]), "unknown key (known: command, method, url)")
    if "command" in spec:
        argv = spec["command"]
        if not isinstance(argv, list) or not argv or not all(isinstance(a, (str, int)) for a in argv):
            raise ConfigError(path, key + ".command", "expected a non-empty list: [program, args...] (no shell)")
        if "method" in spec:
            raise ConfigError(path, key + ".method", "only used with url")
        return RotateAction(command=tuple(str(a) for a in argv))
    url = spec["url"]
    if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url):
        raise ConfigError(path, key + ".url", "expected an http:// or https:// URL, got %r" % (url,))
    method = spec.get("method", "POST")
    if method not in ("GET", "POST", "PUT"):
        raise ConfigError(path, key + ".method", "expected GET, POST or PUT, got %r" % (method,))
    return RotateAction(url=url, method=method)


def _mapping(path, key, value):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(path, key, "expected a mapping of names, got %s" % type(value).__name__)
    return value


def _fields(path, key, spec, known, required):
    if not isinstance(spec, dict):
        raise ConfigError(path, key, "expected a mapping, got %s" % type(spec).__name__)
    for k in spec:
        if k not in known:
            raise ConfigError(path, "%s.%s" % (key, k), "unknown key (known: %s)" % ", ".join(sorted(known)))
    for k in required:
        if spec.get(k) is None:
            raise ConfigError(path, "%s.%s" % (key, k), "required key is missing")
    return spec
