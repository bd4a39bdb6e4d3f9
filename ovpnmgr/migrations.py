# -*- test-case-name: tests.unit.test_migrations, tests.integration.test_postgres_schema -*-
"""The PostgreSQL schema of the shared directory (issue 17), as versioned SQL migrations.

Each :class:`Migration` is applied once, in version order, in its own transaction, and recorded
in ``pp_schema`` (version, name, a checksum of its SQL, when). ``pocketproxyctl db migrate``
applies what is missing (:func:`migrate`; running it again changes nothing); a daemon checks at
start that the database holds exactly the versions it knows (:func:`check`), so it never runs
against a schema it does not understand: a newer one (an upgraded peer gateway) or a partial one.

Who writes: operators with ``pocketproxyctl`` and the billing platform with its own SQL. Every
committed change to ``devices`` or ``users`` is announced by a trigger with
``NOTIFY pp_directory, '{"table": ..., "op": ..., "name": ...}'`` so every gateway can follow
it within a second.

The SQL is kept here rather than in data files so the Debian package and a pip install carry it
with the code that understands it. Never edit an applied migration: add the next one (the
checksum check refuses a database whose recorded SQL differs from this file's).
"""

import hashlib
from dataclasses import dataclass

__all__ = ["Migration", "MIGRATIONS", "SchemaError", "check", "migrate", "applied_versions", "NOTIFY_CHANNEL"]

NOTIFY_CHANNEL = "pp_directory"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self):
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


class SchemaError(Exception):
    """The database's schema is not one this pocketproxy can use; the message says what to do."""


_DIRECTORY = """
CREATE TABLE devices (
    name          text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'),
    upstream      text NOT NULL CHECK (upstream ~ '^(http|socks5)://'),  -- with credentials, as in users.yaml
    dns           text CHECK (dns IN ('via_device', 'host')),             -- NULL: the daemon's dns.policy
    max_clients   integer CHECK (max_clients > 0),
    health_target text,                                                   -- NULL: health.target
    rotate        jsonb,                                                  -- {"command": [...]} or {"url": ..., "method": ...}
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    name             text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$'),
    password_hash    text CHECK (password_hash LIKE 'scrypt$%'),  -- pocketproxyctl hash-password
    common_name      text UNIQUE,                                  -- certificate-only users
    device           text NOT NULL REFERENCES devices (name) ON UPDATE CASCADE ON DELETE RESTRICT,
    address          inet UNIQUE CHECK (family(address) = 4 AND masklen(address) = 32),  -- static VPN address
    tunnel           text CHECK (tunnel IN ('full', 'split')),    -- NULL: openvpn.tunnel
    private_networks text NOT NULL DEFAULT 'deny' CHECK (private_networks IN ('deny', 'allow')),
    max_sessions     integer NOT NULL DEFAULT 1 CHECK (max_sessions >= 1),  -- across every gateway
    quota_day_bytes   bigint CHECK (quota_day_bytes > 0),           -- NULL: no quota
    quota_month_bytes bigint CHECK (quota_month_bytes > 0),
    enabled          boolean NOT NULL DEFAULT true,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK (password_hash IS NOT NULL OR common_name IS NOT NULL)
);
CREATE INDEX users_device ON users (device);

CREATE FUNCTION pp_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END $$;

CREATE FUNCTION pp_directory_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    row_name text := CASE WHEN TG_OP = 'DELETE' THEN OLD.name ELSE NEW.name END;
BEGIN
    PERFORM pg_notify('pp_directory', json_build_object('table', TG_TABLE_NAME, 'op', TG_OP, 'name', row_name)::text);
    IF TG_OP = 'UPDATE' AND OLD.name <> NEW.name THEN
        PERFORM pg_notify('pp_directory', json_build_object('table', TG_TABLE_NAME, 'op', 'DELETE', 'name', OLD.name)::text);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER devices_touch BEFORE UPDATE ON devices FOR EACH ROW EXECUTE FUNCTION pp_touch();
CREATE TRIGGER users_touch BEFORE UPDATE ON users FOR EACH ROW EXECUTE FUNCTION pp_touch();
CREATE TRIGGER devices_changed AFTER INSERT OR UPDATE OR DELETE ON devices
    FOR EACH ROW EXECUTE FUNCTION pp_directory_changed();
CREATE TRIGGER users_changed AFTER INSERT OR UPDATE OR DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION pp_directory_changed();
"""

MIGRATIONS = (Migration(1, "directory: devices and users, change notifications", _DIRECTORY),)

_LEDGER = """
CREATE TABLE IF NOT EXISTS pp_schema (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
_LOCK = 0x70705F736368656D  # pg_advisory_xact_lock key: one migrator at a time ("pp_schem")


def applied_versions(cursor):
    """``{version: checksum}`` recorded in ``pp_schema`` ({} when the table does not exist)."""
    cursor.execute("SELECT to_regclass('pp_schema') IS NOT NULL")
    if not cursor.fetchone()[0]:
        return {}
    cursor.execute("SELECT version, checksum FROM pp_schema ORDER BY version")
    return dict(cursor.fetchall())


def _verify(applied, known):
    """Raise :class:`SchemaError` unless ``applied`` is a prefix of ``known`` with the same SQL."""
    by_version = {m.version: m for m in known}
    newer = sorted(v for v in applied if v not in by_version)
    if newer:
        raise SchemaError(
            "the database has schema version %d, newer than this pocketproxy knows (up to %d): upgrade pocketproxy"
            % (newer[-1], max(by_version, default=0))
        )
    for version, checksum in sorted(applied.items()):
        if checksum != by_version[version].checksum:
            raise SchemaError(
                "schema version %d in the database differs from this pocketproxy's migration %d (%s): "
                "it was changed by hand or by another build" % (version, version, by_version[version].name)
            )
    missing_below = [m.version for m in known if m.version not in applied and m.version < max(applied, default=0)]
    if missing_below:
        raise SchemaError("schema versions %s are missing below %d" % (missing_below, max(applied)))


def check(connection, known=MIGRATIONS):
    """For a daemon at start: the database holds exactly ``known``; else :class:`SchemaError`
    naming the fix (``pocketproxyctl db migrate``, or an upgrade)."""
    with connection.cursor() as cursor:
        applied = applied_versions(cursor)
    connection.rollback()
    _verify(applied, known)
    pending = [m for m in known if m.version not in applied]
    if pending:
        raise SchemaError(
            "the database schema is at version %d, this pocketproxy needs %d: run 'pocketproxyctl db migrate'"
            % (max(applied, default=0), known[-1].version)
        )
    return known[-1].version


def migrate(connection, known=MIGRATIONS, log=lambda line: None):
    """Apply the migrations ``connection``'s database lacks, each in its own transaction under
    an advisory lock (two migrators never interleave); returns the versions applied ([] when the
    schema was already current). Refuses (:class:`SchemaError`) a schema it does not know."""
    done = []
    while True:
        with connection.transaction():
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
                cursor.execute(_LEDGER)
                applied = applied_versions(cursor)
                _verify(applied, known)
                pending = [m for m in known if m.version not in applied]
                if not pending:
                    return done
                m = pending[0]
                cursor.execute(m.sql)
                cursor.execute(
                    "INSERT INTO pp_schema (version, name, checksum) VALUES (%s, %s, %s)", (m.version, m.name, m.checksum)
                )
        done.append(m.version)
        log("applied schema version %d: %s" % (m.version, m.name))
