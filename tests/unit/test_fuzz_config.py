"""Hostile input for the config loader and the users file.

The promise (``ovpnmgr.config``): every problem is one :class:`ConfigError` naming the file and
the dotted key. Proven here for random YAML structures under the known sections and keys, for
random values of every type YAML can produce, and for mutated valid files: the result is a
``Config``/``Directory`` or a ``ConfigError`` for *that* file — never another exception type.

Two input classes are kept out of the property tests and pinned by regression tests at the
end: NUL bytes in file and group names, and YAML that PyYAML parses but cannot construct.
"""

import hashlib
import ipaddress

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ovpnmgr import config as config_module
from ovpnmgr.config import Config, ConfigError, parse_config
from ovpnmgr.directory import SCRYPT_MAXMEM, AuthFailed, Directory, hash_password, verify_password

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)

#: Whole-file round trips through pure-Python PyYAML cost ~30 ms each: fewer, richer examples.
TREES = settings(FUZZ, max_examples=60)

SUBNET = ipaddress.IPv4Network("10.9.0.0/24")
SERVER = ipaddress.IPv4Address("10.9.0.1")

GOOD = """\
openvpn:
  management: unix:/run/pocketproxy/openvpn-mgmt.sock
  subnet: 10.9.0.0/24
  server_address: 10.9.0.1
  push: ["dhcp-option DNS 10.9.0.1"]
proxy:
  listen: 12345
  sniff_ports: [80, 443]
  sniff_budget: 0.2
admin:
  socket: /run/pocketproxy/admin.sock
  mode: "0660"
directory:
  file: users.yaml
firewall:
  ipset: pocketproxy-clients
metrics:
  listen: tcp:9105:interface=127.0.0.1
"""

# Strings never contain NUL here; NUL in names has its own regression test at the end.
_TEXT = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=30)
_PLAUSIBLE = st.sampled_from(
    [
        "unix:/run/x.sock",
        "tcp:127.0.0.1:7505",
        "10.9.0.0/24",
        "10.9.0.1",
        "10.9.0.0/31",
        "::",
        "0.0.0.0",
        "0660",
        "0o660",
        "root",
        "nogroup",
        "users.yaml",
        "/nonexistent/file",
        "tcp:9105:interface=127.0.0.1",
        "tcp:99999",
        "unix:/tmp/m.sock",
        "ssl:443",
        "tun+",
        "redirect",
        "tproxy",
        "json",
        "text",
        "",
        "-",
    ]
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    _TEXT,
    _PLAUSIBLE,
)
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_TEXT, inner, max_size=3)), max_leaves=8)


def _sections():
    return {name: sorted(fields) for name, (_, fields) in config_module._SCHEMA.items()}


@st.composite
def config_trees(draw):
    """A mapping of (mostly) known sections to mappings of (mostly) known keys with random values."""
    sections = _sections()
    tree = {}
    for name in draw(st.lists(st.sampled_from(sorted(sections) + ["bogus"]), max_size=len(sections) + 1, unique=True)):
        if name == "bogus" or draw(st.integers(0, 9)) == 0:
            tree[name] = draw(_VALUES)
            continue
        keys = draw(st.lists(st.sampled_from(sections[name] + ["typo"]), unique=True, max_size=len(sections[name]) + 1))
        tree[name] = {key: draw(_VALUES) for key in keys}
    return tree


def _check_outcome(text, path):
    try:
        result = parse_config(text, path)
    except ConfigError as e:
        assert e.path == str(path)
        assert e.key is None or isinstance(e.key, str)
        assert str(e).startswith(str(path) + ": ")
        return e
    assert isinstance(result, Config)
    return result


@pytest.fixture(scope="module")
def cfgdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-config")
    (d / "users.yaml").write_text("devices: {}\nusers: {}\n")
    return d


def test_good_config_parses(cfgdir):
    """The base of the mutations is itself valid."""
    assert isinstance(parse_config(GOOD, cfgdir / "pp.yaml"), Config)


@TREES
@given(tree=config_trees())
def test_random_structures_give_config_or_config_error(cfgdir, tree):
    """Random trees under the known section and key names: a Config or a ConfigError naming the file."""
    try:
        text = yaml.safe_dump(tree, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        assume(False)
    _check_outcome(text, cfgdir / "pp.yaml")


@TREES
@given(tree=config_trees())
def test_random_values_on_top_of_a_good_file(cfgdir, tree):
    """A valid file with random sections/keys overriding it: same promise, and deeper validation is reached."""
    base = yaml.safe_load(GOOD)
    for name, section in tree.items():
        if isinstance(section, dict) and isinstance(base.get(name), dict):
            base[name].update(section)
        else:
            base[name] = section
    try:
        text = yaml.safe_dump(base, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        assume(False)
    _check_outcome(text, cfgdir / "pp.yaml")


@st.composite
def mutated_text(draw, base):
    text = list(base)
    alphabet = st.sampled_from(list(":{}[]-#&*!|>'\"%@`,? \t\n0123456789abcxyz.") + ["\u00e9", "\ufeff"])
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        if op == "insert":
            text.insert(pos, draw(alphabet))
        elif pos < len(text):
            if op == "delete":
                del text[pos : pos + draw(st.integers(1, 10))]
            else:
                text[pos] = draw(alphabet)
    return "".join(text)


@FUZZ
@given(text=mutated_text(GOOD))
def test_mutated_files_give_config_or_config_error(cfgdir, text):
    """Character-level mutations of a valid file (broken YAML included): Config or ConfigError."""
    _check_outcome(text, cfgdir / "pp.yaml")


# --- the users file ------------------------------------------------------------------------------

_FAST = dict(n=16, r=1, p=1)
_GOOD_HASH = hash_password("pw", salt=b"0123456789abcdef", **_FAST)
_HASHES = st.one_of(
    st.just(_GOOD_HASH),
    st.builds(
        lambda n, r, p, salt, digest: "scrypt$%s$%s$%s$%s$%s" % (n, r, p, salt, digest),
        st.sampled_from([0, 1, 2, 3, 16, 1024, 1 << 16, 1 << 20, 1 << 21, "x", "١٦"]),
        st.sampled_from([0, 1, 8, 64, 65]),
        st.sampled_from([0, 1, 16, 17]),
        st.sampled_from(["MDEyMw==", "abc", "a=b", "====", "", "MDEy\n"]),
        st.sampled_from(["ZGVm", "ZA==", "x", "=", ""]),
    ),
    _TEXT,
)
_USER_SPEC = st.dictionaries(
    st.sampled_from(["password", "common_name", "device", "address", "typo"]),
    st.one_of(_HASHES, st.sampled_from(["phone", "nophone", "10.9.0.7", "10.9.0.1", "cn-x"]), _VALUES),
    max_size=5,
)
_USERS = st.fixed_dictionaries(
    {},
    optional={
        "devices": st.one_of(
            st.dictionaries(
                st.one_of(st.just("phone"), _TEXT),
                st.one_of(
                    st.fixed_dictionaries(
                        {"upstream": st.one_of(st.sampled_from(["http://u:p@192.0.2.1:8080", "socks5://[::1]:1080", "http://[::1", "ftp://x", "http://h:0"]), _VALUES)}
                    ),
                    _VALUES,
                ),
                max_size=3,
            ),
            _VALUES,
        ),
        "users": st.one_of(st.dictionaries(st.one_of(st.sampled_from(["alice", "bob\n", ""]), _TEXT), _USER_SPEC, max_size=3), _VALUES),
        "extra": _VALUES,
    },
)


@FUZZ
@given(tree=_USERS)
def test_users_file_gives_directory_or_config_error(tree):
    """Random users files: a Directory or a ConfigError naming the file; never another exception."""
    try:
        text = yaml.safe_dump(tree, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        assume(False)
    try:
        directory = Directory.parse(text, "/etc/pocketproxy/users.yaml", SUBNET, SERVER)
    except ConfigError as e:
        assert e.path == "/etc/pocketproxy/users.yaml"
        return
    for user in directory.users.values():
        assert user.device.name in directory.devices
        if user.password_hash is not None and user.password_hash != _GOOD_HASH:
            # Whatever hash the loader accepted can be verified (cheap ones only here).
            n = int(user.password_hash.split("$")[1])
            if n <= 1024:
                assert verify_password("pw", user.password_hash) in (True, False)


@FUZZ
@given(text=mutated_text("devices:\n  phone: {upstream: 'http://u:p@192.0.2.1:8080'}\nusers:\n  alice: {device: phone, password: '%s', address: 10.9.0.7}\n" % _GOOD_HASH))
def test_mutated_users_files(text):
    """Mutated valid users files: a Directory or a ConfigError."""
    try:
        Directory.parse(text, "/u.yaml", SUBNET, SERVER)
    except ConfigError as e:
        assert e.path == "/u.yaml"


_DEV = "devices: {p: {upstream: 'http://192.0.2.1:8080'}}\n"


def _user(spec):
    return _DEV + "users: {u: {device: p, %s}}" % spec


_PW = "users.u.password"


@pytest.mark.parametrize(
    "text,key",
    [
        pytest.param(_DEV + "users: {u: {device: [1], common_name: c}}", "users.u.device", id="unhashable-device"),
        pytest.param(_DEV + "users: {u: {device: {a: 1}, common_name: c}}", "users.u.device", id="mapping-device"),
        pytest.param(_user("password: 'scrypt$16$1$1$abc$ZGVm'"), _PW, id="salt-not-base64"),
        pytest.param(_user("password: 'scrypt$16$1$1$MDEy$='"), _PW, id="empty-hash"),
        pytest.param(_user("password: 'scrypt$65536$8$1$MDEy$ZGVm'"), _PW, id="needs-more-than-maxmem"),
        pytest.param(_user("password: 'scrypt$1048576$1$1$MDEy$ZGVm'"), _PW, id="n-2^20-needs-128MiB"),
        pytest.param(_DEV + 'users: {"u\\n": {device: p, common_name: c}}', "users.u\n", id="name-with-newline"),
        pytest.param("[" * 700 + "]" * 700, None, id="deep-nesting"),
        pytest.param(_DEV + "extra: 2001-13-45", None, id="impossible-date"),
        pytest.param("devices: {p: %s}" % ("9" * 5000), None, id="5000-digit-integer"),
    ],
)
def test_users_file_hostile_cases_are_config_errors(text, key):
    """Each of these once escaped as TypeError/RecursionError/ValueError, or was accepted and then
    failed every login with binascii.Error/ValueError instead of a wrong-password deny."""
    with pytest.raises(ConfigError) as info:
        Directory.parse(text, "/u.yaml", SUBNET, SERVER)
    assert info.value.key == key


def test_accepted_hash_parameters_fit_the_memory_limit():
    """The largest N accepted with r=8 really verifies under SCRYPT_MAXMEM (and fails cleanly otherwise)."""
    encoded = "scrypt$32768$8$1$MDEyMw==$ZGVm"
    Directory.parse("devices: {p: {upstream: 'http://192.0.2.1:8080'}}\nusers: {u: {device: p, password: '%s'}}" % encoded)
    assert verify_password("pw", encoded) is False
    with pytest.raises(ValueError):
        hashlib.scrypt(b"pw", salt=b"0123", n=65536, r=8, p=1, maxmem=SCRYPT_MAXMEM, dklen=3)


def test_a_wrong_password_on_an_accepted_hash_is_auth_failed():
    """A loaded user with a syntactically odd but accepted hash is denied with AuthFailed, not a crash."""
    d = Directory.parse(
        "devices: {p: {upstream: 'http://192.0.2.1:8080'}}\nusers: {u: {device: p, password: '%s'}}" % _GOOD_HASH
    )
    failures = []
    d.authenticate("u", "wrong", None).addErrback(failures.append)
    assert failures and failures[0].check(AuthFailed)


# --- regressions: PyYAML's non-YAMLError failures and NUL bytes in names ----------------------------

_BASE = "openvpn: {management: 'unix:/x', subnet: 10.9.0.0/24, server_address: 10.9.0.1}\ndirectory: {file: users.yaml}\n"


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("[" * 700 + "]" * 700, id="deep-nesting"),
        pytest.param(_BASE + "proxy: {listen: 2001-13-45}\n", id="impossible-date"),
        pytest.param(_BASE + "proxy: {listen: %s}\n" % ("9" * 5000), id="5000-digit-integer"),
    ],
)
def test_config_yaml_that_pyyaml_cannot_construct_is_a_config_error(cfgdir, text):
    """YAML that PyYAML parses but cannot construct is a ConfigError, like any other bad YAML."""
    with pytest.raises(ConfigError):
        parse_config(text, cfgdir / "pp.yaml")


@pytest.mark.parametrize(
    "text,key",
    [
        pytest.param(_BASE.replace("file: users.yaml", 'file: "users\\0.yaml"'), "directory.file", id="directory.file"),
        pytest.param(_BASE + 'openvpn: {password_file: "/etc/pw\\0"}\n', "openvpn.password_file", id="password_file"),
        pytest.param(_BASE + 'admin: {group: "wheel\\0"}\n', "admin.group", id="admin.group"),
    ],
)
def test_config_nul_in_path_or_group_is_a_config_error(cfgdir, text, key):
    """A NUL byte in a file name or group name is reported against its key."""
    if key == "openvpn.password_file":
        text = _BASE.replace("server_address: 10.9.0.1}", 'server_address: 10.9.0.1, password_file: "/etc/pw\\0"}')
    with pytest.raises(ConfigError) as info:
        parse_config(text, cfgdir / "pp.yaml")
    assert info.value.key == key
