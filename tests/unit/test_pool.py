"""Address pool: unique addresses, statics reserved, nothing reused before release."""

import ipaddress

import pytest

from ovpnmgr.pool import AddressInUse, AddressPool, PoolExhausted

IP = ipaddress.IPv4Address


def test_dynamic_allocation_skips_server_and_statics():
    """Dynamic addresses never hit the server address or a reserved static one."""
    pool = AddressPool("10.9.0.0/29", "10.9.0.1", static=["10.9.0.3"])
    got = [pool.allocate(k) for k in "abcd"]
    assert got == [IP("10.9.0.2"), IP("10.9.0.4"), IP("10.9.0.5"), IP("10.9.0.6")]
    with pytest.raises(PoolExhausted):
        pool.allocate("e")
    assert pool.allocate("s", static="10.9.0.3") == IP("10.9.0.3")


def test_allocate_is_idempotent_and_release_goes_to_back():
    """The same key keeps its address; a released address is handed out last."""
    pool = AddressPool("10.9.0.0/24", "10.9.0.1")
    a = pool.allocate("a")
    assert pool.allocate("a") == a
    b = pool.allocate("b")
    assert pool.release("a") == a
    assert pool.release("a") is None
    c = pool.allocate("c")
    assert c not in (a, b)
    assert pool.owner(a) is None and pool.owner(c) == "c"


def test_static_in_use_and_transfer():
    """A held static address is refused to another key until transferred."""
    pool = AddressPool("10.9.0.0/24", "10.9.0.1", static=["10.9.0.10"])
    pool.allocate("old", static="10.9.0.10")
    with pytest.raises(AddressInUse) as info:
        pool.allocate("new", static="10.9.0.10")
    assert info.value.owner == "old"
    assert pool.transfer("10.9.0.10", "new") == "old"
    assert pool.owner("10.9.0.10") == "new"
    assert pool.address_of("old") is None
    assert pool.release("old") is None


def test_claim_validates():
    """Rebuilding from status: claims outside the subnet or of the server address are refused."""
    pool = AddressPool("10.9.0.0/24", "10.9.0.1")
    assert pool.claim("x", "10.9.0.77") == IP("10.9.0.77")
    with pytest.raises(AddressInUse):
        pool.claim("y", "10.9.0.77")
    for bad in ("10.8.0.5", "10.9.0.1", "10.9.0.255", "10.9.0.0"):
        with pytest.raises(ValueError):
            pool.claim("z", bad)
    assert pool.allocate("w") != IP("10.9.0.77")


def test_invalid_static_rejected():
    """Statics outside the subnet are a configuration error."""
    with pytest.raises(ValueError):
        AddressPool("10.9.0.0/24", "10.9.0.1", static=["10.10.0.3"])


def test_large_pool_allocation_is_fast():
    """Thousands of allocations on a /16 stay unique (the admission hot path)."""
    pool = AddressPool("10.9.0.0/16", "10.9.0.1")
    got = {pool.allocate(i) for i in range(5000)}
    assert len(got) == 5000
