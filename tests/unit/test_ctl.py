"""pocketproxyctl against a fake admin server on a temporary unix socket.

The fake speaks the admin dialect byte for byte (banner, ``\\r\\n`` line ends,
``SUCCESS:``/``ERROR:``/``END``, ``quit`` closes without a reply) and records
every request line, so each subcommand's request bytes are checked too.
"""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading

import pytest

from ovpnmgr import ctl

BANNER = b">INFO:pocketproxy admin interface version 1 -- type 'help' for more info\r\n"

CLIENTS_JSON = json.dumps(
    {
        "clients": [
            {
                "cid": 4,
                "connected_since": "2025-03-01T09:12:44+00:00",
                "device": "phone",
                "live_connections": 12,
                "state": "established",
                "user": "alice",
                "vpn_ip": "10.9.0.2",
                "tunnel_bytes_in": 2175,
                "tunnel_bytes_out": 1536,
                "proxied_bytes_up": 0,
                "proxied_bytes_down": 21495808,
                "tunnel": "split",
            },
            {
                "cid": 17,
                "connected_since": None,
                "device": "tablet-long-name",
                "live_connections": 0,
                "state": "pending",
                "user": "bob",
                "vpn_ip": None,
            },
        ]
    },
    sort_keys=True,
    separators=(",", ":"),
)
DEVICES_JSON = json.dumps(
    {
        "devices": [
            {
                "connected": [{"cid": 4, "user": "alice", "vpn_ip": "10.9.0.2"}],
                "device": "phone",
                "upstream": "http://dev:***@192.168.255.2:8080",
                "users": ["alice", "carol"],
            },
            {"connected": [], "device": "spare", "upstream": "socks5://192.168.255.3:1080", "users": []},
        ]
    },
    sort_keys=True,
    separators=(",", ":"),
)
STATS_JSON = json.dumps(
    {"admission": {"clients": 2, "draining": False, "epoch": 1}, "proxy": {"active": 12, "refused": {"unmapped": 3}}},
    sort_keys=True,
    separators=(",", ":"),
)
DRIFT_JSON = json.dumps(
    {
        "ok": False,
        "summary": "1 missing member(s): 10.9.0.2",
        "missing_chain_rules": False,
        "rule_problems": [],
        "set_missing": False,
        "missing_members": ["10.9.0.2"],
        "extra_members": [],
    }
)
STATUS_3 = [
    "TITLE\tOpenVPN 2.6.14 x86_64-pc-linux-gnu",
    "TIME\t2025-03-01 09:20:00\t1740820800",
    "HEADER\tCLIENT_LIST\tCommon Name\tReal Address\tVirtual Address\tCID",
    "CLIENT_LIST\talice\t10.0.0.2:51000\t10.9.0.2\t4",
    "HEADER\tROUTING_TABLE\tVirtual Address\tCommon Name",
    "ROUTING_TABLE\t10.9.0.2\talice",
    "GLOBAL_STATS\tMax bcast/mcast queue length\t0",
    "END",
]

REPLIES = {
    b"pp clients --json": [CLIENTS_JSON, "END"],
    b"pp devices --json": [DEVICES_JSON, "END"],
    b"pp stats --json": [STATS_JSON, "END"],
    b"pp kick alice --json": ['{"errors":[],"kicked":2,"user":"alice"}', "END"],
    b"pp kick carol --json": ['{"errors":["client-kill 9: ERROR: client-kill command failed"],"kicked":1,"user":"carol"}', "END"],
    b"pp kick nobody --json": ["ERROR: unknown user nobody"],
    b"pp drain --json": ['{"draining":false}', "END"],
    b"pp drain on --json": ['{"draining":true}', "END"],
    b"pp drain off --json": ['{"draining":false}', "END"],
    b"pp rules check --json": ['{"ok":true,"summary":"firewall ok","missing_chain_rules":false,'
                               '"rule_problems":[],"set_missing":false,"missing_members":[],"extra_members":[]}', "END"],
    b"status 3": STATUS_3,
    b"load-stats": ["SUCCESS: nclients=1,bytesin=100,bytesout=200"],
    b"client-deny 1 2 x": ["ERROR: command not allowed"],
}


class FakeAdmin:
    """A threaded admin server: ``replies`` maps a request line (bytes, no line end) to reply lines;
    a request mapped to None gets no answer (for timeouts)."""

    def __init__(self, replies=None, banner=BANNER, password=None):
        self.dir = tempfile.mkdtemp(prefix="ppctl-")  # unix socket paths must stay short
        self.path = os.path.join(self.dir, "admin.sock")
        self.replies = dict(REPLIES if replies is None else replies)
        self.banner = banner
        self.password = password  # bytes: prompt first, as the daemon does with admin.password_file
        self.attempts = []
        self._requests = []
        self._raw = b""
        self.started = 0
        self.finished = 0
        self.cond = threading.Condition()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(8)
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopping:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(15)
                with self.cond:
                    self.started += 1
                try:
                    self._session(conn)
                except OSError:
                    pass
            with self.cond:
                self.finished += 1
                self.cond.notify_all()

    def settle(self):
        """Wait until every session the client saw (banner sent) has ended on the server side."""
        with self.cond:
            assert self.cond.wait_for(lambda: self.finished >= self.started, 10), "fake admin session still open"

    @property
    def requests(self):
        self.settle()
        return self._requests

    @property
    def raw(self):
        self.settle()
        return self._raw

    def _login(self, conn):
        """OpenVPN's handshake: bare prompt; right → SUCCESS + banner; wrong → prompt again; 3 wrong → close.
        Returns (authenticated, bytes read past the password line)."""
        buf = b""
        conn.sendall(b"ENTER PASSWORD:")
        while len(self.attempts) < 3:
            while b"\n" not in buf:
                data = conn.recv(4096)
                if not data:
                    return False, b""
                buf += data
            line, buf = buf.split(b"\n", 1)
            line = line.rstrip(b"\r")
            self.attempts.append(line)
            if line == self.password:
                conn.sendall(b"SUCCESS: password is correct\r\n" + self.banner)
                return True, buf
            if len(self.attempts) < 3:
                conn.sendall(b"ENTER PASSWORD:")
        return False, b""

    def _session(self, conn):
        buf = b""
        if self.password is not None:
            ok, buf = self._login(conn)
            if not ok:
                return
        else:
            conn.sendall(self.banner)
        while True:
            data = conn.recv(4096)
            if not data:
                return
            self._raw += data
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                line = line.rstrip(b"\r")
                self._requests.append(line)
                if line in (b"quit", b"exit"):
                    return
                reply = self.replies.get(line, ["ERROR: unknown command, enter 'help' for more options"])
                if reply is None:
                    continue
                conn.sendall(b"".join(r.encode() + b"\r\n" for r in reply))

    def close(self):
        self.stopping = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.thread.join(5)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def admin():
    server = FakeAdmin()
    yield server
    server.close()


def run(capsys, *argv):
    code = ctl.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- request bytes and output of each subcommand ---


def test_clients_table(admin, capsys):
    code, out, err = run(capsys, "--socket", admin.path, "clients")
    assert code == 0 and err == ""
    assert admin.raw == b"pp clients --json\nquit\n"
    lines = out.splitlines()
    assert lines[0].split() == [
        "USER", "CID", "VPN_IP", "DEVICE", "CONNECTED_SINCE", "LIVE", "STATE", "TUN_IN", "TUN_OUT", "PROXY_UP", "PROXY_DOWN", "TUNNEL"
    ]
    assert lines[1].split() == [
        "alice", "4", "10.9.0.2", "phone", "2025-03-01T09:12:44+00:00", "12", "established", "2.1K", "1.5K", "0B", "20.5M",
        "split",
    ]
    assert lines[2].split() == ["bob", "17", "-", "tablet-long-name", "-", "0", "pending", "-", "-", "-", "-", "-"]
    # aligned: every column starts at the same offset on every row
    for title in ("CID", "VPN_IP", "DEVICE", "LIVE", "STATE"):
        col = lines[0].index(title)
        assert lines[1][col - 2 : col] == "  " and lines[1][col] != " "
        assert lines[2][col - 2 : col] == "  " and lines[2][col] != " "
    assert lines[3] == "2 client(s)"


def test_clients_json_is_the_daemons_line(admin, capsys):
    code, out, err = run(capsys, "--socket", admin.path, "--json", "clients")
    assert code == 0 and out == CLIENTS_JSON + "\n"
    code, out2, err = run(capsys, "--socket", admin.path, "clients", "--json")  # after the command too
    assert code == 0 and out2 == out


def test_human_bytes():
    """Byte columns fit six characters; the exact integers stay in --json."""
    assert [ctl.human_bytes(n) for n in (None, 0, 1023, 1024, 1536, 20 * 2**20, 3 * 2**30, 5 * 2**50)] == [
        None, "0B", "1023B", "1.0K", "1.5K", "20.0M", "3.0G", "5120.0T"
    ]


def test_clients_extra_keys_become_columns(capsys):
    rows = {"clients": [{"user": "alice", "cid": 1, "bytes_in": 5}]}
    server = FakeAdmin({b"pp clients --json": [json.dumps(rows), "END"]})
    try:
        code, out, err = run(capsys, "--socket", server.path, "clients")
    finally:
        server.close()
    assert code == 0
    assert out.splitlines()[0].split()[-1] == "BYTES_IN" and out.splitlines()[1].split()[-1] == "5"


def test_devices(admin, capsys):
    code, out, err = run(capsys, "--socket", admin.path, "devices")
    assert code == 0 and admin.requests == [b"pp devices --json", b"quit"]
    lines = out.splitlines()
    assert lines[0].split() == ["DEVICE", "UPSTREAM", "USERS", "CONNECTED"]
    assert lines[1].split() == ["phone", "http://dev:***@192.168.255.2:8080", "alice,carol", "alice@10.9.0.2"]
    assert lines[2].split() == ["spare", "socks5://192.168.255.3:1080", "-", "-"]
    assert run(capsys, "--socket", admin.path, "--json", "devices")[1] == DEVICES_JSON + "\n"


def test_stats(admin, capsys):
    code, out, err = run(capsys, "--socket", admin.path, "stats")
    assert code == 0 and admin.requests == [b"pp stats --json", b"quit"]
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["COUNTER", "VALUE"]
    assert ["admission.clients", "2"] in rows and ["admission.draining", "no"] in rows
    assert ["proxy.refused.unmapped", "3"] in rows
    assert run(capsys, "--socket", admin.path, "stats", "--json")[1] == STATS_JSON + "\n"


def test_kick(admin, capsys):
    code, out, err = run(capsys, "--socket", admin.path, "kick", "alice")
    assert code == 0 and out == "kicked 2 session(s) of alice\n" and err == ""
    assert admin.requests == [b"pp kick alice --json", b"quit"]
    code, out, err = run(capsys, "--socket", admin.path, "--json", "kick", "alice")
    assert code == 0 and json.loads(out) == {"errors": [], "kicked": 2, "user": "alice"}


def test_kick_partial_failure_exits_1(admin, capsys):
    code, out, err = run(capsys, "--socket", admin.path, "kick", "carol")
    assert code == 1 and out == "kicked 1 session(s) of carol\n"
    assert err == "pocketproxyctl: kick carol: client-kill 9: ERROR: client-kill command failed\n"
    code, out, err = run(capsys, "--socket", admin.path, "--json", "kick", "carol")
    assert code == 1 and json.loads(out)["kicked"] == 1


def test_kick_unknown_user_is_error_1(admin, capsys):
    code, out, err = run(capsys, "--socket", admin.path, "kick", "nobody")
    assert (code, out, err) == (1, "", "pocketproxyctl: unknown user nobody\n")
    code, out, err = run(capsys, "--socket", admin.path, "--json", "kick", "nobody")
    assert (code, out, err) == (1, "", "pocketproxyctl: unknown user nobody\n")


@pytest.mark.parametrize(
    "argv, sent, text",
    [
        (["drain", "on"], b"pp drain on --json", "drain: on (new admissions are denied with TEMP; connected clients stay)\n"),
        (["drain", "off"], b"pp drain off --json", "drain: off (new admissions accepted)\n"),
        (["drain", "status"], b"pp drain --json", "drain: off (new admissions accepted)\n"),
        (["drain"], b"pp drain --json", "drain: off (new admissions accepted)\n"),
    ],
)
def test_drain(admin, capsys, argv, sent, text):
    code, out, err = run(capsys, "--socket", admin.path, *argv)
    assert (code, out, err) == (0, text, "")
    assert admin.requests == [sent, b"quit"]


def test_drain_json(admin, capsys):
    assert run(capsys, "--socket", admin.path, "--json", "drain", "on")[:2] == (0, '{"draining":true}\n')


def test_rules_check_ok(admin, capsys):
    code, out, err = run(capsys, "--socket", admin.path, "rules", "check")
    assert (code, out, err) == (0, "rules: firewall ok\n", "")
    assert admin.requests == [b"pp rules check --json", b"quit"]


def test_rules_check_drift_exits_1_and_prints_it(capsys):
    server = FakeAdmin({b"pp rules check --json": [DRIFT_JSON, "END"]})
    try:
        code, out, err = run(capsys, "--socket", server.path, "rules", "check")
        assert code == 1
        assert out == (
            "rules: 1 missing member(s): 10.9.0.2\n"
            "  ipset member missing (admitted client not in the set): 10.9.0.2\n"
        )
        code, out, err = run(capsys, "--socket", server.path, "--json", "rules", "check")
        assert code == 1 and json.loads(out)["missing_members"] == ["10.9.0.2"]
    finally:
        server.close()


def test_rules_check_firewall_error(capsys):
    server = FakeAdmin({b"pp rules check --json": ["ERROR: iptables -S POCKETPROXY failed: exit 1"]})
    try:
        code, out, err = run(capsys, "--socket", server.path, "rules", "check")
    finally:
        server.close()
    assert (code, out, err) == (1, "", "pocketproxyctl: iptables -S POCKETPROXY failed: exit 1\n")


def test_status_raw_and_parsed(admin, capsys):
    code, out, err = run(capsys, "--socket", admin.path, "status")
    assert code == 0 and out.splitlines() == STATUS_3[:-1]
    assert admin.requests == [b"status 3", b"quit"]
    code, out, err = run(capsys, "--socket", admin.path, "--json", "status")
    data = json.loads(out)
    assert data["title"].startswith("OpenVPN 2.6.14")
    assert data["CLIENT_LIST"] == [{"Common Name": "alice", "Real Address": "10.0.0.2:51000", "Virtual Address": "10.9.0.2", "CID": "4"}]
    assert data["ROUTING_TABLE"] == [{"Virtual Address": "10.9.0.2", "Common Name": "alice"}]
    assert data["global"] == {"Max bcast/mcast queue length": "0"}


def test_status_management_down_exits_1(capsys):
    server = FakeAdmin({b"status 3": ["ERROR: OpenVPN management not connected"]})
    try:
        code, out, err = run(capsys, "--socket", server.path, "status")
    finally:
        server.close()
    assert (code, out, err) == (1, "", "pocketproxyctl: OpenVPN management not connected\n")


def test_raw_passthrough(admin, capsys):
    assert run(capsys, "--socket", admin.path, "raw", "load-stats") == (0, "nclients=1,bytesin=100,bytesout=200\n", "")
    code, out, err = run(capsys, "--socket", admin.path, "raw", "client-deny", "1", "2", "x")
    assert (code, out, err) == (1, "", "pocketproxyctl: command not allowed\n")
    assert admin.requests == [b"load-stats", b"quit", b"client-deny 1 2 x", b"quit"]
    code, out, err = run(capsys, "--socket", admin.path, "raw", "pp", "clients", "--json")  # REMAINDER: passed on
    assert code == 0 and out == CLIENTS_JSON + "\n" and admin.requests[-2] == b"pp clients --json"


def test_notifications_before_a_reply_are_skipped(capsys):
    server = FakeAdmin({b"pp drain --json": [">INFO:something", '{"draining":true}', "END"]})
    try:
        assert run(capsys, "--socket", server.path, "--json", "drain")[:2] == (0, '{"draining":true}\n')
    finally:
        server.close()


def test_unexpected_reply_is_error(capsys):
    server = FakeAdmin({b"pp stats --json": ["not json", "END"]})
    try:
        code, out, err = run(capsys, "--socket", server.path, "stats")
    finally:
        server.close()
    assert code == 1 and "is not JSON" in err


# --- exit codes and messages ---


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["kick"],
        ["kick", "a", "b"],
        ["drain", "maybe"],
        ["rules"],
        ["rules", "fix"],
        ["--timeout", "0", "clients"],
        ["--timeout", "x", "clients"],
        ["raw"],
        ["raw", "quit"],
    ],
)
def test_usage_errors_exit_2(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and "pocketproxyctl" in err


def test_help_exits_0(capsys):
    code, out, err = run(capsys, "--help")
    assert code == 0 and "exit codes" in out


def test_missing_socket_exits_3(tmp_path, capsys):
    path = str(tmp_path / "nope.sock")
    code, out, err = run(capsys, "--socket", path, "clients")
    assert code == 3 and out == ""
    assert err == "pocketproxyctl: admin socket %s not found (is pocketproxy running? admin.socket set?)\n" % path


def test_default_socket_path(monkeypatch, capsys):
    seen = []

    def fake_connect(self, address):
        seen.append(address)
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(socket.socket, "connect", fake_connect)
    code, out, err = run(capsys, "clients")
    assert code == 3 and seen == ["/run/pocketproxy/admin.sock"] and "/run/pocketproxy/admin.sock not found" in err


def test_permission_denied_simulated(admin, monkeypatch, capsys):
    def denied(self, address):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "connect", denied)
    code, out, err = run(capsys, "--socket", admin.path, "clients")
    assert code == 3 and out == ""
    assert err == "pocketproxyctl: permission denied on %s (run as root or a member of the socket's group)\n" % admin.path


def test_permission_denied_real(admin):
    """A socket file with mode 000, reached by an unprivileged user (root is never denied)."""
    os.chmod(admin.path, 0)
    os.chmod(admin.dir, 0o755)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    argv = [sys.executable, "-m", "ovpnmgr.ctl", "--socket", admin.path, "clients"]
    kwargs = {}
    if os.geteuid() == 0:
        def drop():
            os.setgid(65534)
            os.setgroups([])
            os.setuid(65534)

        kwargs["preexec_fn"] = drop
        probe = subprocess.run([sys.executable, "-c", "import ovpnmgr.ctl"], env=env, capture_output=True, preexec_fn=drop, cwd="/")
        if probe.returncode != 0:
            pytest.skip("nobody cannot import the checkout: %s" % probe.stderr.decode()[-200:])
    proc = subprocess.run(argv, env=env, capture_output=True, timeout=30, cwd="/", **kwargs)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.decode() == (
        "pocketproxyctl: permission denied on %s (run as root or a member of the socket's group)\n" % admin.path
    )


def test_connection_refused_exits_3(capsys):
    directory = tempfile.mkdtemp(prefix="ppctl-")
    path = os.path.join(directory, "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # the file stays, nobody listens: a stale socket
    try:
        code, out, err = run(capsys, "--socket", path, "clients")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    assert code == 3
    assert err == "pocketproxyctl: connection refused on %s (stale socket file: pocketproxy is not running)\n" % path


def test_not_a_socket_exits_3(tmp_path, capsys):
    path = tmp_path / "plain"
    path.write_text("x")
    code, out, err = run(capsys, "--socket", str(path), "clients")
    assert code == 3 and err.startswith("pocketproxyctl: ") and str(path) in err


def test_timeout_waiting_for_reply_exits_3(capsys):
    server = FakeAdmin({b"pp clients --json": None})
    try:
        code, out, err = run(capsys, "--socket", server.path, "--timeout", "0.3", "clients")
    finally:
        server.close()
    assert (code, out) == (3, "")
    assert err == "pocketproxyctl: no complete reply from %s within 0.3s\n" % server.path


def test_timeout_waiting_for_banner_exits_3(capsys):
    directory = tempfile.mkdtemp(prefix="ppctl-")
    path = os.path.join(directory, "mute.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)  # accepts (backlog) but never speaks
    try:
        code, out, err = run(capsys, "--socket", path, "--timeout", "0.3", "clients")
    finally:
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)
    assert code == 3
    assert err == "pocketproxyctl: admin socket %s did not answer within 0.3s (is pocketproxy stuck?)\n" % path


def test_closed_before_reply_exits_3(capsys):
    server = FakeAdmin({b"pp clients --json": None})
    server.replies[b"pp clients --json"] = None

    def session(conn):
        conn.sendall(server.banner)
        conn.recv(100)  # then close without answering

    server._session = session
    try:
        code, out, err = run(capsys, "--socket", server.path, "clients")
    finally:
        server.close()
    assert code == 3 and "closed the connection before the reply to 'pp' ended" in err


@pytest.mark.parametrize(
    "banner, message",
    [
        (b"ENTER PASSWORD:", "asks for a password"),
        (b"hello\r\n", "unexpected banner"),
    ],
)
def test_bad_banner_exits_3(capsys, banner, message):
    server = FakeAdmin(banner=banner)
    try:
        code, out, err = run(capsys, "--socket", server.path, "--timeout", "2", "clients")
    finally:
        server.close()
    assert code == 3 and message in err, err


# --- --config ---


def test_socket_from_config(admin, tmp_path, capsys):
    (tmp_path / "users.yaml").write_text("devices: {}\nusers: {}\n")
    config = tmp_path / "pocketproxy.yaml"
    config.write_text(
        "openvpn:\n  management: unix:/run/x.sock\n  subnet: 10.9.0.0/24\n  server_address: 10.9.0.1\n"
        "directory:\n  file: users.yaml\nadmin:\n  socket: %s\n" % admin.path
    )
    code, out, err = run(capsys, "--config", str(config), "--json", "drain")
    assert (code, out, err) == (0, '{"draining":false}\n', ""), err


def test_socket_from_config_when_the_rest_does_not_validate(admin, tmp_path, capsys):
    config = tmp_path / "pocketproxy.yaml"  # users file unreadable (absent) for this operator
    config.write_text("directory:\n  file: users.yaml\nadmin:\n  socket: %s\n" % admin.path)
    assert run(capsys, "--config", str(config), "--json", "drain")[:2] == (0, '{"draining":false}\n')


def test_config_without_admin_socket_exits_2(tmp_path, capsys):
    (tmp_path / "users.yaml").write_text("devices: {}\nusers: {}\n")
    config = tmp_path / "pocketproxy.yaml"
    config.write_text("openvpn:\n  management: unix:/run/x.sock\n  subnet: 10.9.0.0/24\n  server_address: 10.9.0.1\ndirectory:\n  file: users.yaml\n")
    code, out, err = run(capsys, "--config", str(config), "clients")
    assert code == 2 and "admin.socket is not set in %s" % config in err, err


def test_bad_config_exits_2(tmp_path, capsys):
    code, out, err = run(capsys, "--config", str(tmp_path / "missing.yaml"), "clients")
    assert code == 2 and err.startswith("pocketproxyctl: configuration error: "), err


def test_socket_option_wins_over_config(admin, tmp_path, capsys):
    code, out, err = run(capsys, "--config", str(tmp_path / "missing.yaml"), "--socket", admin.path, "drain")
    assert code == 0


# --- hash-password (no daemon involved) ---


def test_hash_password_stdin(monkeypatch, capsys):
    from ovpnmgr.directory import verify_password

    monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret\n"))
    code, out, err = run(capsys, "hash-password", "--stdin")
    assert code == 0 and out.startswith("scrypt$") and verify_password("s3cret", out.strip())


def test_hash_password_empty_refused(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert run(capsys, "hash-password", "--stdin") == (1, "", "pocketproxyctl: empty password refused\n")


def test_hash_password_prompts_twice(monkeypatch, capsys):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Tty(""))
    answers = iter(["one", "two"])
    monkeypatch.setattr(ctl.getpass, "getpass", lambda prompt: next(answers))
    assert run(capsys, "hash-password") == (1, "", "pocketproxyctl: passwords do not match\n")


def test_config_is_validated_when_readable(admin, tmp_path, monkeypatch, capsys):
    """With a valid config the socket comes from load_config, not the YAML fallback."""
    (tmp_path / "users.yaml").write_text("devices: {}\nusers: {}\n")
    config = tmp_path / "pocketproxy.yaml"
    config.write_text(
        "openvpn:\n  management: unix:/run/x.sock\n  subnet: 10.9.0.0/24\n  server_address: 10.9.0.1\n"
        "directory:\n  file: users.yaml\nadmin:\n  socket: %s\n" % admin.path
    )
    monkeypatch.setattr(ctl, "_admin_socket_from_yaml", lambda path: pytest.fail("fallback used"))
    assert run(capsys, "--config", str(config), "drain")[0] == 0


def test_reload_success_and_refusal(capsys):
    """reload sends 'pp reload --json', prints the summary; a refused file exits 1 and says the old users stay."""
    ok = '{"ok":true,"users":3,"added":1,"removed":1,"changed":0,"kicked":1,"remapped":0}'
    server = FakeAdmin({b"pp reload --json": [ok, "END"]})
    try:
        code, out, err = run(capsys, "--socket", server.path, "reload")
        assert (code, err) == (0, "")
        assert out == "reloaded users file: 3 users (added 1, removed 1, changed 0, kicked 1)\n"
        assert server.requests == [b"pp reload --json", b"quit"]
    finally:
        server.close()
    bad = '{"ok":false,"error":"/etc/pocketproxy/users.yaml: users.bob.device: unknown device"}'
    server = FakeAdmin({b"pp reload --json": [bad, "END"]})
    try:
        code, out, err = run(capsys, "--socket", server.path, "reload")
        assert code == 1 and out == ""
        assert "reload refused: /etc/pocketproxy/users.yaml: users.bob.device: unknown device;" in err
        assert "previous users stay in force" in err
    finally:
        server.close()


# --- password prompt (admin.password_file) ---


@pytest.fixture
def pw_admin():
    server = FakeAdmin(password=b"s3cret")
    yield server
    server.close()


def test_password_file_answers_the_prompt(pw_admin, tmp_path, capsys):
    pw = tmp_path / "admin.pw"
    pw.write_bytes(b"s3cret\nignored second line\n")
    code, out, err = run(capsys, "--socket", pw_admin.path, "--password-file", str(pw), "--json", "drain")
    assert (code, out, err) == (0, '{"draining":false}\n', "")
    assert pw_admin.attempts == [b"s3cret"]
    assert pw_admin.requests == [b"pp drain --json", b"quit"]


def test_wrong_password_exits_3(pw_admin, tmp_path, capsys):
    pw = tmp_path / "admin.pw"
    pw.write_text("wrong\n")
    code, out, err = run(capsys, "--socket", pw_admin.path, "--password-file", str(pw), "clients")
    assert (code, out, err) == (3, "", "pocketproxyctl: admin socket rejected the password\n")
    assert pw_admin.attempts == [b"wrong"]  # one try only, no command sent
    assert pw_admin.requests == []


def test_connection_closed_after_the_password_is_a_rejection(tmp_path, capsys):
    server = FakeAdmin(password=b"s3cret")

    def session(conn):
        conn.sendall(b"ENTER PASSWORD:")
        conn.recv(100)  # then close

    server._session = session
    pw = tmp_path / "admin.pw"
    pw.write_text("wrong\n")
    try:
        code, out, err = run(capsys, "--socket", server.path, "--password-file", str(pw), "clients")
    finally:
        server.close()
    assert (code, err) == (3, "pocketproxyctl: admin socket rejected the password\n")


def test_openvpn_style_error_reply_is_a_rejection(tmp_path, capsys):
    server = FakeAdmin(password=b"s3cret")

    def session(conn):
        conn.sendall(b"ENTER PASSWORD:")
        conn.recv(100)
        conn.sendall(b"ERROR: bad password\r\nENTER PASSWORD:")
        conn.recv(100)

    server._session = session
    pw = tmp_path / "admin.pw"
    pw.write_text("wrong\n")
    try:
        code, out, err = run(capsys, "--socket", server.path, "--password-file", str(pw), "clients")
    finally:
        server.close()
    assert (code, err) == (3, "pocketproxyctl: admin socket rejected the password\n")


def test_prompt_without_a_password_exits_3_with_a_hint(pw_admin, capsys):
    code, out, err = run(capsys, "--socket", pw_admin.path, "--timeout", "2", "clients")
    assert code == 3
    assert err == (
        "pocketproxyctl: admin socket %s asks for a password; give --password-file FILE "
        "(or --config with admin.password_file set)\n" % pw_admin.path
    )
    assert pw_admin.attempts == []


def test_password_file_unused_without_a_prompt(admin, tmp_path, capsys):
    """No prompt: the file is not even read (an unreadable one does no harm)."""
    code, out, err = run(capsys, "--socket", admin.path, "--password-file", str(tmp_path / "missing"), "drain")
    assert code == 0 and err == ""
    assert admin.raw == b"pp drain --json\nquit\n"


@pytest.mark.parametrize("content, words", [(None, "bad password file: cannot read"), (b"\nx\n", "first line is empty")])
def test_bad_password_file_exits_2(pw_admin, tmp_path, capsys, content, words):
    pw = tmp_path / "admin.pw"
    if content is not None:
        pw.write_bytes(content)
    code, out, err = run(capsys, "--socket", pw_admin.path, "--password-file", str(pw), "clients")
    assert code == 2 and words in err, err
    assert pw_admin.attempts == []


def _config_with_password(tmp_path, socket_path, password_line, valid=True):
    (tmp_path / "admin.pw").write_text(password_line)
    head = "openvpn:\n  management: unix:/run/x.sock\n  subnet: 10.9.0.0/24\n  server_address: 10.9.0.1\n"
    if valid:
        (tmp_path / "users.yaml").write_text("devices: {}\nusers: {}\n")
    config = tmp_path / "pocketproxy.yaml"
    config.write_text(
        (head if valid else "")
        + "directory:\n  file: users.yaml\nadmin:\n  socket: %s\n  password_file: admin.pw\n" % socket_path
    )
    return config


def test_password_from_config(pw_admin, tmp_path, capsys):
    config = _config_with_password(tmp_path, pw_admin.path, "s3cret\n")
    code, out, err = run(capsys, "--config", str(config), "--json", "drain")
    assert (code, out, err) == (0, '{"draining":false}\n', "")
    assert pw_admin.attempts == [b"s3cret"]


def test_password_from_config_when_the_rest_does_not_validate(pw_admin, tmp_path, capsys):
    config = _config_with_password(tmp_path, pw_admin.path, "s3cret\n", valid=False)
    assert run(capsys, "--config", str(config), "--json", "drain")[:2] == (0, '{"draining":false}\n')


def test_password_file_option_wins_over_config(pw_admin, tmp_path, capsys):
    config = _config_with_password(tmp_path, pw_admin.path, "stale\n")
    pw = tmp_path / "other.pw"
    pw.write_text("s3cret\n")
    code, out, err = run(capsys, "--config", str(config), "--password-file", str(pw), "drain")
    assert code == 0, err
    assert pw_admin.attempts == [b"s3cret"]


def test_against_the_real_admin_protocol(tmp_path, capsys):
    """pocketproxyctl logs in on the exact bytes the real AdminProtocol sends (prompt, SUCCESS, banner)."""
    from ovpnmgr.admin import AdminProtocol
    from twisted.internet.testing import StringTransport

    proto = AdminProtocol(operations=None, password=b"s3cret")
    transport = StringTransport()
    proto.makeConnection(transport)
    prompt = transport.value()
    transport.clear()
    proto.dataReceived(b"s3cret\n")
    after = transport.value()
    server = FakeAdmin(password=b"s3cret")

    def session(conn):
        conn.sendall(prompt)
        buf = b""
        while b"\n" not in buf:
            buf += conn.recv(100)
        assert buf == b"s3cret\n"
        conn.sendall(after)
        while b"quit\n" not in buf:
            data = conn.recv(100)
            if not data:
                return
            buf += data
            if b"load-stats\n" in buf and b"quit" not in buf:
                conn.sendall(b"SUCCESS: nclients=0,bytesin=0,bytesout=0\r\n")

    server._session = session
    pw = tmp_path / "admin.pw"
    pw.write_text("s3cret\n")
    try:
        code, out, err = run(capsys, "--socket", server.path, "--password-file", str(pw), "raw", "load-stats")
    finally:
        server.close()
    assert (code, out, err) == (0, "nclients=0,bytesin=0,bytesout=0\n", "")


def test_devices_with_health_adds_state_rtt_exit_and_since(capsys):
    data = {"devices": [
        {"device": "phone", "upstream": "http://192.168.255.2:8080", "users": ["alice"], "connected": [],
         "health": {"state": "down", "rtt_ms": 412.3, "exit_address": "203.0.113.2", "since": "2026-12-07T22:00:01.250+00:00"}},
        {"device": "spare", "upstream": "socks5://192.168.255.3:1080", "users": [], "connected": [], "health": None},
    ]}
    server = FakeAdmin({b"pp devices --json": [json.dumps(data), "END"]})
    try:
        code, out, err = run(capsys, "--socket", server.path, "devices")
    finally:
        server.close()
    lines = [line.split() for line in out.splitlines()]
    assert code == 0 and lines[0] == ["DEVICE", "UPSTREAM", "USERS", "CONNECTED", "STATE", "RTT", "EXIT", "SINCE"]
    assert lines[1][4:] == ["down", "412", "ms", "203.0.113.2", "2026-12-07T22:00:01.250+00:00"]
    assert lines[2][4:] == ["-", "-", "-", "-"]


def test_rotate_waits_for_the_result_and_fails_with_its_reason(capsys):
    done = {"device": "phone", "state": "done", "old_address": "203.0.113.2", "new_address": "203.0.113.50", "seconds": 4.2, "error": None}
    failed = dict(done, state="failed", new_address=None, error="exit address still 203.0.113.2 after 120 s")
    server = FakeAdmin({
        b"pp rotate phone --json": [json.dumps(done), "END"],
        b"pp rotate phone2 --json": [json.dumps(failed), "END"],
        b"pp rotate spare --json": ["ERROR: device spare has no rotation action (devices.spare.rotate in the users file)"],
    })
    try:
        code, out, err = run(capsys, "--socket", server.path, "rotate", "phone")
        assert code == 0 and out.strip() == "device phone rotated: exit address 203.0.113.2 -> 203.0.113.50 in 4.2 s"
        code, out, err = run(capsys, "--socket", server.path, "rotate", "phone2")
        assert code == 1 and "rotate phone2: failed: exit address still 203.0.113.2 after 120 s" in err
        code, out, err = run(capsys, "--socket", server.path, "rotate", "spare")
        assert code == 1 and "has no rotation action" in err
    finally:
        server.close()


def test_rotate_gets_a_longer_default_deadline_than_other_commands():
    from ovpnmgr import ctl

    args = ctl.build_parser().parse_args(["rotate", "phone"])
    assert args.timeout is None and ctl.ROTATE_TIMEOUT >= 150 and ctl.DEFAULT_TIMEOUT == 10
