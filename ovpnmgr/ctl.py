# -*- test-case-name: tests.unit.test_ctl -*-
"""``pocketproxyctl``: the operators' command line.

It talks to the daemon's admin socket (:mod:`ovpnmgr.admin`) with a plain
blocking unix-socket client (a CLI, not the reactor): read the banner, send
one command (``pp <verb> --json``, or an OpenVPN passthrough such as
``status 3``), read the reply up to ``END`` / ``SUCCESS:`` / ``ERROR:``, send
``quit``. Output is a human table by default, the daemon's JSON with
``--json``. ``hash-password``, ``client-config`` and ``db`` (:mod:`ovpnmgr.dbctl`) work
without a daemon.

When the socket asks ``ENTER PASSWORD:`` (``admin.password_file`` set), the
first line of ``--password-file FILE`` (else of ``--config``'s
``admin.password_file``) is sent; a second prompt (or a closed connection)
means the password was rejected (exit 3).

Exit codes (:data:`EXIT_OK` …): 0 ok; 1 the daemon answered ``ERROR`` (this
includes drift found by ``rules check`` and a kick that failed for some
session); 2 usage or configuration error; 3 cannot talk to the admin socket
(missing, permission denied, refused, timeout, closed early, password
missing or rejected).
"""

import argparse
import errno
import getpass
import json
import os
import socket
import sys
import time

from ovpnmgr.adminwire import CLIENT_BYTES, PASSWORD_PROMPT, flatten

__all__ = ["main", "AdminSession", "CtlError", "DEFAULT_SOCKET", "parse_status"]

PROG = "pocketproxyctl"
DEFAULT_SOCKET = "/run/pocketproxy/admin.sock"
DEFAULT_TIMEOUT = 10.0
ROTATE_TIMEOUT = 180.0  # "rotate" waits for the new exit address (health.rotation_timeout, 120 s by default)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class CtlError(Exception):
    """A failure with its message (without the ``pocketproxyctl:`` prefix) and exit code."""

    def __init__(self, message, code):
        super().__init__(message)
        self.message = message
        self.code = code


class Reply:
    """One admin reply: ``kind`` is ``"SUCCESS"``, ``"ERROR"`` or ``"MULTI"``."""

    def __init__(self, kind, text=None, lines=()):
        self.kind = kind
        self.text = text  # SUCCESS/ERROR message, after "SUCCESS: " / "ERROR: "
        self.lines = list(lines)  # MULTI body, without END

    @property
    def ok(self):
        return self.kind != "ERROR"


# --- the admin-socket client ---


def _unreachable(path, exc, timeout):
    if isinstance(exc, socket.timeout):
        return CtlError("admin socket %s did not answer within %gs (is pocketproxy stuck?)" % (path, timeout), EXIT_UNREACHABLE)
    if isinstance(exc, FileNotFoundError) or getattr(exc, "errno", None) == errno.ENOENT:
        return CtlError(
            "admin socket %s not found (is pocketproxy running? admin.socket set?)" % path, EXIT_UNREACHABLE
        )
    if isinstance(exc, PermissionError) or getattr(exc, "errno", None) in (errno.EACCES, errno.EPERM):
        return CtlError(
            "permission denied on %s (run as root or a member of the socket's group)" % path, EXIT_UNREACHABLE
        )
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
        return CtlError(
            "connection refused on %s (stale socket file: pocketproxy is not running)" % path, EXIT_UNREACHABLE
        )
    return CtlError("cannot talk to admin socket %s: %s" % (path, exc.strerror or exc), EXIT_UNREACHABLE)


class AdminSession:
    """A blocking admin-socket session; every read is bounded by one overall deadline."""

    def __init__(self, path, timeout=DEFAULT_TIMEOUT, password=None):
        """
        :param password: bytes to answer ``ENTER PASSWORD:`` with, or a callable
            returning them (read only when asked), or None.
        """
        self.path = path
        self.timeout = timeout
        self.password = password
        self.deadline = time.monotonic() + timeout
        self.sock = None
        self.buffer = b""
        self.banner = None

    def open(self):
        """Connect and read the banner; :class:`CtlError` (exit 3) when that fails."""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(self._remaining())
            self.sock.connect(self.path)
            banner = self._line(prompt=True)
            if banner == PASSWORD_PROMPT.decode():
                banner = self._login()
        except (OSError, EOFError) as e:
            self.close()
            if isinstance(e, EOFError):
                raise CtlError("admin socket %s closed the connection before its banner" % self.path, EXIT_UNREACHABLE)
            raise _unreachable(self.path, e, self.timeout)
        except CtlError:
            self.close()
            raise
        if not banner.startswith(">INFO:"):
            self.close()
            raise CtlError("unexpected banner from %s: %r" % (self.path, banner[:200]), EXIT_UNREACHABLE)
        self.banner = banner
        return self

    def _login(self):
        """Answer the password prompt; return the banner that follows ``SUCCESS``."""
        password = self.password() if callable(self.password) else self.password
        if password is None:
            raise CtlError(
                "admin socket %s asks for a password; give --password-file FILE "
                "(or --config with admin.password_file set)" % self.path,
                EXIT_UNREACHABLE,
            )
        self.sock.settimeout(self._remaining())
        self.sock.sendall(password + b"\n")
        try:
            line = self._line(prompt=True)
        except EOFError:
            line = None  # closed instead of prompting again
        if line is None or line == PASSWORD_PROMPT.decode() or line.startswith("ERROR:"):
            raise CtlError("admin socket rejected the password", EXIT_UNREACHABLE)
        if not line.startswith("SUCCESS:"):
            raise CtlError("unexpected answer to the password from %s: %r" % (self.path, line[:200]), EXIT_UNREACHABLE)
        return self._line()

    def _remaining(self):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        return left

    def _line(self, prompt=False):
        while True:
            if prompt and self.buffer.startswith(PASSWORD_PROMPT):
                self.buffer = self.buffer[len(PASSWORD_PROMPT):]
                return PASSWORD_PROMPT.decode()  # OpenVPN's prompt has no line end
            if b"\n" in self.buffer:
                break
            self.sock.settimeout(self._remaining())
            data = self.sock.recv(65536)
            if not data:
                raise EOFError()
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.rstrip(b"\r").decode("utf-8", "replace")

    def command(self, text):
        """Send one command line; return its :class:`Reply`."""
        try:
            self.sock.settimeout(self._remaining())
            self.sock.sendall(text.encode("utf-8") + b"\n")
            lines = []
            while True:
                line = self._line()
                if not lines and line.startswith(">"):
                    continue  # a real-time notification, not part of the reply
                if not lines and line.startswith("SUCCESS:"):
                    return Reply("SUCCESS", line[len("SUCCESS:"):].strip())
                if not lines and line.startswith("ERROR:"):
                    return Reply("ERROR", line[len("ERROR:"):].strip())
                if line == "END":
                    return Reply("MULTI", lines=lines)
                lines.append(line)
        except EOFError:
            raise CtlError("admin socket %s closed the connection before the reply to %r ended" % (self.path, text.split()[0]), EXIT_UNREACHABLE)
        except OSError as e:
            if isinstance(e, socket.timeout):
                raise CtlError("no complete reply from %s within %gs" % (self.path, self.timeout), EXIT_UNREACHABLE)
            raise _unreachable(self.path, e, self.timeout)

    def close(self):
        """Say ``quit`` (best effort) and close."""
        if self.sock is None:
            return
        try:
            if self.banner is not None:
                self.sock.settimeout(0.5)
                self.sock.sendall(b"quit\n")
        except OSError:
            pass
        self.sock.close()
        self.sock = None

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()


# --- formatting ---


def _cell(value):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ",".join(_cell(v) for v in value) or "-"
    return str(value)


def table(headers, rows):
    """Aligned columns (two spaces apart, last column not padded)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    out = []
    for row in [list(headers)] + cells:
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(out)


#: (JSON key, column title) of ``pp clients``; keys the daemon adds later are appended as extra columns.
CLIENT_COLUMNS = [
    ("user", "USER"),
    ("cid", "CID"),
    ("vpn_ip", "VPN_IP"),
    ("device", "DEVICE"),
    ("connected_since", "CONNECTED_SINCE"),
    ("live_connections", "LIVE"),
    ("state", "STATE"),
    ("tunnel_bytes_in", "TUN_IN"),  # OpenVPN's counters: in = from the client
    ("tunnel_bytes_out", "TUN_OUT"),
    ("proxied_bytes_up", "PROXY_UP"),  # relayed by the proxy: up = client to device
    ("proxied_bytes_down", "PROXY_DOWN"),
    ("tunnel", "TUNNEL"),  # full, or split (all but the pushed routes through the customer's own connection)
]

#: Columns holding byte counts: shown in human units (1023B, 1.5K, 20.0M); --json keeps exact integers.
BYTE_KEYS = frozenset(CLIENT_BYTES)


def human_bytes(n):
    """``n`` bytes as at most six characters: ``512B``, ``1.5K``, ``20.0M``, ``3.2G``, ``1.1T``."""
    if n is None:
        return None
    value = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return "%d%s" % (value, unit) if unit == "B" else "%.1f%s" % (value, unit)
        value /= 1024


def _columns(rows, known):
    keys = [k for k, _ in known]
    extra = []
    for row in rows:
        extra += [k for k in row if k not in keys and k not in extra]
    return known + [(k, k.upper()) for k in extra]


def _format_clients(data):
    rows = data.get("clients", [])
    cols = _columns(rows, CLIENT_COLUMNS)
    cell = lambda row, key: human_bytes(row.get(key)) if key in BYTE_KEYS else row.get(key)
    text = table([t for _, t in cols], [[cell(r, k) for k, _ in cols] for r in rows])
    return text + "\n%d client(s)" % len(rows)


def _format_devices(data):
    devices = data.get("devices", [])
    with_health = any("health" in d for d in devices)  # device health is on
    rows = []
    for d in devices:
        connected = ["%s@%s" % (c.get("user"), c.get("vpn_ip") or "-") for c in d.get("connected", [])]
        row = [d.get("device"), d.get("upstream"), d.get("users"), connected]
        if with_health:
            h = d.get("health") or {}
            rtt = h.get("rtt_ms")
            row += [h.get("state"), None if rtt is None else "%.0f ms" % rtt, h.get("exit_address"), h.get("since")]
        rows.append(row)
    headers = ["DEVICE", "UPSTREAM", "USERS", "CONNECTED"] + (["STATE", "RTT", "EXIT", "SINCE"] if with_health else [])
    return table(headers, rows)


def _format_stats(data):
    return table(["COUNTER", "VALUE"], flatten(data))


def _format_drift(data):
    out = ["rules: %s" % data.get("summary", "ok" if data.get("ok") else "drift")]
    for key, title in (
        ("missing_members", "ipset member missing (admitted client not in the set)"),
        ("extra_members", "ipset member not admitted by pocketproxy"),
        ("rule_problems", "rule problem"),
    ):
        for item in data.get(key) or []:
            out.append("  %s: %s" % (title, item))
    if data.get("missing_chain_rules"):
        out.append("  chain rules missing")
    if data.get("set_missing"):
        out.append("  ipset missing")
    return "\n".join(out)


def parse_status(lines):
    """``status 3`` (tab-separated, ``HEADER`` lines) or ``status 2`` (commas) → JSON-friendly dict.

    ``{"title": …, "time": […], "global": {name: value}, "<TABLE>": [{column: value}]}``
    with one list per ``HEADER`` (``CLIENT_LIST``, ``ROUTING_TABLE``, …).
    """
    out = {}
    headers = {}
    for line in lines:
        sep = "\t" if "\t" in line else ","
        fields = line.split(sep)
        kind = fields[0]
        if kind == "TITLE":
            out["title"] = sep.join(fields[1:])
        elif kind == "TIME":
            out["time"] = fields[1:]
        elif kind == "HEADER" and len(fields) > 1:
            headers[fields[1]] = fields[2:]
            out.setdefault(fields[1], [])
        elif kind == "GLOBAL_STATS" and len(fields) >= 3:
            out.setdefault("global", {})[fields[1]] = fields[2]
        elif kind in headers:
            out[kind].append(dict(zip(headers[kind], fields[1:])))
        else:
            out.setdefault("other", []).append(line)
    return out


# --- commands ---


def _emit(text):
    sys.stdout.write(text + "\n")


def _fail(message):
    sys.stderr.write("%s: %s\n" % (PROG, message))


def _json_reply(reply, request):
    """The JSON object of a ``pp … --json`` reply, or :class:`CtlError` (exit 1) on ERROR."""
    if reply.kind == "ERROR":
        raise CtlError(reply.text, EXIT_ERROR)
    if reply.kind != "MULTI" or len(reply.lines) != 1:
        raise CtlError("unexpected reply to %r: %r" % (request, (reply.text or reply.lines)), EXIT_ERROR)
    try:
        return reply.lines[0], json.loads(reply.lines[0])
    except ValueError:
        raise CtlError("reply to %r is not JSON: %r" % (request, reply.lines[0][:200]), EXIT_ERROR)


def _pp(session, args, verb, formatter):
    request = "pp %s --json" % verb
    raw, data = _json_reply(session.command(request), request)
    _emit(raw if args.json else formatter(data))
    return EXIT_OK


def _cmd_clients(session, args):
    return _pp(session, args, "clients", _format_clients)


def _cmd_devices(session, args):
    return _pp(session, args, "devices", _format_devices)


def _cmd_stats(session, args):
    return _pp(session, args, "stats", _format_stats)


def _cmd_rotate(session, args):
    request = "pp rotate %s --json" % args.device
    raw, data = _json_reply(session.command(request), request)  # ERROR (refused): CtlError, exit 1
    if args.json:
        _emit(raw)
    elif data.get("state") == "done":
        _emit("device %s rotated: exit address %s -> %s in %.1f s" % (args.device, data.get("old_address"), data.get("new_address"), data.get("seconds") or 0))
    if data.get("state") != "done":
        _fail("rotate %s: failed: %s" % (args.device, data.get("error")))
        return EXIT_ERROR
    return EXIT_OK


def _cmd_kick(session, args):
    request = "pp kick %s --json" % args.user
    raw, data = _json_reply(session.command(request), request)
    errors = data.get("errors") or []
    if args.json:
        _emit(raw)
    else:
        _emit("kicked %d session(s) of %s" % (data.get("kicked", 0), data.get("user", args.user)))
        for error in errors:
            _fail("kick %s: %s" % (args.user, error))
    return EXIT_ERROR if errors else EXIT_OK


def _cmd_drain(session, args):
    request = "pp drain --json" if args.state == "status" else "pp drain %s --json" % args.state
    raw, data = _json_reply(session.command(request), request)
    if args.json:
        _emit(raw)
    elif data.get("draining"):
        _emit("drain: on (new admissions are denied with TEMP; connected clients stay)")
    else:
        _emit("drain: off (new admissions accepted)")
    return EXIT_OK


def _cmd_rules(session, args):
    request = "pp rules check --json"
    raw, data = _json_reply(session.command(request), request)
    _emit(raw if args.json else _format_drift(data))
    return EXIT_OK if data.get("ok") else EXIT_ERROR


def _cmd_reload(session, args):
    request = "pp reload --json"
    raw, data = _json_reply(session.command(request), request)
    if args.json:
        _emit(raw)
    elif data.get("ok"):
        _emit(
            "reloaded users file: %d users (added %d, removed %d, changed %d, kicked %d)"
            % tuple(data.get(k, 0) for k in ("users", "added", "removed", "changed", "kicked"))
        )
    else:
        _fail("reload refused: %s; previous users stay in force" % data.get("error", "unknown error"))
    return EXIT_OK if data.get("ok") else EXIT_ERROR


def _cmd_status(session, args):
    request = "status 3"
    reply = session.command(request)
    if reply.kind == "ERROR":
        raise CtlError(reply.text, EXIT_ERROR)
    if reply.kind != "MULTI":
        raise CtlError("unexpected reply to %r: %r" % (request, reply.text), EXIT_ERROR)
    if args.json:
        _emit(json.dumps(parse_status(reply.lines), sort_keys=True, separators=(",", ":")))
    else:
        for line in reply.lines:
            _emit(line)
    return EXIT_OK


def _cmd_raw(session, args):
    request = " ".join(args.words)
    reply = session.command(request)
    if args.json:
        _emit(json.dumps({"ok": reply.ok, "kind": reply.kind, "text": reply.text, "lines": reply.lines}))
    elif reply.kind == "MULTI":
        for line in reply.lines:
            _emit(line)
    elif reply.kind == "SUCCESS":
        _emit(reply.text)
    if reply.kind == "ERROR":
        if not args.json:
            _fail(reply.text)
        return EXIT_ERROR
    return EXIT_OK


def _hash_password(args):
    from ovpnmgr.directory import hash_password  # Twisted-based module: only loaded for this command

    if args.stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            sys.stderr.write("pocketproxyctl: passwords do not match\n")
            return 1
    if not password:
        sys.stderr.write("pocketproxyctl: empty password refused\n")
        return 1
    print(hash_password(password))
    return 0


def _read_input(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise CtlError("%s %s: cannot read: %s" % (what, path, e.strerror or e), EXIT_USAGE)
    except UnicodeDecodeError:
        raise CtlError("%s %s: not a text (PEM) file" % (what, path), EXIT_USAGE)


def _client_config(args):
    """``client-config USER``: print (or write) a client ``.ovpn`` for a user of the users file."""
    from ovpnmgr import profile
    from ovpnmgr.config import DEFAULT_CONFIG_PATH, ConfigError, load_config
    from ovpnmgr.directory import Directory

    try:
        remotes = [profile.parse_remote(r) for r in args.remote]
        if (args.cert is None) != (args.key is None):
            raise CtlError("--cert and --key go together", EXIT_USAGE)
        config_path = args.config or DEFAULT_CONFIG_PATH
        try:
            config = load_config(config_path)
            if config.directory.backend == "postgres":
                from ovpnmgr import pgdirectory

                directory = pgdirectory.load(config)
            else:
                directory = Directory.load(config.directory.file, config.openvpn.subnet, config.openvpn.server_address)
        except ConfigError as e:
            raise CtlError("configuration error: %s" % e, EXIT_USAGE)
        user = directory.users.get(args.user)
        if user is None:
            raise CtlError("no user %r in %s" % (args.user, directory.path), EXIT_ERROR)
        if user.password_hash is None and args.cert is None:
            raise CtlError(
                "user %s is certificate-only (common_name %s, no password): give --cert and --key"
                % (user.name, user.common_name),
                EXIT_USAGE,
            )
        ca = _read_input(args.ca, "--ca")
        cert = key = tls_crypt = None
        if args.cert is not None:
            cert = _read_input(args.cert, "--cert")
            key = _read_input(args.key, "--key")
            try:
                cn = profile.certificate_cn(cert)
            except profile.ProfileError as e:
                raise CtlError("--cert %s: %s" % (args.cert, e), EXIT_USAGE)
            if user.common_name is not None and cn != user.common_name:
                raise CtlError(
                    "--cert %s: its CN %r is not user %s's common_name %r; the server would refuse it"
                    % (args.cert, cn, user.name, user.common_name),
                    EXIT_ERROR,
                )
        if args.tls_crypt is not None:
            tls_crypt = _read_input(args.tls_crypt, "--tls-crypt")
        template = profile.TEMPLATE if args.template is None else _read_input(args.template, "--template")
        text = profile.render(
            user.name, remotes, ca, cert, key, tls_crypt, password=user.password_hash is not None, template=template
        )
        if args.cert is None:
            sys.stderr.write(
                "%s: note: no --cert/--key: the server must accept clients without a certificate "
                "(verify-client-cert none or optional)\n" % PROG
            )
        if args.output in (None, "-"):
            sys.stdout.write(text)
        else:
            try:
                fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
            except OSError as e:
                raise CtlError("--output %s: %s" % (args.output, e.strerror or e), EXIT_ERROR)
        return EXIT_OK
    except profile.ProfileError as e:
        _fail(str(e))
        return EXIT_USAGE
    except CtlError as e:
        _fail(e.message)
        return e.code


def _admin_socket_from_yaml(path, key="socket"):
    """``admin.<key>`` (a path) read straight from the YAML (when the full config does not
    validate for this user, e.g. an unreadable users file); None when absent or unreadable."""
    try:
        import yaml

        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
        value = doc["admin"][key]
    except Exception:
        return None
    if not isinstance(value, str) or not value:
        return None
    return value if os.path.isabs(value) else os.path.join(os.path.dirname(os.path.abspath(path)), value)


def _config_password_file(args):
    """``admin.password_file`` of ``--config`` (validated config first, raw YAML as fallback), or None."""
    from ovpnmgr.config import ConfigError, load_config

    try:
        path = load_config(args.config).admin.password_file
    except ConfigError:
        return _admin_socket_from_yaml(args.config, "password_file")
    return None if path is None else str(path)


def read_password_file(path):
    """The first line of ``path`` as bytes; :class:`CtlError` (exit 2) if unreadable or empty."""
    from ovpnmgr.config import read_secret_file

    try:
        return read_secret_file(path)
    except ValueError as e:
        raise CtlError("bad password file: %s" % e, EXIT_USAGE)


def resolve_password(args):
    """A callable returning the password to answer the prompt with (None when there is none):
    ``--password-file``, else ``--config``'s ``admin.password_file``. Read only when asked."""

    def password():
        path = args.password_file
        if path is None and args.config:
            path = _config_password_file(args)
        return None if path is None else read_password_file(path)

    return password


def resolve_socket(args):
    """The admin socket path: ``--socket``, else ``--config``'s ``admin.socket``, else the default."""
    if args.socket:
        return args.socket
    if not args.config:
        return DEFAULT_SOCKET
    from ovpnmgr.config import ConfigError, load_config

    try:
        path = load_config(args.config).admin.socket
    except ConfigError as e:
        path = _admin_socket_from_yaml(args.config)
        if path is None:
            raise CtlError("configuration error: %s" % e, EXIT_USAGE)
    if not path:
        raise CtlError("admin.socket is not set in %s (the admin socket is disabled)" % args.config, EXIT_USAGE)
    return str(path)


def _timeout(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number: %r" % text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _user(text):
    if not text or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError("a user name has no whitespace: %r" % text)
    return text


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Operate a pocketproxy daemon through its admin socket.",
        epilog="exit codes: 0 ok, 1 the daemon answered ERROR (incl. rules drift), 2 usage, 3 cannot reach the socket",
    )
    parser.add_argument("--socket", metavar="PATH", help="admin socket (default: --config's admin.socket, else %s)" % DEFAULT_SOCKET)
    parser.add_argument("--config", metavar="FILE", help="pocketproxy.yaml to read admin.socket (and admin.password_file) from")
    parser.add_argument(
        "--password-file",
        metavar="FILE",
        help="answer the socket's password prompt with this file's first line (default: --config's admin.password_file)",
    )
    parser.add_argument("--json", action="store_true", help="print the daemon's JSON instead of a table")
    parser.add_argument("--timeout", type=_timeout, default=None, metavar="S", help="overall deadline in seconds (default 10; rotate: 180)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # "--json" is accepted after the command too ("pocketproxyctl clients --json").
    late = argparse.ArgumentParser(add_help=False)
    late.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    def add(name, func, help):
        p = sub.add_parser(name, help=help, parents=[late])
        p.set_defaults(func=func, admin=True)
        return p

    add("clients", _cmd_clients, "connected clients: user, CID, VPN address, device, since, live connections, state")
    add("devices", _cmd_devices, "devices, their users and connected clients")
    add("kick", _cmd_kick, "disconnect every session of USER").add_argument("user", type=_user, metavar="USER")
    add("drain", _cmd_drain, "pause (on) or resume (off) new admissions, or show the state").add_argument(
        "state", nargs="?", default="status", choices=["on", "off", "status"]
    )
    add("rules", _cmd_rules, "compare kernel chain and ipset with admitted clients (exit 1 on drift)").add_argument(
        "action", choices=["check"]
    )
    add("stats", _cmd_stats, "admission and proxy counters")
    add("reload", _cmd_reload, "re-read the users file (removed users kicked, changed devices remapped)")
    add("status", _cmd_status, "OpenVPN's 'status 3', relayed raw (--json: parsed)")
    add(
        "rotate", _cmd_rotate, "change DEVICE's exit address: run its rotation action, wait for a new address (default deadline 180 s)"
    ).add_argument("device", metavar="DEVICE")
    sub.add_parser("raw", help="send one admin command line as is (e.g. 'load-stats', 'pp help')").add_argument(
        "words", nargs=argparse.REMAINDER, metavar="WORD"
    )
    sub.choices["raw"].set_defaults(func=_cmd_raw, admin=True)
    hp = sub.add_parser("hash-password", help="print a scrypt hash for a users-file 'password:' entry")
    hp.add_argument("--stdin", action="store_true", help="read the password from the first line of stdin")
    hp.set_defaults(func=_hash_password, admin=False)
    cc = sub.add_parser(
        "client-config",
        help="print an OpenVPN client profile (.ovpn) for USER of the users file (no daemon needed)",
        description="Print a self-contained OpenVPN client profile for USER (checked against the users file "
        "named by --config's directory.file). The CA (and client certificate, key, tls-crypt key) are inlined.",
    )
    cc.add_argument("user", type=_user, metavar="USER")
    cc.add_argument(
        "--config", metavar="FILE", default=argparse.SUPPRESS, help="pocketproxy.yaml (default /etc/pocketproxy/pocketproxy.yaml)"
    )
    cc.add_argument("--remote", action="append", required=True, metavar="HOST[:PORT]", help="the server's public address (repeatable; port 1194 by default)")
    cc.add_argument("--ca", required=True, metavar="FILE", help="the CA certificate clients verify the server with (PEM)")
    cc.add_argument("--cert", metavar="FILE", help="the user's client certificate (PEM); required for certificate-only users")
    cc.add_argument("--key", metavar="FILE", help="the user's client key (PEM), with --cert")
    cc.add_argument("--tls-crypt", metavar="FILE", help="the server's tls-crypt key, if it uses one")
    cc.add_argument("--template", metavar="FILE", help="profile template (default: the built-in one, as conf/openvpn/client.ovpn.in)")
    cc.add_argument("-o", "--output", metavar="FILE", help="write here (created mode 0600) instead of stdout")
    cc.set_defaults(func=_client_config, admin=False)
    from ovpnmgr import dbctl

    dbctl.add_parser(sub)
    return parser


def main(argv=None):
    """Entry point of the ``pocketproxyctl`` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: 2 on usage errors, 0 for --help
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if not args.admin:
        return args.func(args)
    if args.func is _cmd_raw and (not args.words or args.words[0] in ("quit", "exit")):
        _fail("raw: give one admin command line (not quit/exit), e.g. 'pocketproxyctl raw load-stats'")
        return EXIT_USAGE
    if args.timeout is None:
        args.timeout = ROTATE_TIMEOUT if args.func is _cmd_rotate else DEFAULT_TIMEOUT
    try:
        path = resolve_socket(args)
        with AdminSession(path, args.timeout, resolve_password(args)) as session:
            return args.func(session, args)
    except CtlError as e:
        _fail(e.message)
        return e.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
