"""A real PostgreSQL server for the tests: ``initdb`` and ``pg_ctl`` in a temp directory, on a
unix socket only (no TCP listener), run as the ``postgres`` system user (the server refuses
root), always stopped by :meth:`PostgresServer.stop` (also on ``with`` exit and on failure).

Debian's ``postgresql`` package provides the binaries under ``/usr/lib/postgresql/<major>/bin``;
its own cluster is never touched (``make deps`` installs it without starting it)."""

import glob
import os
import pwd
import shutil
import subprocess
import tempfile

BIN_GLOB = "/usr/lib/postgresql/*/bin"
OWNER = "postgres"
RUNUSER = shutil.which("runuser", path="/usr/sbin:/sbin:/usr/bin:/bin") or "runuser"


def bindir():
    """The newest installed server's bin directory, or None."""
    found = sorted(glob.glob(BIN_GLOB), key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0)
    return found[-1] if found and os.path.exists(os.path.join(found[-1], "pg_ctl")) else None


class PostgresServer:
    """One throwaway cluster: ``dsn()`` for psycopg, ``psql(sql)`` for checks."""

    def __init__(self, directory=None, database="pocketproxy"):
        self.bin = bindir()
        if self.bin is None:
            raise RuntimeError("PostgreSQL server binaries not found under %s (apt install postgresql)" % BIN_GLOB)
        self.database = database
        self.base = tempfile.mkdtemp(prefix="pppg-", dir=directory)
        self.data = os.path.join(self.base, "data")
        self.socket_dir = os.path.join(self.base, "run")
        self.log = os.path.join(self.base, "server.log")
        self.started = False
        owner = pwd.getpwnam(OWNER)
        self._ids = (owner.pw_uid, owner.pw_gid)
        os.makedirs(self.socket_dir)
        for path in (self.base, self.socket_dir):
            os.chown(path, *self._ids)
        os.chmod(self.base, 0o755)

    def _as_owner(self, *argv, check=True, timeout=60):
        return subprocess.run(
            [RUNUSER, "-u", OWNER, "--", *argv], check=check, timeout=timeout, capture_output=True, text=True,
            cwd=self.base, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        )

    def start(self):
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self):
        self._as_owner(os.path.join(self.bin, "initdb"), "-D", self.data, "-A", "trust", "-U", OWNER, "-E", "UTF8")
        options = "-c listen_addresses='' -c unix_socket_directories=%s -c fsync=off" % self.socket_dir
        self.started = True
        result = self._as_owner(os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-l", self.log, "-o", options,
                                "-w", "-t", "60", "start", check=False, timeout=90)
        if result.returncode != 0:
            raise RuntimeError("pg_ctl start failed (%s): %s\n%s" % (result.returncode, result.stderr, self.log_text()))
        self.psql("CREATE DATABASE %s" % self.database, database="postgres")
        return self

    def halt(self):
        """Stop the server, keeping its data (a database outage); :meth:`resume` starts it again."""
        self._as_owner(os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-m", "fast", "-w", "-t", "30", "stop", timeout=60)

    def resume(self):
        options = "-c listen_addresses='' -c unix_socket_directories=%s -c fsync=off" % self.socket_dir
        self._as_owner(os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-l", self.log, "-o", options,
                       "-w", "-t", "60", "start", timeout=90)

    def dsn(self, database=None):
        return "host=%s dbname=%s user=%s" % (self.socket_dir, database or self.database, OWNER)

    def psql(self, sql, database=None):
        """Run ``sql`` with psql (as the server's superuser); returns its unaligned output."""
        result = self._as_owner("psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", self.socket_dir,
                                "-d", database or self.database, "-c", sql, check=False)
        if result.returncode != 0:
            raise RuntimeError("psql %r failed: %s" % (sql, result.stderr.strip()))
        return result.stdout.strip()

    def log_text(self):
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def stop(self):
        """Stop the server (fast shutdown, then immediate) and remove its directory. Safe twice."""
        if self.started:
            self.started = False
            for mode in ("fast", "immediate"):
                result = self._as_owner(os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-m", mode, "-w", "-t", "30",
                                        "stop", check=False, timeout=60)
                if result.returncode == 0 or "Is server running?" in result.stderr:
                    break
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
