"""Config loading: typed values, and one clear error naming file, key and problem."""

import ipaddress

import pytest

from ovpnmgr.config import ConfigError, load_config, parse_config

GOOD = """
openvpn:
  management: unix:/run/pocketproxy/openvpn-mgmt.sock
  subnet: 10.9.0.0/24
  server_address: 10.9.0.1
  push: ["dhcp-option DNS 10.9.0.1"]
proxy:
  listen: 12345
admin:
  socket: /run/pocketproxy/admin.sock
  mode: "0660"
directory:
  file: users.yaml
firewall:
  ipset: pocketproxy-clients
"""


@pytest.fixture
def cfgdir(tmp_path):
    (tmp_path / "users.yaml").write_text("devices: {}\nusers: {}\n")
    return tmp_path


def _parse(cfgdir, text):
    return parse_config(text, cfgdir / "pocketproxy.yaml")


def _error(cfgdir, text):
    with pytest.raises(ConfigError) as info:
        _parse(cfgdir, text)
    return info.value


def test_good_config_is_typed(cfgdir):
    """A valid file yields typed values with relative paths resolved against the file."""
    config = _parse(cfgdir, GOOD)
    assert config.openvpn.subnet == ipaddress.IPv4Network("10.9.0.0/24")
    assert config.openvpn.server_address == ipaddress.IPv4Address("10.9.0.1")
    assert config.openvpn.netmask == "255.255.255.0"
    assert config.openvpn.push == ("dhcp-option DNS 10.9.0.1",)
    assert config.admin.mode == 0o660
    assert config.directory.file == cfgdir / "users.yaml"
    assert config.firewall.chain == "POCKETPROXY"
    assert config.proxy.listen == 12345


def test_tunnel_is_full_unless_split_is_chosen(cfgdir):
    """openvpn.tunnel defaults to the full tunnel; split is the only other choice."""
    assert _parse(cfgdir, GOOD).openvpn.tunnel == "full"
    assert _parse(cfgdir, GOOD.replace("  subnet:", "  tunnel: split\n  subnet:")).openvpn.tunnel == "split"
    err = _error(cfgdir, GOOD.replace("  subnet:", "  tunnel: half\n  subnet:"))
    assert err.key == "openvpn.tunnel" and "expected one of full, split" in err.problem


@pytest.mark.parametrize("option", ["redirect-gateway def1", "block-ipv6", "block-outside-dns", "redirect-private local",
                                    "ifconfig 10.9.0.9 255.255.255.0", "route-gateway 10.9.0.1"])
def test_push_may_not_carry_what_pocketproxy_pushes(cfgdir, option):
    """The tunnel is pocketproxy's: openvpn.push lines that would fight it are refused, naming the line."""
    err = _error(cfgdir, GOOD.replace('push: ["dhcp-option DNS 10.9.0.1"]', 'push: ["%s"]' % option))
    assert err.key == "openvpn.push"
    assert repr(option) in err.problem and "openvpn.tunnel" in err.problem


def test_destination_policy_keys(cfgdir):
    """Private ranges are denied by default; extra networks and domains are validated."""
    p = _parse(cfgdir, GOOD).proxy
    assert p.deny_private is True and p.deny_networks == () and p.deny_names == ()
    p = _parse(
        cfgdir,
        GOOD.replace("listen: 12345", 'listen: 12345\n  deny_networks: ["203.0.113.0/25", "2001:db8::/32"]\n'
                     '  deny_names: ["Corp.Example.com"]\n  deny_private: false'),
    ).proxy
    assert [str(n) for n in p.deny_networks] == ["203.0.113.0/25", "2001:db8::/32"]
    assert p.deny_names == ("corp.example.com",) and p.deny_private is False
    for bad, problem in (('deny_networks: ["10.0.0.1/8"]', "host bits set"), ('deny_names: ["a b"]', "not a domain"),
                         ("deny_networks: 10.0.0.0/8", "expected a list")):
        err = _error(cfgdir, GOOD.replace("listen: 12345", "listen: 12345\n  " + bad))
        assert err.key == "proxy." + bad.split(":")[0] and problem in err.problem, err


def test_unknown_key_names_file_and_key(cfgdir):
    """A typo is an error that names the file and the dotted key."""
    err = _error(cfgdir, GOOD.replace("listen: 12345", "lisen: 12345"))
    assert err.key == "proxy.lisen"
    assert str(err).startswith(str(cfgdir / "pocketproxy.yaml") + ": proxy.lisen: unknown key")


def test_unknown_section(cfgdir):
    """An unknown top-level section is refused."""
    assert _error(cfgdir, GOOD + "extra: {}\n").key == "extra"


@pytest.mark.parametrize(
    "old,new,key,words",
    [
        ("subnet: 10.9.0.0/24", "subnet: 10.9.0.5/24", "openvpn.subnet", "CIDR"),
        ("subnet: 10.9.0.0/24", "subnet: banana", "openvpn.subnet", "CIDR"),
        ("server_address: 10.9.0.1", "server_address: 10.8.0.1", "openvpn.server_address", "not inside"),
        ("server_address: 10.9.0.1", "server_address: 10.9.0.0", "openvpn.server_address", "network or broadcast"),
        ("listen: 12345", "listen: 70000", "proxy.listen", "between"),
        ("listen: 12345", "listen: '12345'", "proxy.listen", "integer"),
        ("listen: 12345", "listen: true", "proxy.listen", "integer"),
        ('mode: "0660"', "mode: 660", "admin.mode", "octal"),
        ("management: unix:/run/pocketproxy/openvpn-mgmt.sock", "management: /tmp/x", "openvpn.management", "unix:"),
        ("file: users.yaml", "file: missing.yaml", "directory.file", "cannot read"),
        ("ipset: pocketproxy-clients", "ipset: 'bad name'", "firewall.ipset", "characters"),
    ],
)
def test_bad_values(cfgdir, old, new, key, words):
    """Wrong types, bad CIDRs and unreadable files each name the key and the problem."""
    assert old in GOOD
    err = _error(cfgdir, GOOD.replace(old, new))
    assert err.key == key
    assert words in err.problem


def test_missing_required(cfgdir):
    """A missing required key or section is named."""
    assert _error(cfgdir, GOOD.replace("  subnet: 10.9.0.0/24\n", "")).key == "openvpn.subnet"
    assert _error(cfgdir, "openvpn: {}\ndirectory: {file: users.yaml}\n").key == "openvpn.management"
    text = GOOD.split("directory:")[0]
    assert _error(cfgdir, text).key == "directory"


def test_invalid_yaml_and_unreadable_file(cfgdir):
    """Broken YAML and an unreadable file are reported with the file name."""
    err = _error(cfgdir, "openvpn: [unclosed\n")
    assert "invalid YAML" in err.problem
    with pytest.raises(ConfigError) as info:
        load_config(cfgdir / "nope.yaml")
    assert "cannot read config file" in str(info.value)
    assert "nope.yaml" in str(info.value)


def test_shipped_config_parses():
    """The example configuration shipped in conf/ is valid."""
    import pathlib

    conf = pathlib.Path(__file__).resolve().parents[2] / "conf" / "pocketproxy.yaml"
    config = load_config(conf)
    assert config.openvpn.subnet.prefixlen == 24


def test_proxy_section_defaults_are_wan_safe(cfgdir):
    """Without settings the proxy listens dual-stack with tens-of-seconds setup and long idle timeouts."""
    p = _parse(cfgdir, GOOD).proxy
    assert (p.listen, p.bind, p.mode) == (12345, ("0.0.0.0", "::"), "redirect")
    assert p.sniff_ports == frozenset({80, 443, 8080, 8443}) and p.sniff_budget == 0.2
    assert p.connect_timeout >= 10 and p.handshake_timeout >= 10
    assert p.idle_timeout >= 600 and p.half_closed_timeout >= 30
    assert p.splice is True and p.max_connections == 0


def test_proxy_section_typed(cfgdir):
    """Every proxy key is parsed into its type."""
    text = GOOD.replace(
        "  listen: 12345\n",
        "  listen: 3129\n  bind: ['10.9.0.1']\n  mode: tproxy\n  sniff_ports: [443]\n  sniff_budget: 0.15\n"
        "  connect_timeout: 20\n  handshake_timeout: 25\n  idle_timeout: 900\n  half_closed_timeout: 30\n"
        "  keepalive: 0\n  max_connections: 5000\n  max_connections_per_client: 64\n  splice: false\n",
    )
    p = _parse(cfgdir, text).proxy
    assert (p.listen, p.bind, p.mode, p.sniff_ports, p.sniff_budget) == (3129, ("10.9.0.1",), "tproxy", {443}, 0.15)
    assert (p.connect_timeout, p.handshake_timeout, p.idle_timeout, p.half_closed_timeout) == (20, 25, 900, 30)
    assert (p.keepalive, p.max_connections, p.max_connections_per_client, p.splice) == (0, 5000, 64, False)


@pytest.mark.parametrize(
    "line,key,words",
    [
        ("bind: []", "proxy.bind", "non-empty list"),
        ("bind: ['0.0.0.0', '0.0.0.0']", "proxy.bind", "duplicate"),
        ("bind: ['localhost']", "proxy.bind", "not an IP address"),
        ("mode: transparent", "proxy.mode", "one of redirect, tproxy"),
        ("sniff_ports: 443", "proxy.sniff_ports", "list"),
        ("sniff_ports: [0]", "proxy.sniff_ports", "between"),
        ("sniff_budget: 30", "proxy.sniff_budget", "between"),
        ("idle_timeout: -1", "proxy.idle_timeout", "between"),
        ("splice: 'yes'", "proxy.splice", "true or false"),
        ("max_connections_per_client: 0", "proxy.max_connections_per_client", "between"),
    ],
)
def test_bad_proxy_values(cfgdir, line, key, words):
    """Bad proxy settings name the key and the problem."""
    err = _error(cfgdir, GOOD.replace("  listen: 12345\n", "  listen: 12345\n  %s\n" % line))
    assert err.key == key
    assert words in err.problem


def test_metrics_listen_defaults_to_loopback(cfgdir):
    """Without a metrics section the endpoint is on, bound to 127.0.0.1:9105 only."""
    assert _parse(cfgdir, GOOD).metrics.listen == "tcp:9105:interface=127.0.0.1"


@pytest.mark.parametrize("value", ["null", '""', "~"])
def test_metrics_listen_null_or_empty_disables(cfgdir, value):
    """metrics.listen: null (or "") turns the endpoint off instead of falling back to the default."""
    assert _parse(cfgdir, GOOD + "metrics:\n  listen: %s\n" % value).metrics.listen is None


@pytest.mark.parametrize("value", ["tcp:9200", "tcp:9105:interface=0.0.0.0", "unix:/run/pocketproxy/metrics.sock"])
def test_metrics_listen_accepts_endpoint_strings(cfgdir, value):
    """Any Twisted server endpoint string is kept as written."""
    assert _parse(cfgdir, GOOD + "metrics:\n  listen: %s\n" % value).metrics.listen == value


@pytest.mark.parametrize(
    "value, words",
    [
        ("tcp:notaport", "not a server endpoint"),
        ("carrier-pigeon:9105", "Unknown endpoint type"),
        ("tcp:70000", "between 0 and 65535"),
        ("tcp:9105:colour=blue", "not a server endpoint"),
        ("9105", "expected a non-empty string"),
    ],
)
def test_bad_metrics_listen_names_the_key(cfgdir, value, words):
    """A bad endpoint is one ConfigError naming metrics.listen; unknown metrics keys are refused."""
    err = _error(cfgdir, GOOD + "metrics:\n  listen: %s\n" % value)
    assert err.key == "metrics.listen" and words in err.problem
    assert str(err).startswith(str(cfgdir / "pocketproxy.yaml") + ": metrics.listen: ")
    assert _error(cfgdir, GOOD + "metrics:\n  port: 9105\n").key == "metrics.port"


# --- admin.password_file ---


def test_admin_password_file_is_a_resolved_path(cfgdir):
    (cfgdir / "admin.pw").write_text("s3cret\n")
    config = _parse(cfgdir, GOOD.replace('  mode: "0660"\n', '  mode: "0660"\n  password_file: admin.pw\n'))
    assert config.admin.password_file == cfgdir / "admin.pw"


def test_admin_password_file_defaults_to_none(cfgdir):
    assert _parse(cfgdir, GOOD).admin.password_file is None


def test_admin_password_file_empty_first_line_names_the_key(cfgdir):
    (cfgdir / "admin.pw").write_text("\nsecond line\n")
    err = _error(cfgdir, GOOD.replace('  mode: "0660"\n', '  mode: "0660"\n  password_file: admin.pw\n'))
    assert err.key == "admin.password_file" and "first line is empty" in err.problem


def test_admin_password_file_unreadable_names_the_key(cfgdir):
    err = _error(cfgdir, GOOD.replace('  mode: "0660"\n', '  mode: "0660"\n  password_file: missing.pw\n'))
    assert err.key == "admin.password_file" and "cannot read" in err.problem


def test_proxy_section_reaches_the_data_path_settings(cfgdir):
    """Every policy key of the proxy section arrives in the ProxySettings the daemon builds."""
    from ovpnmgr.tap import proxy_settings

    text = GOOD.replace(
        "  listen: 12345\n",
        "  listen: 12345\n  sniff_ports: [443]\n  sniff_budget: 0.15\n  connect_timeout: 20\n  handshake_timeout: 25\n"
        "  idle_timeout: 900\n  half_closed_timeout: 30\n  keepalive: 0\n  max_connections: 5000\n"
        "  max_connections_per_client: 64\n  splice: false\n",
    )
    s = proxy_settings(_parse(cfgdir, text))
    assert (s.sniff_ports, s.sniff_budget, s.connect_timeout, s.handshake_timeout) == ({443}, 0.15, 20, 25)
    assert (s.idle_timeout, s.half_closed_timeout, s.keepalive) == (900, 30, 0)
    assert (s.max_connections, s.max_connections_per_client, s.splice) == (5000, 64, False)


def test_issue4_operating_keys_have_defaults(cfgdir):
    """bytecount every 5 s, a firewall check (with repair) every 60 s, text logs."""
    config = _parse(cfgdir, GOOD)
    assert config.openvpn.bytecount_interval == 5
    assert config.firewall.verify_interval == 60.0 and config.firewall.repair is True
    assert config.log.format == "text" and config.log.file is None


def test_issue4_operating_keys_typed(cfgdir):
    """log.file resolves against the config file; 0 disables bytecount and the periodic check."""
    text = GOOD.replace("  ipset: pocketproxy-clients", "  verify_interval: 0\n  repair: false")
    text = text.replace("  push:", "  bytecount_interval: 0\n  push:") + "log:\n  format: json\n  file: pp.jsonl\n"
    config = _parse(cfgdir, text)
    assert config.openvpn.bytecount_interval == 0
    assert config.firewall.verify_interval == 0 and config.firewall.repair is False
    assert config.log.format == "json" and config.log.file == cfgdir / "pp.jsonl"


@pytest.mark.parametrize(
    "extra,key,words",
    [
        ("log: {format: xml}\n", "log.format", "expected one of text, json, got 'xml'"),
        ("log: {file: /var/log/pp.log}\n", "log.file", "only used with log.format json"),
        ("log: {colour: true}\n", "log.colour", "unknown key"),
    ],
)
def test_bad_log_section_names_the_key(cfgdir, extra, key, words):
    """A bad log value is refused like every other key: file, dotted key, problem."""
    err = _error(cfgdir, GOOD + extra)
    assert err.key == key and words in err.problem


@pytest.mark.parametrize(
    "old,new,key",
    [
        ("  ipset: pocketproxy-clients", "  verify_interval: 0.01", "firewall.verify_interval"),
        ("  ipset: pocketproxy-clients", "  verify_interval: -1", "firewall.verify_interval"),
        ("  ipset: pocketproxy-clients", "  repair: yes-please", "firewall.repair"),
        ("  push:", "  bytecount_interval: 1.5\n  push:", "openvpn.bytecount_interval"),
    ],
)
def test_bad_interval_values(cfgdir, old, new, key):
    """Intervals: 0 or a sane positive number; bytecount in whole seconds (OpenVPN's unit)."""
    assert _error(cfgdir, GOOD.replace(old, new)).key == key


def test_yaml_errors_never_quote_the_source_line(cfgdir):
    """PyYAML's excerpt of the offending line could hold a device password; errors give line and column."""
    users = cfgdir / "bad-users.yaml"
    users.write_text("devices:\n  p:\n    upstream: http://u:S3CRET@192.0.2.1:80: x\n")
    from ovpnmgr.directory import Directory

    with pytest.raises(ConfigError) as info:
        Directory.load(users, ipaddress.IPv4Network("10.9.0.0/24"), ipaddress.IPv4Address("10.9.0.1"))
    assert "S3CRET" not in str(info.value) and "line 3, column" in str(info.value)


def test_health_is_on_by_default_and_its_defaults_suit_a_lossy_cellular_link(cfgdir):
    """On by default: probes every 30 s, 10 s per probe, down after 3 failures in a row, and the
    target defaults to a public what-is-my-address service, so the exit address is known; it can be off."""
    config = _parse(cfgdir, GOOD)
    h = config.health
    assert h.enabled and (h.interval, h.timeout, h.fall, h.rise, h.when_down, h.on_down) == (30, 10, 3, 2, "deny", "keep")
    assert h.settings().fresh_every == 600 and (h.rotation_timeout, h.rotation_min_interval) == (120, 300)
    assert str(config.probe_target) == "http://api.ipify.org:80/"  # answers with the exit address
    config = _parse(cfgdir, GOOD + "health:\n  target: tcp://1.1.1.1:53\n")
    assert str(config.probe_target) == "tcp://1.1.1.1:53"
    config = _parse(cfgdir, GOOD + "health:\n  enabled: true\n  target: https://api.ipify.org/\n  fall: 4\n  on_down: kill\n")
    assert config.health.enabled and config.health.fall == 4 and config.health.on_down == "kill"
    assert str(config.probe_target) == "https://api.ipify.org:443/"
    assert not _parse(cfgdir, GOOD + "health:\n  enabled: false\n").health.enabled


@pytest.mark.parametrize(
    "lines,key,words",
    [
        ("  target: ftp://x/", "health.target", "scheme"),
        ("  target: tcp://x", "health.target", "tcp://host:port"),
        ("  interval: 0", "health.interval", "between"),
        ("  fall: 0", "health.fall", "between"),
        ("  when_down: maybe", "health.when_down", "deny, admit"),
        ("  on_down: drop", "health.on_down", "keep, kill"),
        ("  ca_file: users.yaml", "health.ca_file", "PEM"),
        ("  color: red", "health.color", "unknown key"),
    ],
)
def test_bad_health_values_name_the_key(cfgdir, lines, key, words):
    err = _error(cfgdir, GOOD + "health:\n" + lines + "\n")
    assert err.key == key and words in err.problem, err
