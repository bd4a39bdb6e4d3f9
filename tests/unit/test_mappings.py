"""Mapping table: owner-checked removal and closing live connections."""

import pytest

from proxy.mappings import MappingConflict, MappingTable, Route
from proxy.upstream import Upstream


class Conn:
    aborted = 0

    def abortConnection(self):
        self.aborted += 1


UP1 = Upstream.parse("http://u:secret@192.0.2.10:8080")
UP2 = Upstream.parse("socks5://192.0.2.11")


def test_lookup_add_remove_by_owner():
    """Only the owner (or anyone, when unspecified) removes a mapping."""
    table = MappingTable()
    table.add("10.9.0.2", UP1, owner="s1")
    assert table.lookup("10.9.0.2") == UP1
    with pytest.raises(MappingConflict):
        table.add("10.9.0.2", UP2, owner="s2")
    assert table.remove("10.9.0.2", owner="s2") is False
    assert table.lookup("10.9.0.2") == UP1
    assert table.remove("10.9.0.2", owner="s1") is True
    assert table.lookup("10.9.0.2") is None and len(table) == 0


def test_removal_and_change_close_live_connections():
    """Removing or changing a mapping aborts that client's live connections only."""
    table = MappingTable()
    table.add("10.9.0.2", UP1, owner="s1")
    table.add("10.9.0.3", UP1, owner="s2")
    c1, c2, c3 = Conn(), Conn(), Conn()
    table.register("10.9.0.2", c1)
    table.register("10.9.0.3", c2)
    assert table.live_count("10.9.0.2") == 1
    table.transfer("10.9.0.2", UP2, "s9")
    assert (c1.aborted, c2.aborted) == (1, 0)
    table.register("10.9.0.3", c3)
    table.unregister("10.9.0.3", c3)
    table.remove("10.9.0.3")
    assert (c2.aborted, c3.aborted) == (1, 0)
    assert table.owner("10.9.0.2") == "s9"


def test_upstream_parse_and_redaction():
    """Upstream URLs parse with defaults, and never show the password."""
    assert (UP2.scheme, UP2.host, UP2.port) == ("socks5", "192.0.2.11", 1080)
    assert "secret" not in repr(UP1) and "secret" not in str(UP1)
    assert UP1.password == "secret"
    for bad in ("ftp://x:1", "http://", "http://h:99999", "http://h:1/path", ""):
        with pytest.raises(ValueError):
            Upstream.parse(bad)


def test_bytes_and_log_fields_follow_the_mapping_owner():
    """Finished connections' bytes count for the current owner; a new owner or a removal starts over.
    An owner's ``log_fields`` are handed out as a copy; other owners give none."""
    t = MappingTable()
    t.add("10.9.0.2", UP1, owner="a")
    t.add_bytes("10.9.0.2", 10, 20)
    t.add_bytes("10.9.0.9", 1, 1)  # unmapped: ignored
    assert t.client_bytes("10.9.0.2") == (10, 20) and t.client_bytes("10.9.0.9") == (0, 0)
    t.transfer("10.9.0.2", UP1, "a")  # same owner: kept
    assert t.client_bytes("10.9.0.2") == (10, 20)
    route = Route(UP1, device="p1", log_fields={"user": "alice", "cid": 3})
    t.transfer("10.9.0.2", route, "b")  # the same user reconnecting: a new session counts afresh
    assert t.client_bytes("10.9.0.2") == (0, 0)
    fields = t.log_fields("10.9.0.2")
    assert fields == {"user": "alice", "cid": 3} and fields is not route.log_fields
    t.add_bytes("10.9.0.2", 5, 6)
    assert t.remove("10.9.0.2") and t.client_bytes("10.9.0.2") == (0, 0)
    assert t.log_fields("10.9.0.2") == {}
