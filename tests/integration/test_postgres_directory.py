"""The directory in PostgreSQL (issue 17), followed live by the real daemon: a real PostgreSQL
server started by the test (tests/lab/postgres.py), the schema applied with ``pocketproxyctl db
migrate``, customers and the phone written with plain SQL as a billing platform would, real
OpenVPN 2.6 clients and a tinyproxy phone.

One lab for the module (torn down at the end, also on failure)::

    alice, bob ── OpenVPN ── server ns: pocketproxy (directory.backend: postgres) ── phone ── origin
                                            │ LISTEN pp_directory
                               PostgreSQL (unix socket in a temp dir)
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import pytest

from tests.integration.helpers import AdminClient
from tests.lab.daemon import FAST_HASH, Daemon
from tests.lab.netns import require_root, require_tools
from tests.lab.openvpn import OPENVPN, Lab
from tests.lab.probes import NETCLIENT, run_json
from tests.lab.world import ORIGIN_IP, TINYPROXY, World

pytest.importorskip("psycopg", reason="the PostgreSQL driver (python3-psycopg / psycopg) is not installed")

from ovpnmgr.directory import hash_password  # noqa: E402
from tests.lab.postgres import PostgresServer, bindir  # noqa: E402


@dataclass
class Env:
    lab: Lab
    world: World
    pg: PostgresServer
    daemon: Daemon
    phone: object
    admin_path: str

    def sql(self, statement):
        return self.pg.psql(statement)

    def add_user(self, name, password):
        self.sql("INSERT INTO users (name, password_hash, device) VALUES ('%s', '%s', 'phone')"
                 % (name, hash_password(password, **FAST_HASH)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    require_root()
    require_tools(OPENVPN, "ipset", "iptables", TINYPROXY)
    if bindir() is None:
        pytest.fail("PostgreSQL server binaries missing: apt install postgresql (make deps)")
    base = tmp_path_factory.mktemp("pgdir")
    sockdir = tempfile.mkdtemp(prefix="pppgdir-")
    admin_path = os.path.join(sockdir, "admin.sock")
    try:
        with PostgresServer() as pg, Lab(base / "lab") as lab, World(lab.server_ns, base / "world", lab.internet) as world:
            migrated = subprocess.run([sys.executable, "-m", "ovpnmgr.ctl", "db", "migrate", "--dsn", pg.dsn()],
                                      capture_output=True, text=True, timeout=60)
            assert migrated.returncode == 0, migrated.stderr
            phone = world.add_device("phone", username="dev", password="devpw")
            pg.psql("INSERT INTO devices (name, upstream) VALUES ('phone', '%s')" % phone.url)
            daemon = Daemon(
                lab.server_ns, base / "daemon", lab.server.mgmt_socket, {},
                directory={"file": None, "backend": "postgres", "dsn": pg.dsn()},
                admin={"socket": admin_path},
            )
            e = Env(lab, world, pg, daemon, phone, admin_path)
            e.add_user("alice", "alice-pw")
            daemon.start()
            try:
                daemon.wait_log(r"reconciled with OpenVPN", timeout=30)
                yield e
            except BaseException:
                print("==== pocketproxy ====\n%s\n==== postgres ====\n%s" % (daemon.tail(60), pg.log_text()))
                raise
            finally:
                daemon.stop()
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def whoami(client):
    return run_json(client.ns, sys.executable, NETCLIENT, "--timeout", "10", "fetch", "http://%s/whoami" % ORIGIN_IP)


def test_a_user_in_the_database_is_admitted_and_browses_through_the_phone(env):
    alice = env.lab.add_client("alice", username="alice", password="alice-pw")
    alice.wait_connected(timeout=30)
    env.daemon.wait_log(r"admitted user alice ", timeout=20)
    got = whoami(alice)
    assert got.get("status") == 200 and got["body"].strip() == env.phone.origin_ip, got


def test_a_user_inserted_with_sql_can_connect_at_once_without_a_reload(env):
    mark = env.daemon.log_mark()
    committed = time.monotonic()
    env.add_user("bob", "bob-pw")
    env.daemon.wait_log(r"reloaded users file postgres:\S.*: 2 users \(added 1, removed 0", timeout=5, since=mark)
    followed = time.monotonic() - committed
    print("\nbob's INSERT was in force %.2f s after its commit" % followed)
    assert followed < 1.5
    bob = env.lab.add_client("bob", username="bob", password="bob-pw")
    bob.wait_connected(timeout=30)
    assert whoami(bob)["body"].strip() == env.phone.origin_ip


def test_pp_reload_rereads_the_database(env):
    admin = AdminClient(env.admin_path)
    try:
        reply = admin.single("pp reload")
    finally:
        admin.close()
    assert reply.startswith("SUCCESS: reloaded directory (postgres:") and "2 users (added 0, removed 0" in reply, reply


def test_a_user_deleted_with_sql_is_disconnected_within_two_seconds(env):
    alice = env.lab.clients[0]
    mark, a_mark = env.daemon.log_mark(), alice.log_mark()
    committed = time.monotonic()
    env.sql("DELETE FROM users WHERE name = 'alice'")
    env.daemon.wait_log(r"reload: kicking user alice cid \d+ vpn_ip \S+: user removed", timeout=5, since=mark)
    alice.wait_log(r"SIGUSR1\[soft,server-pushed-connection-reset\]", timeout=5, since=a_mark)
    gone = time.monotonic() - committed
    print("\nalice disconnected %.2f s after the DELETE's commit" % gone)
    assert gone < 2.0
    env.daemon.wait_log(r"denied cid \d+ user alice: unknown user 'alice' \(final\)", timeout=30, since=mark)


def test_a_database_outage_keeps_customers_browsing_and_is_followed_again_after(env):
    bob = env.lab.clients[1]
    mark = env.daemon.log_mark()
    env.pg.halt()
    try:
        env.daemon.wait_log(r"directory database postgres:\S.* unreachable", timeout=15, since=mark)
        assert whoami(bob)["body"].strip() == env.phone.origin_ip  # established customers keep working
    finally:
        env.pg.resume()
    env.daemon.wait_log(r"directory database postgres:\S.* reachable again", timeout=40, since=mark)
    env.daemon.wait_log(r"reloaded users file postgres:\S.*: 1 users", timeout=10, since=mark)  # read for what it missed
    mark = env.daemon.log_mark()
    env.add_user("carol", "carol-pw")
    env.daemon.wait_log(r"reloaded users file postgres:\S.*: 2 users \(added 1", timeout=5, since=mark)
    assert whoami(bob)["body"].strip() == env.phone.origin_ip
    log = env.daemon.log_text()
    assert "Traceback" not in log and "alice-pw" not in log
