"""ovpnmgr.pgdirectory with fakes (the real server: tests/integration/test_postgres_directory.py):
rows become the users file's mapping, the DSN's password never shows, and the follower's life:
a notification re-reads once per burst, an unreachable database is retried with back-off, a lost
LISTEN connection is re-established and the directory read again for what it missed."""

import ipaddress
import os

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from ovpnmgr import pgdirectory
from ovpnmgr.config import ConfigError, parse_config
from ovpnmgr.directory import Directory, hash_password
from ovpnmgr.pgdirectory import BACKOFF, REREAD_DELAY, PostgresDirectory, fetch_mapping, source_name

HASH = hash_password("pw", n=1024, r=8, p=1)
DEVICES = [("phone", "http://dev:secret@192.168.255.2:8080", None, 50, None, {"command": ["rotate-it"]})]
OPENVPN = "openvpn:\n  management: unix:/run/openvpn/mgmt.sock\n  subnet: 10.9.0.0/24\n  server_address: 10.9.0.1\n"
USERS = [
    ("alice", HASH, None, "phone", "10.9.0.77", None, "deny"),
    ("carol", None, "carol-cn", "phone", None, "split", "allow"),
]


class Cursor:
    def __init__(self, tables):
        self.tables = tables
        self.rows = None

    def execute(self, sql):
        self.rows = self.tables["devices" if "FROM devices" in sql else "users"]

    def fetchall(self):
        return list(self.rows)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Connection:
    def __init__(self, tables=None):
        self.tables = tables or {"devices": DEVICES, "users": USERS}
        self.closed = False

    def cursor(self):
        return Cursor(self.tables)


def test_rows_become_the_users_files_mapping_and_a_directory():
    mapping = fetch_mapping(Connection())
    assert mapping["devices"] == {"phone": {"upstream": DEVICES[0][1], "max_clients": 50, "rotate": {"command": ["rotate-it"]}}}
    assert mapping["users"]["alice"] == {"device": "phone", "private_networks": "deny", "password": HASH, "address": "10.9.0.77"}
    directory = Directory.from_mapping(mapping, "postgres:dbname=x", ipaddress.ip_network("10.9.0.0/24"), ipaddress.ip_address("10.9.0.1"))
    assert directory.users["carol"].common_name == "carol-cn" and directory.users["carol"].tunnel == "split"
    assert directory.devices["phone"].rotate.command == ("rotate-it",)


def test_a_bad_row_is_refused_naming_the_database_and_the_key():
    users = [("alice", "plaintext", None, "phone", None, None, "deny")]
    with pytest.raises(ConfigError, match=r"postgres:dbname=x: users\.alice\.password: not a scrypt hash"):
        Directory.from_mapping(fetch_mapping(Connection({"devices": DEVICES, "users": users})), "postgres:dbname=x")


def config(tmp_path, dsn="host=/run/postgresql dbname=pocketproxy user=pp", extra=""):
    path = tmp_path / "pocketproxy.yaml"
    text = (
        OPENVPN +
        "directory:\n  backend: postgres\n  dsn: '%s'\n%s" % (dsn, extra)
    )
    path.write_text(text)
    return parse_config(text, path)


def test_the_source_name_never_carries_a_password(tmp_path):
    c = config(tmp_path, dsn="host=/run/postgresql port=5432 dbname=pocketproxy user=pp sslmode=require")
    assert source_name(c) == "postgres:host=/run/postgresql port=5432 dbname=pocketproxy user=pp"


@pytest.mark.parametrize(
    "directory,key,words",
    [
        ("  backend: postgres\n", "directory.dsn", "required with backend postgres"),
        ("  backend: postgres\n  dsn: 'dbname=x password=hunter2'\n", "directory.dsn", "password_file"),
        ("  backend: postgres\n  dsn: 'postgresql://pp:hunter2@db/x'\n", "directory.dsn", "password_file"),
        ("  backend: file\n", "directory.file", "required key is missing"),
        ("  backend: file\n  file: %(users)s\n  dsn: 'dbname=x'\n", "directory.dsn", "only used with directory.backend: postgres"),
        ("  backend: postgres\n  dsn: 'dbname=x'\n  file: %(users)s\n", "directory.file", "not used with directory.backend: postgres"),
        ("  backend: mysql\n", "directory.backend", "expected one of file, postgres"),
    ],
)
def test_directory_backend_errors_name_the_key(tmp_path, directory, key, words):
    users = tmp_path / "users.yaml"
    users.write_text("devices: {}\nusers: {}\n")
    text = OPENVPN + "directory:\n" + directory % {"users": users}
    with pytest.raises(ConfigError) as e:
        parse_config(text, tmp_path / "pocketproxy.yaml")
    assert key in str(e.value) and words in str(e.value), str(e.value)
    assert "hunter2" not in str(e.value)


# --- the follower -------------------------------------------------------------------------------


class PGconn:
    """libpq's connection as the follower uses it: a socket, input to consume, notifications."""

    def __init__(self):
        self.read_end, self.write_end = os.pipe()
        self.socket = self.read_end
        self.pending = 0
        self.status = 0
        self.broken = False

    def consume_input(self):
        if self.broken:
            import psycopg

            raise psycopg.OperationalError("server closed the connection unexpectedly")

    def notifies(self):
        if self.pending:
            self.pending -= 1
            return object()
        return None


class ListenConnection(Connection):
    def __init__(self):
        super().__init__()
        self.pgconn = PGconn()
        self.executed = []

    def execute(self, sql):
        self.executed.append(sql)

    def close(self):
        self.closed = True
        for fd in (self.pgconn.read_end, self.pgconn.write_end):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Operations:
    def __init__(self):
        self.reloaded = []

    def reload(self, directory):
        self.reloaded.append(directory)
        return {"users": len(directory.users), "added": 0, "removed": 0, "changed": 0, "kicked": 0, "path": directory.path}


class Database:
    """``connect(config)``: hands out connections, or raises while ``down``."""

    def __init__(self):
        self.down = False
        self.connections = []

    def __call__(self, config):
        if self.down:
            import psycopg

            raise psycopg.OperationalError("connection refused")
        c = ListenConnection()
        self.connections.append(c)
        return c


def make_follower(tmp_path, monkeypatch, down=False):
    """A started follower on a fake database (``down``: unreachable at start)."""
    pytest.importorskip("psycopg")
    monkeypatch.setattr(pgdirectory, "check", lambda connection: 1)
    reactor, db, ops = MemoryReactorClock(), Database(), Operations()
    db.down = down
    f = PostgresDirectory(reactor, config(tmp_path), ops, run_in_thread=lambda fn, *a: defer.maybeDeferred(fn, *a), connect=db)
    f.startService()
    return reactor, db, ops, f


def stop(db, f):
    f.stopService()
    for c in db.connections:
        c.close()


@pytest.fixture
def follower(tmp_path, monkeypatch):
    """A follower past its first read (the read once LISTEN is up: see the first test)."""
    reactor, db, ops, f = make_follower(tmp_path, monkeypatch)
    reactor.advance(REREAD_DELAY)
    assert len(ops.reloaded) == 1
    ops.reloaded.clear()
    yield reactor, db, ops, f
    stop(db, f)


def test_listens_reads_once_and_a_burst_of_notifications_is_read_once(tmp_path, monkeypatch):
    reactor, db, ops, f = make_follower(tmp_path, monkeypatch)
    listener = db.connections[0]
    assert listener.executed == ["LISTEN pp_directory"] and f.connected and len(reactor.getReaders()) == 1
    # Once changes are notified it reads once: what was committed between the start's read
    # (before the reactor ran) and the LISTEN would otherwise never be seen.
    reactor.advance(REREAD_DELAY)
    assert len(ops.reloaded) == 1
    listener.pgconn.pending = 3
    reactor.getReaders()[0].doRead()
    listener.pgconn.pending = 1
    reactor.getReaders()[0].doRead()
    reactor.advance(REREAD_DELAY)
    assert len(ops.reloaded) == 2 and f.notifications == 4
    assert set(ops.reloaded[1].users) == {"alice", "carol"}
    stop(db, f)


def test_an_unreachable_database_is_retried_with_back_off_and_read_when_back(tmp_path, monkeypatch):
    reactor, db, ops, f = make_follower(tmp_path, monkeypatch, down=True)
    assert not f.connected
    delays = [call.getTime() for call in reactor.getDelayedCalls()]
    assert delays == [BACKOFF[0]]
    reactor.advance(BACKOFF[0])
    assert [call.getTime() - reactor.seconds() for call in reactor.getDelayedCalls()] == [BACKOFF[1]]
    db.down = False
    reactor.advance(BACKOFF[1])
    assert f.connected
    reactor.advance(REREAD_DELAY)
    assert len(ops.reloaded) == 1  # read again: changes made while unreachable were not notified
    stop(db, f)


def test_a_lost_listen_connection_is_reestablished_and_the_directory_read_again(follower):
    reactor, db, ops, f = follower
    first = db.connections[0]
    first.pgconn.broken = True
    reader = reactor.getReaders()[0]
    why = reader.doRead()
    assert isinstance(why, ConnectionError)
    reader.connectionLost(Failure(why))  # what the reactor does with a doRead that returned an error
    assert not f.connected and first.closed and reactor.getReaders() == []
    reactor.advance(BACKOFF[0])
    assert f.connected and len(db.connections) >= 2
    reactor.advance(REREAD_DELAY)
    assert len(ops.reloaded) == 1


def test_a_failed_reread_keeps_the_directory_and_tries_again(follower):
    reactor, db, ops, f = follower
    db.down = True
    f.reread()
    assert ops.reloaded == []
    db.down = False
    reactor.advance(BACKOFF[2])
    assert len(ops.reloaded) == 1


def test_pp_reload_reads_now_and_reports_a_failure(follower):
    reactor, db, ops, f = follower
    got = []
    f.read_now().addCallback(got.append)
    assert got[0]["users"] == 2
    db.down = True
    failed = []
    f.read_now().addErrback(failed.append)
    assert failed and failed[0].check(ConfigError) and "cannot read the directory" in str(failed[0].value)
