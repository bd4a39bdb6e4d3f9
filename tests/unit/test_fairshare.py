"""fairshare.refusal: co-tenants of one phone share its proxy's client limit."""

from proxy import fairshare
from proxy.mappings import MappingTable
from proxy.upstream import Upstream

PHONE = Upstream.parse("http://192.0.2.10:8080")
OTHER = Upstream.parse("http://192.0.2.11:8080")


class Conn:
    def abortConnection(self):
        pass


def table(*clients, upstream=PHONE):
    t = MappingTable()
    for i, ip in enumerate(clients):
        t.add(ip, upstream, owner=i)
    return t


def open_until_refused(t, ip, limit, upstream=PHONE, most=1000):
    opened = 0
    while opened < most and fairshare.refusal(t, ip, upstream, limit) is None:
        t.register(ip, Conn())
        opened += 1
    return opened


def test_no_limit_no_refusal():
    t = table("10.9.0.5")
    assert open_until_refused(t, "10.9.0.5", None, most=500) == 500


def test_a_lone_client_gets_the_whole_device():
    t = table("10.9.0.5")
    assert open_until_refused(t, "10.9.0.5", 50) == 50


def test_a_greedy_client_leaves_the_co_tenant_its_share():
    t = table("10.9.0.5", "10.9.0.6")
    assert open_until_refused(t, "10.9.0.5", 50) == 25
    assert open_until_refused(t, "10.9.0.6", 50) == 25
    assert "fair share 25" in fairshare.refusal(t, "10.9.0.6", PHONE, 50)


def test_the_remainder_is_used_but_never_a_share_owed():
    t = table("10.9.0.5", "10.9.0.6", "10.9.0.7")  # 50 // 3 = 16, remainder 2
    assert open_until_refused(t, "10.9.0.5", 50) == 18
    assert open_until_refused(t, "10.9.0.6", 50) == 16
    assert open_until_refused(t, "10.9.0.7", 50) == 16


def test_clients_of_another_device_do_not_count():
    t = table("10.9.0.5")
    t.add("10.9.0.6", OTHER, owner="x")
    assert open_until_refused(t, "10.9.0.5", 50) == 50


def test_remapping_moves_a_client_between_devices():
    t = table("10.9.0.5", "10.9.0.6")
    assert t.co_tenants(PHONE) == {t._key("10.9.0.5"), t._key("10.9.0.6")}
    t.add("10.9.0.6", OTHER, owner=1)
    assert t.co_tenants(PHONE) == {t._key("10.9.0.5")} and t.co_tenants(OTHER) == {t._key("10.9.0.6")}
    t.remove("10.9.0.5")
    assert t.co_tenants(PHONE) == frozenset()
