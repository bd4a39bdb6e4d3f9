# -*- test-case-name: tests.unit.test_migrations, tests.integration.test_postgres_schema -*-
"""``pocketproxyctl db migrate|status``: the shared directory's PostgreSQL schema (issue 17).

A CLI, so plain blocking psycopg here (the daemon never blocks its reactor on the database).
The password is never on the command line: ``--db-password-file`` (first line) or libpq's own
``PGPASSFILE``/``~/.pgpass``.
"""

import sys

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def add_parser(sub):
    """Register ``db`` on ``pocketproxyctl``'s subparsers."""
    db = sub.add_parser(
        "db",
        help="the PostgreSQL directory's schema: 'migrate' applies what is missing, 'status' shows the versions",
        description="Apply (migrate) or show (status) pocketproxy's schema in a PostgreSQL database. "
        "Migrating twice changes nothing; a database with a schema newer than this pocketproxy is refused.",
    )
    db.add_argument("action", choices=["migrate", "status"])
    db.add_argument("--dsn", required=True, metavar="DSN",
                    help="libpq connection string, e.g. 'host=/run/postgresql dbname=pocketproxy user=pocketproxy'")
    db.add_argument("--db-password-file", metavar="FILE", help="the database password: this file's first line")
    db.set_defaults(func=run, admin=False)
    return db


def _password(path):
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    except OSError as e:
        raise _Fail("--db-password-file %s: cannot read: %s" % (path, e.strerror or e), EXIT_USAGE)


class _Fail(Exception):
    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def run(args, out=sys.stdout, err=sys.stderr):
    """``db migrate`` / ``db status``; returns the exit code."""
    try:
        import psycopg
    except ImportError:
        err.write("pocketproxyctl: db: the PostgreSQL driver is missing (apt install python3-psycopg, or pip install psycopg)\n")
        return EXIT_USAGE
    from ovpnmgr import migrations

    try:
        extra = {}
        password = _password(args.db_password_file)
        if password is not None:
            extra["password"] = password
        try:
            connection = psycopg.connect(args.dsn, autocommit=True, connect_timeout=10, **extra)
        except psycopg.ProgrammingError as e:
            raise _Fail("--dsn: %s" % str(e).strip(), EXIT_USAGE)
        except psycopg.OperationalError as e:
            raise _Fail("cannot connect to the database: %s" % str(e).strip(), EXIT_UNREACHABLE)
        with connection:
            if args.action == "migrate":
                done = migrations.migrate(connection, log=lambda line: out.write(line + "\n"))
                latest = migrations.MIGRATIONS[-1].version
                if not done:
                    out.write("schema is current (version %d): nothing to do\n" % latest)
                else:
                    out.write("schema now at version %d\n" % latest)
                return EXIT_OK
            with connection.cursor() as cursor:
                applied = migrations.applied_versions(cursor)
            for m in migrations.MIGRATIONS:
                out.write("%4d  %-8s %s\n" % (m.version, "applied" if m.version in applied else "pending", m.name))
            for version in sorted(set(applied) - {m.version for m in migrations.MIGRATIONS}):
                out.write("%4d  %-8s (unknown to this pocketproxy)\n" % (version, "applied"))
            migrations.check(connection)
            return EXIT_OK
    except migrations.SchemaError as e:
        err.write("pocketproxyctl: db: %s\n" % e)
        return EXIT_ERROR
    except _Fail as e:
        err.write("pocketproxyctl: db: %s\n" % e)
        return e.code
    except psycopg.Error as e:
        err.write("pocketproxyctl: db: %s\n" % str(e).strip())
        return EXIT_ERROR
