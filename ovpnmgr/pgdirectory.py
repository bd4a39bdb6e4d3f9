# -*- test-case-name: tests.unit.test_pgdirectory, tests.integration.test_postgres_directory -*-
"""The directory read from PostgreSQL (``directory.backend: postgres``, issue 17), followed live.

At start (before the reactor runs) :func:`load` reads every device and enabled user and checks
the schema (:func:`ovpnmgr.migrations.check`); a database that cannot be read stops the start
with one message, as a bad users file does.

While running, :class:`PostgresDirectory` keeps a ``LISTEN pp_directory`` connection whose
socket the reactor watches (no thread sits blocked on it). Any notification, i.e. any committed
change by any writer, schedules a re-read (changes arriving together are read once); the new
:class:`~ovpnmgr.directory.Directory` is put in force with the same effects as ``pp reload``.
Connecting and reading run in the reactor's thread pool (psycopg is blocking there); the reactor
never waits on the database. A lost connection is re-established with back-off, and the
directory is read again then, since changes made meanwhile were not notified to us.
"""

import os

from twisted.application import service
from twisted.internet import threads
from twisted.logger import Logger

from ovpnmgr.config import ConfigError, read_secret_file
from ovpnmgr.directory import Directory
from ovpnmgr.migrations import NOTIFY_CHANNEL, SchemaError, check

__all__ = ["load", "fetch_mapping", "PostgresDirectory", "source_name"]

CONNECT_TIMEOUT = 10  # seconds, libpq's connect_timeout
REREAD_DELAY = 0.1  # seconds: changes committed together are read once
BACKOFF = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)  # seconds between reconnection attempts

_DEVICES = "SELECT name, upstream, dns, max_clients, health_target, rotate FROM devices"
_USERS = (
    "SELECT name, password_hash, common_name, device, host(address), tunnel, private_networks"
    " FROM users WHERE enabled"
)


def source_name(config):
    """How errors and ``pp reload`` name the database (never with a password)."""
    return "postgres:%s" % " ".join(
        part for part in config.directory.dsn.split() if part.split("=", 1)[0] in ("host", "port", "dbname", "user")
    )


def connect(config):
    """A blocking autocommit psycopg connection for ``config.directory`` (run it in a thread)."""
    import psycopg

    extra = {}
    if config.directory.password_file is not None:
        try:
            extra["password"] = read_secret_file(config.directory.password_file).decode("utf-8")
        except ValueError as e:
            raise ConfigError(config.path, "directory.password_file", str(e))
    return psycopg.connect(config.directory.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT, **extra)


def fetch_mapping(connection):
    """The database's devices and enabled users as the users file's mapping (blocking)."""
    devices, users = {}, {}
    with connection.cursor() as cursor:
        cursor.execute(_DEVICES)
        for name, upstream, dns, max_clients, health_target, rotate in cursor.fetchall():
            spec = {"upstream": upstream}
            for key, value in (("dns", dns), ("max_clients", max_clients), ("health_target", health_target), ("rotate", rotate)):
                if value is not None:
                    spec[key] = value
            devices[name] = spec
        cursor.execute(_USERS)
        for name, password_hash, common_name, device, address, tunnel, private in cursor.fetchall():
            spec = {"device": device, "private_networks": private}
            for key, value in (("password", password_hash), ("common_name", common_name), ("address", address), ("tunnel", tunnel)):
                if value is not None:
                    spec[key] = value
            users[name] = spec
    return {"devices": devices, "users": users}


def read(config, connection):
    """Check the schema and build the :class:`Directory` (blocking)."""
    source = source_name(config)
    try:
        check(connection)
    except SchemaError as e:
        raise ConfigError(source, None, str(e))
    ovpn = config.openvpn
    return Directory.from_mapping(fetch_mapping(connection), source, ovpn.subnet, ovpn.server_address)


def load(config):
    """At start (blocking, before the reactor): the directory, or :class:`ConfigError` saying why."""
    import psycopg

    try:
        with connect(config) as connection:
            return read(config, connection)
    except psycopg.Error as e:
        raise ConfigError(source_name(config), None, "cannot read the directory: %s" % str(e).strip().splitlines()[0])


def _first_line(failure):
    """A failure's message for one log line (psycopg's run over several), or its type."""
    lines = failure.getErrorMessage().strip().splitlines()
    return lines[0] if lines else failure.type.__name__


class _Notifications:
    """The reactor's reader of the LISTEN connection's socket (IReadDescriptor)."""

    def __init__(self, connection, received, lost):
        self.connection = connection
        self.received = received
        self.lost = lost
        # The reactor watches a duplicate: libpq closes its own descriptor when the connection
        # breaks, and epoll must not be left holding (or asked to drop) a closed one.
        self._fd = os.dup(connection.pgconn.socket)

    def fileno(self):
        return self._fd

    def close(self):
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def logPrefix(self):
        return "pgdirectory"

    def doRead(self):
        import psycopg

        pgconn = self.connection.pgconn
        try:
            pgconn.consume_input()
        except psycopg.Error as e:
            return ConnectionError(str(e).strip() or "connection lost")
        got = 0
        while True:
            note = pgconn.notifies()
            if note is None:
                break
            got += 1
        if pgconn.status != 0:  # CONNECTION_OK
            return ConnectionError("connection lost")
        if got:
            self.received(got)
        return None

    def connectionLost(self, reason):
        self.lost(reason)


class PostgresDirectory(service.Service):
    """Follows the database: every committed change reaches :meth:`operations.reload` within a
    moment. ``clock``/``run_in_thread``/``connect`` are injectable for tests."""

    _log = Logger()

    def __init__(self, reactor, config, operations, run_in_thread=None, connect=connect):
        self.reactor = reactor
        self.config = config
        self.operations = operations
        self.run_in_thread = run_in_thread or (lambda f, *a: threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *a))
        self.connect = connect
        self.source = source_name(config)
        self.listener = None
        self._reader = None
        self._reread = None
        self._retry = None
        self._attempt = 0
        self.rereads = 0  # completed re-reads (tests, pp stats)
        self.notifications = 0
        self.connected = False

    def startService(self):
        super().startService()
        self._listen()

    def stopService(self):
        super().stopService()
        for call in (self._reread, self._retry):
            if call is not None and call.active():
                call.cancel()
        self._reread = self._retry = None
        self._drop()

    # --- the LISTEN connection ---

    def _open(self):
        connection = self.connect(self.config)
        connection.execute("LISTEN %s" % NOTIFY_CHANNEL)
        return connection

    def _listen(self):
        self._retry = None
        d = self.run_in_thread(self._open)
        d.addCallbacks(self._listening, self._failed)

    def _listening(self, connection):
        if not self.running:
            connection.close()
            return
        self.listener = connection
        self.connected = True
        self._reader = _Notifications(connection, self._notified, self._lost)
        self.reactor.addReader(self._reader)
        if self._attempt:
            self._log.info("directory database {source} reachable again: reading it for what changed meanwhile",
                           source=self.source, event="directory-db-up")
        self._attempt = 0
        # Read once now that changes are notified: what was committed since the last read (the
        # start's read ran before the reactor; a reconnect missed notifications) was never told.
        self._schedule_reread()

    def _failed(self, failure):
        if not self.running:
            return
        delay = BACKOFF[min(self._attempt, len(BACKOFF) - 1)]
        self._attempt += 1
        self._log.warn("directory database {source} unreachable ({why}); retrying in {delay:g} s",
                       source=self.source, why=_first_line(failure),
                       delay=delay, event="directory-db-down")
        self._retry = self.reactor.callLater(delay, self._listen)

    def _lost(self, reason):
        self._drop()
        if self.running:
            self._failed(reason)

    def _drop(self):
        if self._reader is not None:
            reader, self._reader = self._reader, None
            self.reactor.removeReader(reader)
            reader.close()
        if self.listener is not None:
            connection, self.listener = self.listener, None
            self.connected = False
            try:
                connection.close()
            except Exception:
                pass

    # --- re-reading ---

    def _notified(self, count):
        self.notifications += count
        self._schedule_reread()

    def _schedule_reread(self):
        if self._reread is None or not self._reread.active():
            self._reread = self.reactor.callLater(REREAD_DELAY, self.reread)

    def _read_once(self):
        import psycopg

        try:
            with self.connect(self.config) as connection:
                return read(self.config, connection)
        except psycopg.Error as e:
            raise ConfigError(self.source, None, "cannot read the directory: %s" % (str(e).strip().splitlines() or ["?"])[0])

    def read_now(self):
        """Read the whole directory and put it in force (``pp reload``, SIGHUP): a Deferred firing
        with :meth:`Operations.reload`'s summary, or failing with :class:`ConfigError`."""
        d = self.run_in_thread(self._read_once)
        d.addCallback(self._apply)
        return d

    def reread(self):
        """The automatic re-read after a notification or a reconnect; never fails (a failure is
        logged, the previous directory stays, and it is tried again after a back-off)."""
        self._reread = None
        return self.read_now().addErrback(self._reread_failed)

    def _apply(self, directory):
        self.rereads += 1
        try:
            return self.operations.reload(directory)
        except ConfigError as e:
            self._log.error("directory change refused: {error}; previous users stay in force", error=str(e), event="reload-refused")
            raise

    def _reread_failed(self, failure):
        self._log.error("re-reading the directory from {source} failed: {why}; previous users stay in force",
                        source=self.source, why=_first_line(failure), event="reload-refused")
        if self.running and (self._reread is None or not self._reread.active()):
            self._reread = self.reactor.callLater(BACKOFF[2], self.reread)
        return None
