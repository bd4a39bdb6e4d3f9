"""The shared directory's schema (issue 17) against a real PostgreSQL server the tests start
(``initdb``/``pg_ctl`` in a temp directory, unix socket only, always stopped): ``pocketproxyctl db
migrate`` as an operator runs it, the constraints a billing platform's own SQL meets, the change
notifications every gateway will follow, and the refusals of a schema this pocketproxy does not
know. Each test gets its own database on the module's server."""

import itertools
import json
import subprocess
import sys
import time

import pytest

from tests.lab.netns import require_root

psycopg = pytest.importorskip("psycopg", reason="the PostgreSQL driver (python3-psycopg / psycopg) is not installed")

from ovpnmgr import migrations  # noqa: E402
from tests.lab.postgres import PostgresServer, bindir  # noqa: E402

HASH = "scrypt$16384$8$1$c2FsdA==$aGFzaA=="
_names = itertools.count()


@pytest.fixture(scope="module")
def server():
    require_root()
    if bindir() is None:
        pytest.fail("PostgreSQL server binaries missing: apt install postgresql (make deps)")
    with PostgresServer() as pg:
        yield pg


@pytest.fixture
def db(server):
    """A fresh, empty database on the module's server: (server, dbname, dsn)."""
    name = "t%d" % next(_names)
    server.psql("CREATE DATABASE %s" % name, database="postgres")
    return server, name, server.dsn(name)


def ctl(*args):
    return subprocess.run([sys.executable, "-m", "ovpnmgr.ctl", *args], capture_output=True, text=True, timeout=60)


def test_migrate_applies_the_schema_once_and_status_shows_it(db):
    server, name, dsn = db
    first = ctl("db", "migrate", "--dsn", dsn)
    assert first.returncode == 0, first.stderr
    assert "applied schema version 1: directory" in first.stdout
    again = ctl("db", "migrate", "--dsn", dsn)
    assert again.returncode == 0 and "schema is current (version 1): nothing to do" in again.stdout, again
    status = ctl("db", "status", "--dsn", dsn)
    assert status.returncode == 0 and "   1  applied  directory" in status.stdout, status
    assert server.psql("SELECT count(*) FROM pp_schema", database=name) == "1"
    tables = set(server.psql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'", database=name).split())
    assert tables == {"pp_schema", "devices", "users"}


def test_a_daemon_check_names_the_fix_for_an_empty_database(db):
    _, _, dsn = db
    with psycopg.connect(dsn, autocommit=True) as connection:
        with pytest.raises(migrations.SchemaError, match="schema is at version 0, this pocketproxy needs 1: run 'pocketproxyctl db migrate'"):
            migrations.check(connection)
        migrations.migrate(connection)
        assert migrations.check(connection) == 1
    status = ctl("db", "status", "--dsn", dsn)
    assert status.returncode == 0


def test_a_newer_or_altered_schema_is_refused_by_migrate_and_status(db):
    server, name, dsn = db
    assert ctl("db", "migrate", "--dsn", dsn).returncode == 0
    server.psql("INSERT INTO pp_schema (version, name, checksum) VALUES (7, 'from the future', 'x')", database=name)
    for action in ("migrate", "status"):
        got = ctl("db", action, "--dsn", dsn)
        assert got.returncode == 1 and "schema version 7, newer than this pocketproxy knows (up to 1): upgrade pocketproxy" in got.stderr, got
    server.psql("DELETE FROM pp_schema WHERE version = 7; UPDATE pp_schema SET checksum = 'edited' WHERE version = 1", database=name)
    got = ctl("db", "migrate", "--dsn", dsn)
    assert got.returncode == 1 and "schema version 1 in the database differs" in got.stderr, got


def test_bad_dsn_and_unreachable_server_are_clear_errors(db, tmp_path):
    server, _, dsn = db
    got = ctl("db", "migrate", "--dsn", "host=%s dbname=nosuchdb user=postgres" % server.socket_dir)
    assert got.returncode == 3 and "cannot connect to the database" in got.stderr and "nosuchdb" in got.stderr, got
    got = ctl("db", "migrate", "--dsn", "host=%s/missing dbname=x" % server.socket_dir)
    assert got.returncode == 3 and "cannot connect to the database" in got.stderr, got
    got = ctl("db", "migrate", "--dsn", dsn, "--db-password-file", str(tmp_path / "none"))
    assert got.returncode == 2 and "--db-password-file" in got.stderr, got


def test_the_constraints_a_platform_writer_meets(db):
    server, name, dsn = db
    assert ctl("db", "migrate", "--dsn", dsn).returncode == 0

    def sql(statement):
        return server.psql(statement, database=name)

    sql("INSERT INTO devices (name, upstream) VALUES ('phone1', 'http://dev:pw@192.168.255.2:8080')")
    sql("INSERT INTO users (name, password_hash, device, address) VALUES ('alice', '%s', 'phone1', '10.9.0.77')" % HASH)
    sql("INSERT INTO users (name, common_name, device) VALUES ('carol', 'carol', 'phone1')")
    refused = {
        "neither password nor certificate": "INSERT INTO users (name, device) VALUES ('dave', 'phone1')",
        "unknown device": "INSERT INTO users (name, common_name, device) VALUES ('erin', 'erin', 'nophone')",
        "static address taken": "INSERT INTO users (name, common_name, device, address) VALUES ('fay', 'fay', 'phone1', '10.9.0.77')",
        "not a host address": "INSERT INTO users (name, common_name, device, address) VALUES ('gil', 'gil', 'phone1', '10.9.0.0/24')",
        "plaintext password": "INSERT INTO users (name, password_hash, device) VALUES ('hal', 'secret', 'phone1')",
        "device with users deleted": "DELETE FROM devices WHERE name = 'phone1'",
        "upstream scheme": "INSERT INTO devices (name, upstream) VALUES ('phone2', 'ftp://x')",
    }
    for why, statement in refused.items():
        with pytest.raises(RuntimeError):
            sql(statement)
            pytest.fail("accepted: %s" % why)
    assert sql("SELECT name, max_sessions, enabled FROM users ORDER BY name") == "alice|1|t\ncarol|1|t"


def test_every_committed_change_is_notified_at_commit_and_a_rollback_is_not(db):
    server, name, dsn = db
    assert ctl("db", "migrate", "--dsn", dsn).returncode == 0
    got = []
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.add_notify_handler(lambda note: got.append(json.loads(note.payload)))
        listener.execute("LISTEN %s" % migrations.NOTIFY_CHANNEL)
        started = time.monotonic()
        server.psql("BEGIN; INSERT INTO devices (name, upstream) VALUES ('phone1', 'socks5://192.168.255.3:1080');"
                    " INSERT INTO users (name, common_name, device) VALUES ('bob', 'bob', 'phone1'); COMMIT", database=name)
        server.psql("UPDATE users SET name = 'robert' WHERE name = 'bob'", database=name)
        server.psql("BEGIN; DELETE FROM users WHERE name = 'robert'; ROLLBACK", database=name)  # never committed: silent
        server.psql("DELETE FROM users WHERE name = 'robert'", database=name)
        deadline = started + 5
        while len(got) < 5 and time.monotonic() < deadline:  # notifications arrive with any round trip
            listener.execute("SELECT 1")
            time.sleep(0.02)
        elapsed = time.monotonic() - started
    assert got == [
        {"table": "devices", "op": "INSERT", "name": "phone1"},
        {"table": "users", "op": "INSERT", "name": "bob"},
        {"table": "users", "op": "UPDATE", "name": "robert"},
        {"table": "users", "op": "DELETE", "name": "bob"},
        {"table": "users", "op": "DELETE", "name": "robert"},
    ], got
    assert elapsed < 2, elapsed
