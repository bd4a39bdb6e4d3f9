"""Users file: validation errors name the key; scrypt and certificate authentication."""

import ipaddress

import pytest
from twisted.internet import defer

from ovpnmgr.config import ConfigError
from ovpnmgr.directory import AuthFailed, Directory, hash_password, verify_password

# A fast hash for tests (N=16); production defaults are in hash_password().
HASH = hash_password("s3cret", n=16)

USERS = """
devices:
  phone1: {upstream: "http://dev:pw@192.168.255.2:8080"}
  phone2: {upstream: "socks5://192.168.255.3:1080"}
users:
  alice: {password: "%s", device: phone1, address: 10.9.0.10}
  bob: {common_name: bob-laptop, device: phone2}
  carol: {password: "%s", common_name: carol-cert, device: phone2}
""" % (HASH, HASH)

SUBNET = ipaddress.IPv4Network("10.9.0.0/24")


def _dir(text=USERS):
    return Directory.parse(text, "users.yaml", SUBNET, ipaddress.IPv4Address("10.9.0.1"))


def _auth(directory, username, password, cn):
    d = directory.authenticate(username, password, cn)
    results = []
    d.addBoth(results.append)
    return results[0]


def test_hash_roundtrip():
    """hash_password output verifies and wrong passwords do not."""
    h = hash_password("pw", n=16)
    assert h.startswith("scrypt$16$8$1$")
    assert verify_password("pw", h) and not verify_password("px", h)
    assert not verify_password("pw", "garbage")


def test_password_and_certificate_logins():
    """Password users, certificate-only users and users needing both."""
    d = _dir()
    assert _auth(d, "alice", "s3cret", "whatever").name == "alice"
    assert _auth(d, "UNDEF", "", "bob-laptop").name == "bob"
    assert _auth(d, "carol", "s3cret", "carol-cert").name == "carol"
    assert d.users["alice"].address == ipaddress.IPv4Address("10.9.0.10")
    assert d.static_addresses() == {ipaddress.IPv4Address("10.9.0.10")}


@pytest.mark.parametrize(
    "username,password,cn",
    [
        ("alice", "wrong", ""),
        ("mallory", "s3cret", ""),
        ("bob", "anything", "bob-laptop"),  # cert-only user offering a password
        ("alice", "", "alice"),  # password user without password
        ("carol", "s3cret", "other-cert"),  # CN mismatch
        ("", "", ""),
    ],
)
def test_refusals(username, password, cn):
    """Every wrong credential combination fails with AuthFailed."""
    result = _auth(_dir(), username, password, cn)
    assert isinstance(result.value, AuthFailed)


def test_verified_password_is_cached_but_wrong_one_is_not():
    """A second login with the same password skips scrypt; a wrong one still fails."""
    d = _dir()
    calls = []

    def counting(f, *args):
        calls.append(f)
        return defer.maybeDeferred(f, *args)

    d.authenticate("alice", "s3cret", "", counting)
    d.authenticate("alice", "s3cret", "", counting)
    assert len(calls) == 1
    r = []
    d.authenticate("alice", "nope", "", counting).addErrback(r.append)
    assert len(calls) == 2 and r[0].check(AuthFailed)


@pytest.mark.parametrize(
    "old,new,key",
    [
        ("device: phone1,", "device: phone9,", "users.alice.device"),
        ('upstream: "socks5://192.168.255.3:1080"', 'upstream: "gopher://x"', "devices.phone2.upstream"),
        ("address: 10.9.0.10", "address: 10.9.1.10", "users.alice.address"),
        ("address: 10.9.0.10", "address: 10.9.0.1", "users.alice.address"),
        ("common_name: carol-cert", "common_name: bob-laptop", "users.carol.common_name"),
        ("{common_name: bob-laptop, device: phone2}", "{device: phone2}", "users.bob"),
        ("{common_name: bob-laptop, device: phone2}", "{common_name: x, device: phone2, colour: red}", "users.bob.colour"),
        ("{common_name: bob-laptop, device: phone2}", "{common_name: bob-laptop, device: phone2, tunnel: half}", "users.bob.tunnel"),
        ("{common_name: bob-laptop, device: phone2}", "{common_name: bob-laptop, device: phone2, private_networks: yes}", "users.bob.private_networks"),
        ('1080"}', '1080", max_clients: 0}', "devices.phone2.max_clients"),
        ('1080"}', '1080", max_clients: many}', "devices.phone2.max_clients"),
        ('1080"}', '1080", max_clients: true}', "devices.phone2.max_clients"),
        ('1080"}', '1080", health_target: "gopher://x/"}', "devices.phone2.health_target"),
        ('1080"}', '1080", rotate: {command: "rotate.sh"}}', "devices.phone2.rotate.command"),
        ('1080"}', '1080", rotate: {command: [x], url: "http://a/"}}', "devices.phone2.rotate"),
        ('1080"}', '1080", rotate: {url: "ftp://a/"}}', "devices.phone2.rotate.url"),
        ('1080"}', '1080", rotate: {url: "http://a/", method: DELETE}}', "devices.phone2.rotate.method"),
        ('1080"}', '1080", rotate: {command: [x], method: POST}}', "devices.phone2.rotate.method"),
        ('1080"}', '1080", rotate: {command: [x], shell: true}}', "devices.phone2.rotate.shell"),
    ],
)
def test_users_file_errors_name_the_key(old, new, key):
    """Each users-file problem names the dotted key."""
    assert old in USERS
    with pytest.raises(ConfigError) as info:
        _dir(USERS.replace(old, new))
    assert info.value.key == key
    assert info.value.path == "users.yaml"


def test_tunnel_per_user():
    """A user may opt into (or out of) the split tunnel; unset means the daemon's openvpn.tunnel."""
    d = _dir(USERS.replace("{common_name: bob-laptop, device: phone2}", "{common_name: bob-laptop, device: phone2, tunnel: split}"))
    assert d.users["bob"].tunnel == "split" and d.users["alice"].tunnel is None


def test_private_networks_and_device_capacity():
    """Private ranges are denied unless a user opts in; a device may state its proxy's client limit."""
    d = _dir(
        USERS.replace('1080"}', '1080", max_clients: 50}').replace(
            "{common_name: bob-laptop, device: phone2}", "{common_name: bob-laptop, device: phone2, private_networks: allow}"
        )
    )
    assert d.users["bob"].private_networks == "allow" and d.users["alice"].private_networks == "deny"
    assert d.devices["phone2"].max_clients == 50 and d.devices["phone1"].max_clients is None


def test_bad_hash_refused():
    """A password that is not a scrypt hash is refused with a hint."""
    with pytest.raises(ConfigError) as info:
        _dir(USERS.replace(HASH, "plaintext", 1))
    assert "hash-password" in info.value.problem


def test_passwords_not_in_repr():
    """The hash does not leak through repr of a user."""
    assert "scrypt" not in repr(_dir().users["alice"])


def test_a_device_may_name_its_own_health_probe_target():
    d = _dir(USERS.replace('1080"}', '1080", health_target: "http://203.0.113.10/whoami"}'))
    assert str(d.devices["phone2"].health_target) == "http://203.0.113.10:80/whoami"
    assert d.devices["phone1"].health_target is None


def test_a_device_may_have_a_rotation_action():
    d = _dir(USERS.replace('1080"}', '1080", rotate: {url: "http://192.168.255.3:8000/rotate", method: GET}}'))
    assert d.devices["phone2"].rotate.url == "http://192.168.255.3:8000/rotate" and d.devices["phone2"].rotate.method == "GET"
    d = _dir(USERS.replace('1080"}', '1080", rotate: {command: [/usr/local/bin/rotate, phone2, 3]}}'))
    assert d.devices["phone2"].rotate.command == ("/usr/local/bin/rotate", "phone2", "3")
