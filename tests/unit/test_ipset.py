"""Unit tests for ovpnmgr.ipset: error mapping, the netlink adapter over a fake socket, FakeIPSet."""

import errno
import socket
import threading
from ipaddress import IPv4Address

import pytest

from ovpnmgr.ipset import (
    IPSET_ERR_EXIST,
    IPSET_ERR_HASH_FULL,
    FakeIPSet,
    IPSetError,
    NetlinkIPSet,
    describe_error,
)

pyroute2 = pytest.importorskip("pyroute2")
from pyroute2 import NetlinkError  # noqa: E402

A = IPv4Address("10.9.0.5")
B = IPv4Address("10.9.0.6")


# --- error messages ---------------------------------------------------------


def test_hash_full_has_a_human_message():
    """Kernel code 4352 (IPSET_ERR_HASH_FULL) reads 'set is full', not 'Unknown error 4352'."""
    assert describe_error("add", IPSET_ERR_HASH_FULL) == "set is full (maxelem reached)"


def test_exist_code_depends_on_operation():
    """IPSET_ERR_EXIST means 'already in' for add and 'not in' for delete."""
    assert describe_error("add", IPSET_ERR_EXIST) == "element is already in the set"
    assert describe_error("delete", IPSET_ERR_EXIST) == "element is not in the set"


def test_plain_errno_and_unknown_codes():
    """errnos get the set-specific or strerror text; unknown ipset codes are named by number."""
    assert describe_error("add", errno.ENOENT) == "set does not exist"
    assert describe_error("create", errno.EEXIST).startswith("a set with this name already exists")
    assert describe_error("add", errno.EBUSY) == "Device or resource busy"
    assert describe_error("add", 4999) == "ipset error code 4999"


def test_ipset_error_str_names_operation_set_ip_and_reason():
    """str(IPSetError) carries everything an operator needs."""
    e = IPSetError("add", "pp-clients", A, IPSET_ERR_HASH_FULL)
    assert str(e) == "ipset add 10.9.0.5 on set 'pp-clients' failed: set is full (maxelem reached) (error 4352)"
    assert (e.operation, e.set_name, e.ip, e.errno) == ("add", "pp-clients", A, 4352)
    assert IPSetError("flush", "s", None, 2, "custom").message == "custom"


# --- NetlinkIPSet over a fake pyroute2 socket --------------------------------


class _Attrs:
    """Mimics pyroute2's nla objects: get_attr / get_attrs over (name, value) pairs."""

    def __init__(self, **attrs):
        self.attrs = attrs

    def get_attr(self, name):
        value = self.attrs.get(name)
        return value[0] if isinstance(value, list) else value

    def get_attrs(self, name):
        value = self.attrs.get(name)
        return value if isinstance(value, list) else ([] if value is None else [value])


def _member(ip):
    return _Attrs(IPSET_ATTR_IP_FROM=_Attrs(IPSET_ATTR_IPADDR_IPV4=ip))


class FakeSock:
    """Records calls; ``raises[method]`` is raised on the next call of that method."""

    instances = []

    def __init__(self):
        self.calls = []
        self.raises = {}
        self.listing = []
        self.closed = False
        FakeSock.instances.append(self)

    def _do(self, name, *args, **kwargs):
        self.calls.append((name, args, kwargs))
        exc = self.raises.pop(name, None)
        if exc is not None:
            raise exc

    def create(self, *args, **kwargs):
        self._do("create", *args, **kwargs)

    def add(self, *args, **kwargs):
        self._do("add", *args, **kwargs)

    def delete(self, *args, **kwargs):
        self._do("delete", *args, **kwargs)

    def flush(self, *args, **kwargs):
        self._do("flush", *args, **kwargs)

    def list(self, *args, **kwargs):
        # Like pyroute2 0.9: a lazy generator that raises only while iterated.
        self.calls.append(("list", args, kwargs))
        exc = self.raises.pop("list", None)

        def gen():
            if exc is not None:
                raise exc
            yield from self.listing

        return gen()

    def close(self):
        self.closed = True


@pytest.fixture
def adapter():
    FakeSock.instances = []
    return NetlinkIPSet("pp-clients", maxelem=100, ipset_factory=FakeSock)


def test_ensure_creates_hash_ip_inet_non_exclusively(adapter):
    """ensure() asks for hash:ip, AF_INET, the configured maxelem, and tolerates an identical set."""
    adapter.ensure()
    sock = FakeSock.instances[0]
    assert sock.calls == [
        ("create", ("pp-clients",), dict(stype="hash:ip", family=socket.AF_INET, exclusive=False, maxelem=100))
    ]


def test_ensure_accepts_existing_hash_ip_with_other_options(adapter):
    """EEXIST from create is fine when the existing set is hash:ip inet (e.g. another maxelem)."""
    adapter.ensure()
    sock = FakeSock.instances[0]
    sock.raises["create"] = NetlinkError(errno.EEXIST)
    sock.listing = [
        _Attrs(
            IPSET_ATTR_TYPENAME="hash:ip",
            IPSET_ATTR_FAMILY=socket.AF_INET,
            IPSET_ATTR_DATA=_Attrs(IPSET_ATTR_MAXELEM=5),
        )
    ]
    adapter.ensure()
    assert [c[0] for c in sock.calls] == ["create", "create", "list"]


def test_ensure_refuses_existing_set_of_another_type(adapter):
    """A same-named hash:net set is an IPSetError naming the actual type."""
    adapter.ensure()
    sock = FakeSock.instances[0]
    sock.raises["create"] = NetlinkError(errno.EEXIST)
    sock.listing = [_Attrs(IPSET_ATTR_TYPENAME="hash:net", IPSET_ATTR_FAMILY=socket.AF_INET)]
    with pytest.raises(IPSetError) as info:
        adapter.ensure()
    assert info.value.errno == errno.EEXIST
    assert "hash:net family inet" in str(info.value)


def test_add_and_delete_are_idempotent_requests(adapter):
    """add/delete send the address as text with exclusive=False (present/absent is not an error)."""
    adapter.add(A)
    adapter.delete("10.9.0.6")
    sock = FakeSock.instances[0]
    assert sock.calls == [
        ("add", ("pp-clients", "10.9.0.5"), dict(family=socket.AF_INET, exclusive=False)),
        ("delete", ("pp-clients", "10.9.0.6"), dict(family=socket.AF_INET, exclusive=False)),
    ]


def test_add_maps_hash_full_netlink_error(adapter):
    """NetlinkError 4352 on add becomes IPSetError('add', set, ip, 4352, 'set is full ...')."""
    adapter.ensure()
    FakeSock.instances[0].raises["add"] = NetlinkError(IPSET_ERR_HASH_FULL)
    with pytest.raises(IPSetError) as info:
        adapter.add(A)
    e = info.value
    assert (e.operation, e.set_name, e.ip, e.errno) == ("add", "pp-clients", A, IPSET_ERR_HASH_FULL)
    assert "set is full" in str(e)


def test_members_parses_every_dump_message(adapter):
    """members() collects IPv4 addresses across all messages of a (multi-part) dump."""
    adapter.ensure()
    FakeSock.instances[0].listing = [
        _Attrs(IPSET_ATTR_ADT=_Attrs(IPSET_ATTR_DATA=[_member("10.9.0.5"), _member("10.9.0.6")])),
        _Attrs(),  # a part without members
        _Attrs(IPSET_ATTR_ADT=_Attrs(IPSET_ATTR_DATA=[_member("10.9.0.7")])),
    ]
    assert adapter.members() == {A, B, IPv4Address("10.9.0.7")}


def test_members_error_raised_while_iterating_is_mapped(adapter):
    """pyroute2 0.9 raises from the dump generator; that still becomes IPSetError(ENOENT)."""
    adapter.ensure()
    FakeSock.instances[0].raises["list"] = NetlinkError(errno.ENOENT)
    with pytest.raises(IPSetError) as info:
        adapter.members()
    assert info.value.errno == errno.ENOENT
    assert info.value.operation == "list"
    assert "set does not exist" in str(info.value)


def test_socket_failure_reopens(adapter):
    """An OSError closes the socket; the next call opens a fresh one."""
    adapter.ensure()
    first = FakeSock.instances[0]
    first.raises["flush"] = OSError(errno.ENOBUFS, "No buffer space available")
    with pytest.raises(IPSetError) as info:
        adapter.flush()
    assert info.value.errno == errno.ENOBUFS
    assert first.closed
    adapter.flush()
    assert len(FakeSock.instances) == 2


def test_second_thread_is_refused(adapter):
    """The long-lived socket is bound to the thread that opened it (pyroute2 0.9 rule)."""
    adapter.ensure()
    seen = []
    t = threading.Thread(target=lambda: seen.append(pytest.raises(RuntimeError, adapter.add, A)))
    t.start()
    t.join()
    assert seen and "second thread" in str(seen[0].value)


def test_rejects_non_ipv4(adapter):
    """IPv6 or garbage never reaches the kernel."""
    with pytest.raises(ValueError):
        adapter.add("fd00::1")
    assert FakeSock.instances == []


# --- FakeIPSet -----------------------------------------------------------------


def test_fake_behaves_like_a_set():
    """add is idempotent, delete of an absent member is fine, members() is a copy."""
    fake = FakeIPSet(members=["10.9.0.5"])
    fake.add(A)
    fake.add(B)
    fake.delete(IPv4Address("10.9.0.99"))
    got = fake.members()
    got.clear()
    assert fake.members() == {A, B}
    fake.flush()
    assert fake.members() == set()


def test_fake_fail_add_true_fails_every_add_and_changes_nothing():
    """FakeIPSet(fail_add=True) makes every add raise an IPSetError; content stays the same."""
    fake = FakeIPSet(fail_add=True)
    for _ in range(2):
        with pytest.raises(IPSetError) as info:
            fake.add(A)
        assert info.value.operation == "add" and info.value.ip == A
    assert fake.members() == set()
    fake.fail_add = None
    fake.add(A)
    assert fake.members() == {A}


def test_fake_fail_next_add_is_one_shot():
    """fake.fail_next_add = IPSetError(...) raises exactly that error once."""
    fake = FakeIPSet()
    injected = IPSetError("add", fake.name, A, IPSET_ERR_HASH_FULL)
    fake.fail_next_add = injected
    with pytest.raises(IPSetError) as info:
        fake.add(A)
    assert info.value is injected
    assert fake.fail_next_add is None
    fake.add(A)
    assert fake.members() == {A}


def test_fake_injection_for_other_operations():
    """fail_delete / fail_members / fail_ensure / fail_flush work the same way, with custom errors too."""
    custom = IPSetError("delete", "s", A, errno.EPERM, "nope")
    fake = FakeIPSet(members=[A], fail_delete=custom, fail_next_members=True)
    with pytest.raises(IPSetError) as info:
        fake.delete(A)
    assert info.value is custom
    with pytest.raises(IPSetError):
        fake.members()
    assert fake.members() == {A}
    fake.fail_ensure = True
    with pytest.raises(IPSetError):
        fake.ensure()
    with pytest.raises(TypeError):
        FakeIPSet(fail_bogus=True)


def test_fake_full_and_missing_set_mimic_the_kernel():
    """maxelem overflow says 'set is full'; a set that does not exist yet says ENOENT until ensure()."""
    fake = FakeIPSet(maxelem=1, members=[A])
    fake.add(A)  # already present: no growth, no error
    with pytest.raises(IPSetError) as info:
        fake.add(B)
    assert info.value.errno == IPSET_ERR_HASH_FULL and "set is full" in str(info.value)

    missing = FakeIPSet(exists=False)
    with pytest.raises(IPSetError) as info:
        missing.add(A)
    assert info.value.errno == errno.ENOENT
    missing.ensure()
    missing.add(A)
    assert missing.calls == [("add", A), ("ensure", None), ("add", A)]
