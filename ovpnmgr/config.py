# -*- test-case-name: tests.unit.test_config -*-
"""YAML configuration → validated, typed, frozen config objects.

Every problem is reported as one :class:`ConfigError` naming the file, the
dotted key and what is wrong, so the daemon can refuse to start with a message
an operator can act on. Unknown keys are errors (typos must not be ignored).
"""

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ovpnmgr.tunnel import MODES as TUNNEL_MODES
from ovpnmgr.tunnel import RESERVED_OPTIONS
from proxy.dohurl import is_doh, parse_doh_url
from proxy.health import HealthSettings
from proxy.probe import ProbeTarget
from proxy.settings import DNSSettings, ProxySettings

_DNS = DNSSettings(listen_host="")  # the DNS service's defaults, written once in proxy.settings
_HEALTH = HealthSettings()  # the probes' defaults, written once in proxy.health
# A public what-is-my-address service, over plain HTTP: its answer (the phone's exit address) is
# not secret, and a fresh probe tunnel costs the phone no TLS handshake (two cellular round
# trips). One request per phone per health.interval; a large fleet points target at its own.
DEFAULT_HEALTH_TARGET = ProbeTarget.parse("http://api.ipify.org/")

DEFAULT_CONFIG_PATH = "/etc/pocketproxy/pocketproxy.yaml"


class ConfigError(Exception):
    """A configuration problem, worded as ``file: key: problem``."""

    def __init__(self, path, key, problem):
        self.path = str(path)
        self.key = key
        self.problem = problem
        super().__init__("%s: %s: %s" % (self.path, key or "(top level)", problem))


@dataclass(frozen=True)
class OpenVPNConfig:
    """How to reach OpenVPN's management interface and which tunnel network it serves."""

    management: str
    subnet: ipaddress.IPv4Network
    server_address: ipaddress.IPv4Address
    password_file: Path | None = None
    command_timeout: float = 5.0
    reconnect_initial: float = 1.0
    reconnect_max: float = 30.0
    temp_backoff: int = 10
    push: tuple = ()
    bytecount_interval: int = 5  # seconds between >BYTECOUNT_CLI notifications; 0 = off
    tunnel: str = "full"  # full: every client's traffic goes into the tunnel (ovpnmgr.tunnel); split: opt-in

    @property
    def netmask(self):
        return str(self.subnet.netmask)


@dataclass(frozen=True)
class ProxyConfig(ProxySettings):
    """The transparent proxy: where it listens, plus its data-path policy.

    The policy fields and their WAN-safe defaults (tens of seconds to reach and
    handshake with a device, an hour of idleness with TCP keepalive finding dead
    peers sooner, a minute for a half-closed connection) come from
    :class:`proxy.settings.ProxySettings`.
    """

    listen: int = 12345
    bind: tuple = ("0.0.0.0", "::")
    mode: str = "redirect"
    # Destinations beyond the public internet (proxy.destinations): private ranges refused
    # unless a user has private_networks: allow; extra ranges and domains always refused.
    deny_private: bool = True
    deny_networks: tuple = ()
    deny_names: tuple = ()


@dataclass(frozen=True)
class AdminConfig:
    """The operators' admin socket."""

    socket: str | None = None
    mode: int = 0o660
    group: int | None = None  # gid the socket file is given (resolved from a name at load)
    password_file: Path | None = None  # first line: the password every admin connection must give
    login_timeout: float = 30.0  # seconds to give the password before the connection is closed
    idle_timeout: float = 900.0  # seconds without a complete command line before it is closed; 0 = never


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint: a Twisted server endpoint string, or None when disabled."""

    listen: str | None = "tcp:9105:interface=127.0.0.1"
    status_page: bool = True  # GET /status and /status.json on the same listener
    status_password_file: Path | None = None  # if set: HTTP Basic auth for the status page, this password


@dataclass(frozen=True)
class DirectoryConfig:
    """Where users and devices are defined: the users file (one host, nothing to run), or a
    PostgreSQL database shared by several gateways (``backend: postgres``, issue 17)."""

    file: Path | None = None
    backend: str = "file"
    dsn: str | None = None  # postgres: a libpq connection string (no password in it: password_file)
    password_file: Path | None = None  # postgres: the database password, first line


@dataclass(frozen=True)
class FirewallConfig:
    """pocketproxy's own kernel objects: one chain name, one ipset, one tun interface match."""

    ipset: str = "pocketproxy-clients"
    chain: str = "POCKETPROXY"
    interface: str = "tun+"
    maxelem: int = 65536
    iptables: str = "iptables"
    iptables_restore: str = "iptables-restore"
    ip: str = "ip"
    command_timeout: float = 10.0
    tproxy_mark: int = 1
    tproxy_table: int = 100
    verify_interval: float = 60.0  # seconds between kernel drift checks; 0 = only "pp rules check"
    repair: bool = True  # periodic checks also fix drift (re-add missing members, remove extras)
    ip6tables: str = "ip6tables"  # IPv6 fail-closed chains (skipped, with a warning, on a host without IPv6)
    ip6tables_restore: str = "ip6tables-restore"
    device_networks: tuple = ()  # ip_network, v4 or v6: phones' networks beyond their upstream URLs (DHCP)
    device_allow: tuple = ()  # ("tcp"|"udp", low, high) or ("icmp", None, None): what phones may open


@dataclass(frozen=True)
class DNSConfig:
    """The customers' DNS service: answered on the VPN server address, resolved through each
    client's own device (so names resolve as the phone's network would, and no query leaves
    through the server's uplink)."""

    enabled: bool = True
    listen: ipaddress.IPv4Address | None = None  # None: openvpn.server_address
    port: int = 53
    push: bool = True  # push "dhcp-option DNS <listen>" in every client-auth
    resolver: object = _DNS.resolver  # (host, port): DNS over TCP; or a DoHURL: DNS over HTTPS
    ca_file: Path | None = None  # DoH: CAs to verify the resolver with (default: system store)
    doh_connections: int = _DNS.max_doh_connections  # DoH: keep-alive connections per device
    policy: str = "via_device"  # default for devices without their own "dns:" ("host": server's resolver)
    host_servers: tuple = _DNS.host_servers  # ((ip, port), ...) for policy "host"; () = /etc/resolv.conf
    query_timeout: float = _DNS.query_timeout  # a client's query gets SERVFAIL after this
    connect_timeout: float = _DNS.connect_timeout  # reaching the device (cellular WAN)
    handshake_timeout: float = _DNS.handshake_timeout  # the device's CONNECT/SOCKS5 reply
    idle_timeout: float = _DNS.idle_timeout  # an unused device connection is closed after this
    cache_entries: int = _DNS.cache_entries  # per device
    max_tcp_clients: int = _DNS.max_tcp_clients  # TCP connections in all (fd backstop)
    max_tcp_per_client: int = _DNS.max_tcp_per_client  # TCP connections per client address
    log_names: bool = _DNS.log_names  # query names in logs (privacy: off unless debugging)


@dataclass(frozen=True)
class HealthConfig:
    """Device health (issue 16): probes through each phone's proxy, and what a ``down`` device
    means for its customers. On by default: a phone is observed, not assumed up, and its exit
    address is known (``pp rotate`` verifies against it) without configuring anything."""

    enabled: bool = True
    # http(s)://... answering with the caller's address (the exit address), or tcp://host:port
    # (a tunnel that opens is the proof; no exit address).
    target: ProbeTarget = DEFAULT_HEALTH_TARGET
    ca_file: Path | None = None  # https targets (this one or a device's): CAs to verify with (default: system store)
    interval: float = _HEALTH.interval
    timeout: float = _HEALTH.timeout
    retry_interval: float = _HEALTH.retry_interval
    fall: int = _HEALTH.fall
    rise: int = _HEALTH.rise
    concurrency: int = _HEALTH.concurrency
    fresh_every: float = _HEALTH.fresh_every  # kept tunnels between probes; a new one this often
    when_down: str = "deny"  # a new CONNECT for a down device: "deny" (TEMP, "device offline") or "admit"
    on_down: str = "keep"  # its customers' VPN sessions when a device goes down: "keep" or "kill"
    rotation_timeout: float = 120.0  # "pp rotate": action + a new exit address + healthy, within this
    rotation_min_interval: float = 300.0  # between the starts of two rotations of one device

    def settings(self):
        """The monitor's :class:`~proxy.health.HealthSettings`."""
        return HealthSettings(
            interval=self.interval,
            timeout=self.timeout,
            retry_interval=self.retry_interval,
            fall=self.fall,
            rise=self.rise,
            concurrency=self.concurrency,
            fresh_every=self.fresh_every,
        )


@dataclass(frozen=True)
class LogConfig:
    """How log events are written: twistd's text lines, or one JSON object per line."""

    format: str = "text"
    file: Path | None = None  # JSON only: append here instead of stdout


@dataclass(frozen=True)
class Config:
    """The whole daemon configuration."""

    path: Path
    openvpn: OpenVPNConfig
    directory: DirectoryConfig
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    firewall: FirewallConfig = field(default_factory=FirewallConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    health: HealthConfig = field(default_factory=HealthConfig)

    @property
    def probe_target(self):
        """The default :class:`~proxy.probe.ProbeTarget` of device health probes."""
        return self.health.target

    @property
    def dns_address(self):
        """``(IPv4Address, port)`` the DNS service answers on, or None when it is off."""
        if not self.dns.enabled:
            return None
        return (self.dns.listen or self.openvpn.server_address, self.dns.port)


# --- field validators: each takes (value, ctx) and returns the typed value or raises _Bad ---


class _Bad(Exception):
    pass


def _str(value, ctx):
    if not isinstance(value, str) or not value:
        raise _Bad("expected a non-empty string, got %r" % (value,))
    return value


def _number(lo, hi):
    def check(value, ctx):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad("expected a number, got %r" % (value,))
        if not lo <= value <= hi:
            raise _Bad("must be between %s and %s, got %s" % (lo, hi, value))
        return float(value)

    return check


def _int(lo, hi):
    def check(value, ctx):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad("expected an integer, got %r" % (value,))
        if not lo <= value <= hi:
            raise _Bad("must be between %d and %d, got %d" % (lo, hi, value))
        return value

    return check


def _path(value, ctx):
    path = Path(_str(value, ctx))
    if not path.is_absolute():
        path = ctx["base"] / path
    return path


def _readable_file(value, ctx):
    path = _path(value, ctx)
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise _Bad("cannot read %s: %s" % (path, e.strerror or e))
    except ValueError as e:  # a NUL byte in the name
        raise _Bad("not a usable file name %r: %s" % (str(path), e))
    return path


def read_secret_file(path):
    """The first line of ``path`` without its line end, as bytes (management and admin passwords).

    :raises ValueError: worded ``cannot read PATH: why`` or ``PATH: first line is empty``.
    """
    try:
        with open(path, "rb") as f:
            secret = f.readline().rstrip(b"\r\n")
    except OSError as e:
        raise ValueError("cannot read %s: %s" % (path, e.strerror or e))
    if not secret:
        raise ValueError("%s: first line is empty" % path)
    return secret


def _password_file(value, ctx):
    """A readable file whose first line (without its line end) is a non-empty password."""
    path = _readable_file(value, ctx)
    try:
        read_secret_file(path)
    except ValueError as e:
        raise _Bad(str(e))
    return path


def _network(value, ctx):
    try:
        net = ipaddress.IPv4Network(_str(value, ctx), strict=True)
    except ValueError as e:
        raise _Bad("not an IPv4 network in CIDR form (%s)" % e)
    if net.num_addresses < 4:
        raise _Bad("network %s is too small for clients" % net)
    return net


def _cidr_list(value, ctx):
    if not isinstance(value, list):
        raise _Bad("expected a list of networks such as [\"203.0.113.0/24\"], got %r" % (value,))
    out = []
    for item in value:
        try:
            out.append(ipaddress.ip_network(_str(item, ctx), strict=True))
        except ValueError as e:
            raise _Bad("not a network in CIDR form: %s" % e)
    return tuple(out)


def _domain_list(value, ctx):
    from proxy.sniff import valid_hostname

    if not isinstance(value, list):
        raise _Bad("expected a list of domains such as [\"corp.example.com\"], got %r" % (value,))
    out = []
    for item in value:
        name = valid_hostname(_str(item, ctx))
        if name is None:
            raise _Bad("not a domain name: %r" % (item,))
        out.append(name)
    return tuple(out)


def _address(value, ctx):
    try:
        return ipaddress.IPv4Address(_str(value, ctx))
    except ValueError as e:
        raise _Bad("not an IPv4 address (%s)" % e)


_ENDPOINT = re.compile(r"^(unix:(path=)?/\S+|tcp:(host=)?[^:\s]+:(port=)?\d{1,5})$")


def _endpoint(value, ctx):
    text = _str(value, ctx)
    if not _ENDPOINT.match(text):
        raise _Bad("expected 'unix:/path/to.sock' or 'tcp:HOST:PORT', got %r" % text)
    return text


def _mode(value, ctx):
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        return int(value, 8)
    raise _Bad("expected an octal mode string such as \"0660\", got %r" % (value,))


def _group(value, ctx):
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32:
        return value
    import grp

    try:
        return grp.getgrnam(_str(value, ctx)).gr_gid
    except (KeyError, ValueError):  # ValueError: a NUL byte in the name
        raise _Bad("no such group %r" % (value,))


_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,28}$")


def _chain_name(value, ctx):
    """Our chain's name; the filter INPUT chain is this plus ``-IN``, within iptables' 28 characters."""
    text = _kernel_name(value, ctx)
    if len(text) > 25:
        raise _Bad("must be at most 25 characters (the INPUT chain adds '-IN'), got %r" % text)
    return text


def _host_port(default_port):
    """``HOST[:PORT]`` (IPv6 in brackets) → ``(host, port)``; HOST an IP or a DNS name."""

    def check(value, ctx):
        text = _str(value, ctx)
        match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?|([^:\[\]\s]+)(?::(\d{1,5}))?", text)
        if match is None:
            raise _Bad("expected HOST or HOST:PORT (IPv6 as [ADDR]:PORT), got %r" % text)
        host = match.group(1) or match.group(3)
        port = int(match.group(2) or match.group(4) or default_port)
        if not 1 <= port <= 65535:
            raise _Bad("port must be between 1 and 65535, got %d" % port)
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            if match.group(1) or not re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})*\.?", host):
                raise _Bad("not an IP address or DNS name: %r" % host)
        return (host, port)

    return check


def _resolver(value, ctx):
    """``HOST[:PORT]`` (DNS over TCP, port 53) or ``https://NAME/PATH`` (DNS over HTTPS)."""
    if is_doh(value):
        try:
            return parse_doh_url(value)
        except ValueError as e:
            raise _Bad(str(e))
    return _host_port(53)(value, ctx)


def _ca_file(value, ctx):
    """A PEM file of one or more CA certificates, every one of which must load."""
    path = _readable_file(value, ctx)
    from proxy.dnsdoh import load_ca_file  # pyOpenSSL, only when the key is set

    try:
        load_ca_file(str(path))
    except ValueError as e:
        raise _Bad(str(e))
    return path


def _probe_target(value, ctx):
    try:
        return ProbeTarget.parse(value)
    except ValueError as e:
        raise _Bad(str(e))


def _server_list(value, ctx):
    if not isinstance(value, list):
        raise _Bad("expected a list of resolver addresses such as [\"192.0.2.53\"], got %r" % (value,))
    out = []
    for item in value:
        host, port = _host_port(53)(item, ctx)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise _Bad("host resolvers must be IP addresses, got %r" % host)
        out.append((host, port))
    return tuple(out)


def _kernel_name(value, ctx):
    text = _str(value, ctx)
    if not _NAME.match(text):
        raise _Bad("must be 1-28 characters of letters, digits, '_', '.', ':' or '-', got %r" % text)
    return text


def _interface(value, ctx):
    text = _str(value, ctx)
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}\+?", text):
        raise _Bad("not an interface name or prefix (e.g. 'tun+'), got %r" % text)
    return text


def _push_lines(value, ctx):
    if not isinstance(value, list):
        raise _Bad("expected a list of push options, got %r" % (value,))
    out = []
    for item in value:
        text = _str(item, ctx)
        if any(c in text for c in "\r\n\"\\") or len(text) > 200:
            raise _Bad("push option %r must be under 200 characters without quotes, backslashes or newlines" % text)
        words = text.split()
        if not words:
            raise _Bad("empty push option")
        if words[0] in RESERVED_OPTIONS:
            raise _Bad(
                "%r is pushed by pocketproxy itself (the full tunnel; choose it with openvpn.tunnel: full or split)"
                % text
            )
        out.append(text)
    return tuple(out)


def _bool(value, ctx):
    if not isinstance(value, bool):
        raise _Bad("expected true or false, got %r" % (value,))
    return value


def _choice(*options):
    def check(value, ctx):
        if value not in options:
            raise _Bad("expected one of %s, got %r" % (", ".join(options), value))
        return value

    return check


def _interval(value, ctx):
    """Seconds between periodic runs: 0 disables, else at least a tenth of a second."""
    seconds = _number(0, 86400)(value, ctx)
    if 0 < seconds < 0.1:
        raise _Bad("must be 0 (off) or at least 0.1 seconds, got %s" % seconds)
    return seconds


def _device_allow(value, ctx):
    """``firewall.device_allow``: ``tcp/PORT``, ``udp/PORT``, ``tcp/LOW-HIGH`` or ``icmp`` (echo request)."""
    if not isinstance(value, list):
        raise _Bad("expected a list such as [\"tcp/22\", \"udp/123\", \"icmp\"], got %r" % (value,))
    out = []
    for item in value:
        text = _str(item, ctx)
        match = re.fullmatch(r"(tcp|udp)/(\d{1,5})(?:-(\d{1,5}))?|icmp", text)
        if match is None:
            raise _Bad("expected tcp/PORT, udp/PORT, tcp/LOW-HIGH or icmp, got %r" % text)
        if text == "icmp":
            out.append(("icmp", None, None))
            continue
        low = int(match.group(2))
        high = int(match.group(3) or low)
        if not 1 <= low <= high <= 65535:
            raise _Bad("ports must be 1-65535, low before high, got %r" % text)
        out.append((match.group(1), low, high))
    return tuple(out)


def _ports(value, ctx):
    if not isinstance(value, list):
        raise _Bad("expected a list of TCP ports, got %r" % (value,))
    port = _int(1, 65535)
    return frozenset(port(item, ctx) for item in value)


def _bind_addresses(value, ctx):
    if not isinstance(value, list) or not value:
        raise _Bad("expected a non-empty list of addresses such as [\"0.0.0.0\", \"::\"], got %r" % (value,))
    out = []
    for item in value:
        try:
            out.append(str(ipaddress.ip_address(_str(item, ctx))))
        except ValueError as e:
            raise _Bad("not an IP address (%s)" % e)
    if len(set(out)) != len(out):
        raise _Bad("duplicate address in %r" % (value,))
    return tuple(out)


def _server_endpoint(value, ctx):
    """A Twisted server endpoint string (parsed, not bound); None or "" disables."""
    if value is None or value == "":
        return None
    text = _str(value, ctx)
    from twisted.internet.endpoints import serverFromString

    try:
        # Parsing only builds the endpoint object; a placeholder keeps the
        # real reactor from being imported (twistd installs it later).
        endpoint = serverFromString(object(), text)
    except Exception as e:
        raise _Bad("not a server endpoint such as 'tcp:9105:interface=127.0.0.1' (%s: %s)" % (type(e).__name__, e))
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise _Bad("port must be between 0 and 65535, got %d" % port)
    return text


# Keys whose validator also receives an explicit null (to mean "disabled") instead of the default.
_NULLABLE = {("metrics", "listen")}

# section name -> (dataclass, {key: (validator, required)})
_SCHEMA = {
    "openvpn": (
        OpenVPNConfig,
        {
            "management": (_endpoint, True),
            "subnet": (_network, True),
            "server_address": (_address, True),
            "password_file": (_readable_file, False),
            "command_timeout": (_number(0.1, 120), False),
            "reconnect_initial": (_number(0.01, 60), False),
            "reconnect_max": (_number(0.1, 3600), False),
            "temp_backoff": (_int(1, 3600), False),
            "push": (_push_lines, False),
            "bytecount_interval": (_int(0, 3600), False),
            "tunnel": (_choice(*TUNNEL_MODES), False),
        },
    ),
    "proxy": (
        ProxyConfig,
        {
            "listen": (_int(1, 65535), False),
            "bind": (_bind_addresses, False),
            "mode": (_choice("redirect", "tproxy"), False),
            "sniff_ports": (_ports, False),
            "sniff_budget": (_number(0, 5), False),
            "connect_timeout": (_number(0.5, 600), False),
            "handshake_timeout": (_number(0.5, 600), False),
            "idle_timeout": (_number(1, 86400 * 7), False),
            "half_closed_timeout": (_number(1, 86400), False),
            "keepalive": (_int(0, 7200), False),
            "max_connections": (_int(0, 10_000_000), False),
            "max_connections_per_client": (_int(1, 10_000_000), False),
            "splice": (_bool, False),
            "deny_private": (_bool, False),
            "deny_networks": (_cidr_list, False),
            "deny_names": (_domain_list, False),
        },
    ),
    "admin": (
        AdminConfig,
        {
            "socket": (_path, False),
            "mode": (_mode, False),
            "group": (_group, False),
            "password_file": (_password_file, False),
            "login_timeout": (_number(1, 3600), False),
            "idle_timeout": (_interval, False),
        },
    ),
    "directory": (
        DirectoryConfig,
        {
            "file": (_readable_file, False),
            "backend": (_choice("file", "postgres"), False),
            "dsn": (_str, False),
            "password_file": (_readable_file, False),
        },
    ),
    "metrics": (
        MetricsConfig,
        {"listen": (_server_endpoint, False), "status_page": (_bool, False), "status_password_file": (_readable_file, False)},
    ),
    "firewall": (
        FirewallConfig,
        {
            "ipset": (_kernel_name, False),
            "chain": (_chain_name, False),
            "interface": (_interface, False),
            "maxelem": (_int(1, 1 << 24), False),
            "iptables": (_str, False),
            "iptables_restore": (_str, False),
            "ip": (_str, False),
            "tproxy_mark": (_int(1, 0x7FFFFFFF), False),
            "tproxy_table": (_int(1, 0x7FFFFFFF), False),
            "command_timeout": (_number(0.1, 120), False),
            "verify_interval": (_interval, False),
            "repair": (_bool, False),
            "ip6tables": (_str, False),
            "ip6tables_restore": (_str, False),
            "device_networks": (_cidr_list, False),
            "device_allow": (_device_allow, False),
        },
    ),
    "log": (LogConfig, {"format": (_choice("text", "json"), False), "file": (_path, False)}),
    "health": (
        HealthConfig,
        {
            "enabled": (_bool, False),
            "target": (_probe_target, False),
            "ca_file": (_ca_file, False),
            "interval": (_number(1, 3600), False),
            "timeout": (_number(0.5, 600), False),
            "retry_interval": (_number(0.5, 3600), False),
            "fall": (_int(1, 100), False),
            "rise": (_int(1, 100), False),
            "concurrency": (_int(1, 10_000), False),
            "fresh_every": (_number(0, 86400), False),
            "when_down": (_choice("deny", "admit"), False),
            "on_down": (_choice("keep", "kill"), False),
            "rotation_timeout": (_number(1, 3600), False),
            "rotation_min_interval": (_number(0, 86400), False),
        },
    ),
    "dns": (
        DNSConfig,
        {
            "enabled": (_bool, False),
            "listen": (_address, False),
            "port": (_int(1, 65535), False),
            "push": (_bool, False),
            "resolver": (_resolver, False),
            "ca_file": (_ca_file, False),
            "doh_connections": (_int(1, 64), False),
            "policy": (_choice("via_device", "host"), False),
            "host_servers": (_server_list, False),
            "query_timeout": (_number(0.1, 60), False),
            "connect_timeout": (_number(0.5, 600), False),
            "handshake_timeout": (_number(0.5, 600), False),
            "idle_timeout": (_number(1, 86400), False),
            "cache_entries": (_int(0, 1_000_000), False),
            "max_tcp_clients": (_int(1, 100_000), False),
            "max_tcp_per_client": (_int(1, 100_000), False),
            "log_names": (_bool, False),
        },
    ),
}
_REQUIRED_SECTIONS = ("openvpn", "directory")


def _section(path, name, raw, ctx):
    cls, fields = _SCHEMA[name]
    if not isinstance(raw, dict):
        raise ConfigError(path, name, "expected a mapping, got %s" % type(raw).__name__)
    for key in raw:
        if key not in fields:
            raise ConfigError(path, "%s.%s" % (name, key), "unknown key (known: %s)" % ", ".join(sorted(fields)))
    values = {}
    for key, (check, required) in fields.items():
        if key not in raw or (raw[key] is None and (name, key) not in _NULLABLE):
            if required:
                raise ConfigError(path, "%s.%s" % (name, key), "required key is missing")
            continue
        try:
            values[key] = check(raw[key], ctx)
        except _Bad as e:
            raise ConfigError(path, "%s.%s" % (name, key), str(e))
    return cls(**values)


def yaml_problem(error):
    """A YAML error as ``problem (line L, column C)``, without the source excerpt PyYAML adds:
    that excerpt may hold a secret (a device URL with its password) and the message is logged."""
    problem = getattr(error, "problem", None) or getattr(error, "context", None) or type(error).__name__
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    if mark is not None:
        return "%s (line %d, column %d)" % (problem, mark.line + 1, mark.column + 1)
    return str(problem)


#: libyaml's parser when PyYAML was built with it (Debian's and PyPI's are): a 5,000-user file
#: loads in 0.25 s instead of 1.3 s, which is most of a restart's time to reconcile.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(text, path):
    """``yaml.safe_load(text)``, with every way it can fail turned into a :class:`ConfigError` for ``path``."""
    try:
        return yaml.load(text, Loader=_SAFE_LOADER)
    except yaml.YAMLError as e:
        raise ConfigError(path, None, "invalid YAML: %s" % yaml_problem(e))
    except (RecursionError, ValueError) as e:
        # PyYAML lets these through: nesting deeper than the recursion limit, a date such
        # as 2001-13-45, an integer of more than 4300 digits. Their text holds no source excerpt.
        raise ConfigError(path, None, "invalid YAML: %s: %s" % (type(e).__name__, str(e)[:100]))


def parse_config(text, path):
    """Parse YAML ``text`` (read from ``path``) into a :class:`Config`; raise :class:`ConfigError`."""
    path = Path(path)
    raw = load_yaml(text, path)
    if not isinstance(raw, dict):
        raise ConfigError(path, None, "expected a mapping of sections (openvpn, directory, ...)")
    for key in raw:
        if key not in _SCHEMA:
            raise ConfigError(path, key, "unknown section (known: %s)" % ", ".join(sorted(_SCHEMA)))
    for name in _REQUIRED_SECTIONS:
        if name not in raw:
            raise ConfigError(path, name, "required section is missing")
    ctx = {"base": path.parent.resolve()}
    sections = {name: _section(path, name, raw[name], ctx) for name in raw}
    ovpn = sections["openvpn"]
    if ovpn.server_address not in ovpn.subnet:
        raise ConfigError(path, "openvpn.server_address", "%s is not inside subnet %s" % (ovpn.server_address, ovpn.subnet))
    if ovpn.server_address in (ovpn.subnet.network_address, ovpn.subnet.broadcast_address):
        raise ConfigError(path, "openvpn.server_address", "must not be the network or broadcast address")
    if ovpn.reconnect_initial > ovpn.reconnect_max:
        raise ConfigError(path, "openvpn.reconnect_initial", "must not exceed openvpn.reconnect_max")
    dns = sections.get("dns") or DNSConfig()
    if dns.enabled and dns.push:
        ours = str(dns.listen or ovpn.server_address)
        for line in ovpn.push:
            words = line.split()
            if words[:2] == ["dhcp-option", "DNS"] and words[2:] != [ours]:
                raise ConfigError(
                    path,
                    "openvpn.push",
                    "pushes %r while the DNS service pushes 'dhcp-option DNS %s' (set dns.push: false to push your own)"
                    % (line, ours),
                )
    directory = sections["directory"]
    if directory.backend == "file":
        if directory.file is None:
            raise ConfigError(path, "directory.file", "required key is missing (the users file)")
        for key in ("dsn", "password_file"):
            if getattr(directory, key) is not None:
                raise ConfigError(path, "directory." + key, "only used with directory.backend: postgres")
    else:
        if directory.dsn is None:
            raise ConfigError(path, "directory.dsn", "required with backend postgres (e.g. 'host=/run/postgresql dbname=pocketproxy')")
        if re.search(r"(^|\s)password\s*=|://[^/@\s]*:[^/@\s]*@", directory.dsn):
            raise ConfigError(path, "directory.dsn", "holds a password: put it in directory.password_file")
        if directory.file is not None:
            raise ConfigError(path, "directory.file", "not used with directory.backend: postgres (the database is the directory)")
    if dns.ca_file is not None and not is_doh(str(dns.resolver)):
        raise ConfigError(path, "dns.ca_file", "only used with an https:// dns.resolver (DNS over HTTPS)")
    log = sections.get("log")
    if log is not None and log.file is not None and log.format != "json":
        raise ConfigError(path, "log.file", "only used with log.format json (twistd --logfile places the text log)")
    return Config(path=path, **sections)


def read_text(path, what):
    """The UTF-8 text of ``path``; :class:`ConfigError` saying ``cannot read <what>`` otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(path, None, "cannot read %s: %s" % (what, e.strerror or e))
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, "not UTF-8 text: %s" % e)


def load_config(path):
    """Read and validate the config file at ``path``; raise :class:`ConfigError` on any problem."""
    return parse_config(read_text(path, "config file"), path)
