"""Client profiles: ``ovpnmgr.profile`` rendering and ``pocketproxyctl client-config``.

Also checks that the shipped OpenVPN server config (``conf/openvpn/server.conf``)
pairs with the shipped ``conf/pocketproxy.yaml`` (socket, subnet, server address)
and that ``conf/openvpn/client.ovpn.in`` is the built-in template.
"""

import datetime
import ipaddress
import os
import pathlib
import stat

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ovpnmgr import ctl, profile
from ovpnmgr.directory import hash_password

ROOT = pathlib.Path(__file__).resolve().parents[2]
TLS_CRYPT = "#\n# 2048 bit OpenVPN static key\n#\n-----BEGIN OpenVPN Static key V1-----\n00ff\n-----END OpenVPN Static key V1-----\n"


def _cert(cn):
    """A self-signed EC certificate and key (PEM text) with subject CN ``cn``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()


@pytest.fixture(scope="module")
def pems():
    ca, _ = _cert("test-ca")
    alice_cert, alice_key = _cert("alice-cn")
    other_cert, other_key = _cert("someone-else")
    return {"ca": ca, "alice_cert": alice_cert, "alice_key": alice_key, "other_cert": other_cert, "other_key": other_key}


# --- the template and the shipped server config ---


def test_shipped_template_is_the_builtin_one():
    """conf/openvpn/client.ovpn.in (installed as an example) is exactly what client-config renders from."""
    assert (ROOT / "conf" / "openvpn" / "client.ovpn.in").read_text() == profile.TEMPLATE


def test_template_retries_auth_without_prompting():
    """The profile keeps retrying after a TEMP refusal and asks for user name/password."""
    lines = [line.strip() for line in profile.TEMPLATE.splitlines()]
    assert "auth-retry nointeract" in lines
    assert "auth-user-pass" in lines
    assert "client" in lines and "remote-cert-tls server" in lines


def _directives(path):
    """``{option: [args, ...]}`` of an OpenVPN config file (comments and blank lines dropped)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        words = line.split()
        out.setdefault(words[0], []).append(words[1:])
    return out


def test_shipped_server_config_pairs_with_shipped_pocketproxy_yaml():
    """Management socket, subnet and server address agree between the two shipped files."""
    server = _directives(ROOT / "conf" / "openvpn" / "server.conf")
    config = yaml.safe_load((ROOT / "conf" / "pocketproxy.yaml").read_text())["openvpn"]
    (management,) = server["management"]
    assert management[1] == "unix"
    assert config["management"] == "unix:" + management[0]
    (srv,) = server["server"]
    assert srv[2] == "nopool"
    network = ipaddress.IPv4Network("%s/%s" % (srv[0], srv[1]))
    assert network == ipaddress.IPv4Network(config["subnet"])
    assert str(next(network.hosts())) == config["server_address"]  # OpenVPN takes the first address


def test_shipped_server_config_has_what_pocketproxy_needs():
    """topology subnet, management-client-auth, peer user/group, optional passwords, hand-window >= 30."""
    server = _directives(ROOT / "conf" / "openvpn" / "server.conf")
    assert server["topology"] == [["subnet"]]
    assert server["management-client-auth"] == [[]]
    assert server["management-client-user"] == [["pocketproxy"]]
    assert server["management-client-group"] == [["pocketproxy"]]
    assert server["auth-user-pass-optional"] == [[]]
    assert int(server["hand-window"][0][0]) >= 30
    for forbidden in ("client-to-client", "management-hold", "management-client", "ifconfig-pool"):
        assert forbidden not in server


def test_shipped_server_config_leaves_the_tunnel_to_pocketproxy_and_is_tuned():
    """Routes, IPv6 and DNS are pushed by pocketproxy in every client-auth, never by this file (so
    nothing here can fight or replace them); its throughput lines are the ones make bench-path
    measures, each explained, and compression stays off."""
    text = (ROOT / "conf" / "openvpn" / "server.conf").read_text()
    server = _directives(ROOT / "conf" / "openvpn" / "server.conf")
    assert "push" not in server and "push-reset" not in server and "push-remove" not in server
    assert server["data-ciphers"] == [["AES-128-GCM:AES-256-GCM:CHACHA20-POLY1305"]]
    assert server["sndbuf"] == server["rcvbuf"] == [["4194304"]]
    assert server["fast-io"] == [[]] and server["txqueuelen"] == [["1000"]]
    assert server["allow-compression"] == [["no"]] and "compress" not in server and "comp-lzo" not in server
    for directive in ("data-ciphers", "sndbuf", "fast-io", "txqueuelen", "allow-compression"):
        before = text.split("\n%s" % directive, 1)[0].rstrip().splitlines()[-1]
        assert before.startswith("#"), "%s has no comment saying why" % directive


def test_template_is_cross_platform_and_keeps_what_the_server_pushes():
    """Profiles go to Linux, Windows, macOS and phones: only options every OpenVPN 2.6 accepts
    (txqueuelen, say, is a fatal error outside Linux), and nothing that would drop the full
    tunnel pocketproxy pushes."""
    lines = [line.split()[0] for line in profile.TEMPLATE.splitlines() if line.strip() and line[0] not in "#@"]
    for forbidden in ("txqueuelen", "route-nopull", "pull-filter", "route-noexec", "ignore-unknown-option"):
        assert forbidden not in lines
    assert {"sndbuf", "rcvbuf", "fast-io"} <= set(lines)


# --- parse_remote ---


@pytest.mark.parametrize(
    "text, expected",
    [
        ("vpn.example.com", ("vpn.example.com", 1194)),
        ("vpn.example.com:443", ("vpn.example.com", 443)),
        ("192.0.2.7", ("192.0.2.7", 1194)),
        ("192.0.2.7:1195", ("192.0.2.7", 1195)),
        ("[2001:db8::1]", ("2001:db8::1", 1194)),
        ("[2001:db8::1]:51194", ("2001:db8::1", 51194)),
        ("2001:db8::1", ("2001:db8::1", 1194)),
    ],
)
def test_parse_remote(text, expected):
    """HOST, HOST:PORT and bracketed IPv6 forms; 1194 by default."""
    assert profile.parse_remote(text) == expected


@pytest.mark.parametrize(
    "text", ["", ":1194", "vpn.example.com:0", "vpn.example.com:65536", "vpn.example.com:x", "bad host", "[::1", "[::1]x", "[nope]:1", "a:b:c"]
)
def test_parse_remote_rejects(text):
    """Malformed hosts and ports are refused with a message naming the argument."""
    with pytest.raises(profile.ProfileError, match="--remote"):
        profile.parse_remote(text)


# --- render ---


def test_render_password_user(pems):
    """Remotes, inline CA, the auth-user-pass line; no placeholder left behind."""
    text = profile.render("alice", [("vpn.example.com", 1194), ("192.0.2.7", 443)], pems["ca"])
    lines = text.splitlines()
    assert "remote vpn.example.com 1194" in lines and "remote 192.0.2.7 443" in lines
    assert lines.index("remote vpn.example.com 1194") < lines.index("remote 192.0.2.7 443")
    assert "auth-user-pass" in lines and "auth-retry nointeract" in lines
    assert "<ca>" in lines and "</ca>" in lines and "<cert>" not in lines and "<key>" not in lines
    assert "@" not in text.replace("pocketproxy user alice", "")
    assert "# OpenVPN client profile for pocketproxy user alice" in lines
    assert text.endswith("</ca>\n")


def test_render_certificate_user(pems):
    """Certificate-only: cert, key and tls-crypt inlined, no auth-user-pass line."""
    text = profile.render(
        "alice", [("vpn.example.com", 1194)], pems["ca"], pems["alice_cert"], pems["alice_key"], TLS_CRYPT, password=False
    )
    lines = text.splitlines()
    assert "auth-user-pass" not in lines
    for tag in ("ca", "cert", "key", "tls-crypt"):
        assert "<%s>" % tag in lines and "</%s>" % tag in lines
    assert "-----BEGIN OpenVPN Static key V1-----" in lines
    assert "# 2048 bit OpenVPN static key" not in lines  # only the PEM part is inlined


def test_render_strips_text_dumps_around_pem(pems):
    """easy-rsa certificates start with a human-readable dump; only the PEM block is inlined."""
    block = profile.pem_block("cert", "Certificate:\n    Data: ...\n" + pems["alice_cert"], "--cert x")
    assert block.splitlines()[1] == "-----BEGIN CERTIFICATE-----"
    assert "Data:" not in block


def test_render_errors(pems):
    """No remote, cert without key, non-PEM input, an inline tag inside the input."""
    with pytest.raises(profile.ProfileError, match="--remote"):
        profile.render("alice", [], pems["ca"])
    with pytest.raises(profile.ProfileError, match="--cert and --key"):
        profile.render("alice", [("h", 1)], pems["ca"], cert=pems["alice_cert"])
    with pytest.raises(profile.ProfileError, match="--ca: no PEM block"):
        profile.render("alice", [("h", 1)], "not a certificate")
    with pytest.raises(profile.ProfileError, match="inline <ca> tag"):
        profile.render("alice", [("h", 1)], pems["ca"] + "</ca>\nscript-security 3\n")


def test_render_template_checks(pems):
    """A custom template may not use unknown placeholders and must keep @REMOTE@ and @INLINE@."""
    with pytest.raises(profile.ProfileError, match="@NOPE@"):
        profile.render("a", [("h", 1)], pems["ca"], template="@REMOTE@\n@INLINE@\n@NOPE@\n")
    with pytest.raises(profile.ProfileError, match="@INLINE@"):
        profile.render("a", [("h", 1)], pems["ca"], template="client\n@REMOTE@\n")
    assert profile.render("a", [("h", 1)], pems["ca"], template="client\n@REMOTE@\n@INLINE@\n").startswith(
        "client\nremote h 1\n<ca>\n"
    )


def test_certificate_cn(pems):
    """The subject CN of a PEM certificate; garbage is a ProfileError."""
    assert profile.certificate_cn(pems["alice_cert"]) == "alice-cn"
    with pytest.raises(profile.ProfileError):
        profile.certificate_cn("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


# --- pocketproxyctl client-config ---


@pytest.fixture
def setup(tmp_path, pems):
    """A config + users file (alice: password, carol: certificate-only, dave: both) and PEM files."""
    users = {
        "devices": {"phone": {"upstream": "http://192.168.255.2:8080"}},
        "users": {
            "alice": {"password": hash_password("pw", n=1024), "device": "phone"},
            "carol": {"common_name": "alice-cn", "device": "phone"},
            "dave": {"password": hash_password("pw", n=1024), "common_name": "dave-cn", "device": "phone"},
        },
    }
    (tmp_path / "users.yaml").write_text(yaml.safe_dump(users))
    config = {
        "openvpn": {"management": "unix:/run/pocketproxy/openvpn-mgmt.sock", "subnet": "10.9.0.0/24", "server_address": "10.9.0.1"},
        "directory": {"file": "users.yaml"},
    }
    (tmp_path / "pocketproxy.yaml").write_text(yaml.safe_dump(config))
    for name in ("ca", "alice_cert", "alice_key"):
        (tmp_path / (name + ".pem")).write_text(pems[name])
    (tmp_path / "ta.key").write_text(TLS_CRYPT)
    return tmp_path


def _run(capsys, *argv):
    code = ctl.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_client_config_password_user(setup, capsys):
    """A password user's profile on stdout (exit 0), with a note that no client certificate was given."""
    code, out, err = _run(
        capsys, "--config", str(setup / "pocketproxy.yaml"), "client-config", "alice",
        "--remote", "vpn.example.com", "--ca", str(setup / "ca.pem"), "--tls-crypt", str(setup / "ta.key"),
    )
    assert code == 0, err
    assert "remote vpn.example.com 1194" in out.splitlines()
    assert "auth-user-pass" in out.splitlines() and "<tls-crypt>" in out
    assert "verify-client-cert" in err


def test_client_config_config_after_command_and_output_file(setup, capsys):
    """--config after the subcommand works; -o writes a 0600 file and nothing to stdout."""
    target = setup / "carol.ovpn"
    code, out, err = _run(
        capsys, "client-config", "carol", "--config", str(setup / "pocketproxy.yaml"), "--remote", "192.0.2.7:443",
        "--ca", str(setup / "ca.pem"), "--cert", str(setup / "alice_cert.pem"), "--key", str(setup / "alice_key.pem"),
        "-o", str(target),
    )
    assert (code, out, err) == (0, "", "")
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    text = target.read_text()
    assert "remote 192.0.2.7 443" in text and "<key>" in text and "auth-user-pass" not in text.splitlines()


def test_client_config_unknown_user_exits_1(setup, capsys):
    code, out, err = _run(
        capsys, "--config", str(setup / "pocketproxy.yaml"), "client-config", "mallory", "--remote", "h", "--ca", str(setup / "ca.pem")
    )
    assert (code, out) == (1, "")
    assert err == "pocketproxyctl: no user 'mallory' in %s\n" % (setup / "users.yaml")


def test_client_config_certificate_user_needs_cert(setup, capsys):
    code, out, err = _run(
        capsys, "--config", str(setup / "pocketproxy.yaml"), "client-config", "carol", "--remote", "h", "--ca", str(setup / "ca.pem")
    )
    assert (code, out) == (2, "")
    assert "certificate-only" in err and "--cert and --key" in err


def test_client_config_cn_mismatch_exits_1(setup, capsys):
    """dave's users-file common_name is dave-cn; a certificate for alice-cn would be refused by the server."""
    code, out, err = _run(
        capsys, "--config", str(setup / "pocketproxy.yaml"), "client-config", "dave", "--remote", "h",
        "--ca", str(setup / "ca.pem"), "--cert", str(setup / "alice_cert.pem"), "--key", str(setup / "alice_key.pem"),
    )
    assert (code, out) == (1, "")
    assert "'alice-cn' is not user dave's common_name 'dave-cn'" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--remote", "h", "--ca", "/nonexistent/ca.pem"], "--ca /nonexistent/ca.pem: cannot read"),
        (["--remote", "h:99999", "--ca", "CA"], "port must be 1-65535"),
        (["--remote", "h", "--ca", "CA", "--cert", "CA"], "--cert and --key go together"),
        (["--remote", "h", "--ca", "TA"], "--ca: no PEM block"),
    ],
)
def test_client_config_usage_errors_exit_2(setup, capsys, argv, message):
    argv = [a.replace("CA", str(setup / "ca.pem")).replace("TA", str(setup / "users.yaml")) for a in argv]
    code, out, err = _run(capsys, "--config", str(setup / "pocketproxy.yaml"), "client-config", "alice", *argv)
    assert (code, out) == (2, "")
    assert message in err and err.startswith("pocketproxyctl: ")


def test_client_config_bad_config_exits_2(tmp_path, capsys):
    code, out, err = _run(
        capsys, "--config", str(tmp_path / "missing.yaml"), "client-config", "alice", "--remote", "h", "--ca", "x"
    )
    assert (code, out) == (2, "")
    assert err.startswith("pocketproxyctl: configuration error: %s" % (tmp_path / "missing.yaml"))


def test_client_config_missing_required_arguments_exit_2(capsys):
    """argparse usage errors (no --remote / --ca) exit 2."""
    code, out, err = _run(capsys, "client-config", "alice", "--ca", "x")
    assert code == 2 and "--remote" in err
