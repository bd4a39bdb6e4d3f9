"""The PostgreSQL schema's migrations (issue 17): numbered without gaps, immutable once applied
(checksums), and a database with an unknown or altered schema is refused with the fix named.
The SQL itself runs against a real server in tests/integration/test_postgres_schema.py."""

import pytest

from ovpnmgr import migrations
from ovpnmgr.ctl import build_parser
from ovpnmgr.migrations import MIGRATIONS, Migration, SchemaError, _verify


def test_versions_start_at_one_and_have_no_gaps_and_names():
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert all(m.name and m.sql.strip() for m in MIGRATIONS)
    assert len({m.checksum for m in MIGRATIONS}) == len(MIGRATIONS)


def test_the_directory_schema_announces_every_change():
    sql = MIGRATIONS[0].sql
    for table in ("devices", "users"):
        assert "CREATE TABLE %s" % table in sql
        assert "AFTER INSERT OR UPDATE OR DELETE ON %s" % table in sql
    assert "pg_notify('%s'" % migrations.NOTIFY_CHANNEL in sql


KNOWN = (Migration(1, "one", "SELECT 1"), Migration(2, "two", "SELECT 2"))


def test_a_prefix_of_the_known_migrations_is_accepted():
    _verify({}, KNOWN)
    _verify({1: KNOWN[0].checksum}, KNOWN)
    _verify({1: KNOWN[0].checksum, 2: KNOWN[1].checksum}, KNOWN)


def test_a_newer_schema_is_refused_with_upgrade_named():
    with pytest.raises(SchemaError, match="version 3, newer than this pocketproxy knows \\(up to 2\\): upgrade pocketproxy"):
        _verify({1: KNOWN[0].checksum, 2: KNOWN[1].checksum, 3: "x"}, KNOWN)


def test_an_altered_migration_is_refused():
    with pytest.raises(SchemaError, match="schema version 1 in the database differs"):
        _verify({1: "not-the-checksum"}, KNOWN)


def test_a_gap_is_refused():
    with pytest.raises(SchemaError, match=r"versions \[1\] are missing below 2"):
        _verify({2: KNOWN[1].checksum}, KNOWN)


def test_ctl_has_db_migrate_and_status_with_a_required_dsn():
    parser = build_parser()
    args = parser.parse_args(["db", "migrate", "--dsn", "dbname=x", "--db-password-file", "/etc/pw"])
    assert (args.action, args.dsn, args.db_password_file, args.admin) == ("migrate", "dbname=x", "/etc/pw", False)
    with pytest.raises(SystemExit):
        parser.parse_args(["db", "status"])  # --dsn is required: no silent default database
