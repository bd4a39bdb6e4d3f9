"""A daemon config file parsed from text over a minimal users file, and the error it gives
(shared by test_dns_wiring and test_firewall)."""

import pytest

from ovpnmgr.config import ConfigError, parse_config

BASE = (
    "openvpn: {management: 'unix:/x', subnet: 10.9.0.0/24, server_address: 10.9.0.1%s}\n"
    "directory: {file: users.yaml}\nproxy: {splice: false}\nmetrics: {listen: null}\n"
)


def config(tmp_path, extra="", openvpn=""):
    (tmp_path / "users.yaml").write_text("devices: {}\nusers: {}\n")
    return parse_config(BASE % openvpn + extra, tmp_path / "pocketproxy.yaml")


def problem(tmp_path, extra, openvpn=""):
    with pytest.raises(ConfigError) as info:
        config(tmp_path, extra, openvpn)
    return str(info.value)
