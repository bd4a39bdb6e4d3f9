"""The shipped OpenVPN server config and generated client profiles, run in the lab.

- :class:`ShippedServer` runs ``conf/openvpn/server.conf`` (or the installed copy in
  ``/usr/share/doc/pocketproxy/examples/openvpn/``) with only the lab's paths
  swapped in: the PKI files, the management socket, a log and a pid file.
- :func:`add_profile_client` starts a lab client whose whole config is a profile
  from ``pocketproxyctl client-config`` (the ``auth-user-pass`` line given a file,
  the tun device named, a log and a pid file added), as a customer would use it.

Both reuse :mod:`tests.lab.openvpn` (namespaces, start/stop by PID, log waits) and
need no change to it: the server replaces ``lab.server`` before it starts
(``Lab(start_server=False)``), the client replaces the one ``add_client(start=False)``
made, in the same namespace.
"""

import contextlib
import io
import os

from tests.lab.openvpn import SERVER_PORT, SERVER_UNDERLAY_IP, OpenVPNClient, OpenVPNServer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE_SERVER_CONF = os.path.join(ROOT, "conf", "openvpn", "server.conf")
INSTALLED_SERVER_CONF = "/usr/share/doc/pocketproxy/examples/openvpn/server.conf"


def directives(path):
    """The config lines of an OpenVPN config file: comments and blank lines dropped."""
    with open(path) as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and line[0] not in "#;"]


#: The management peer check. Dropped where the daemon runs as root from the checkout
#: (tests/integration): there may be no pocketproxy user, and root is not it.
PEER_CHECK = ("management-client-user", "management-client-group")


def lab_server_lines(conf_path, pki, mgmt_socket, log_path, pid_path, drop=()):
    """The shipped server config with the lab's paths; every other line unchanged except
    the options named in ``drop``, which are left out."""
    swap = {
        "ca": pki.ca_cert,
        "cert": pki.server_cert,
        "key": pki.server_key,
        "tls-crypt": pki.tls_crypt_key,
    }
    out, swapped = [], set()
    for line in directives(conf_path):
        words = line.split()
        if words[0] in drop:
            continue
        if words[0] in swap:
            line = "%s %s" % (words[0], swap[words[0]])
            swapped.add(words[0])
        elif words[0] == "management":
            if len(words) < 3 or words[2] != "unix":
                raise AssertionError("shipped config: expected 'management PATH unix', got %r" % line)
            line = " ".join(["management", mgmt_socket] + words[2:])
            swapped.add("management")
        out.append(line)
    missing = (set(swap) | {"management"}) - swapped
    if missing:
        raise AssertionError("shipped config %s lacks %s" % (conf_path, ", ".join(sorted(missing))))
    return ["# %s, lab paths swapped in (generated)" % conf_path] + out + [
        "log-append %s" % log_path,
        "writepid %s" % pid_path,
    ]


class ShippedServer(OpenVPNServer):
    """An :class:`OpenVPNServer` whose config is the shipped one (lab paths swapped in)."""

    def __init__(self, ns, directory, pki, conf_path, mgmt_socket, drop=()):
        super().__init__(ns, directory, pki, mgmt_socket=mgmt_socket)
        self.conf_path = conf_path
        self.drop = tuple(drop)

    def config_lines(self):
        return lab_server_lines(self.conf_path, self.pki, self.mgmt_socket, self.log_path, self.pid_path, self.drop)


def install_shipped_server(lab, conf_path, mgmt_socket, drop=()):
    """Replace ``lab.server`` (made with ``start_server=False``) by a :class:`ShippedServer`; start it."""
    if lab.server is not None and lab.server.running:
        raise RuntimeError("build the Lab with start_server=False")
    lab.server = ShippedServer(lab.server_ns, lab.server.directory, lab.pki, conf_path, mgmt_socket, drop)
    lab.server.start().wait_ready()
    return lab.server


class ProfileClient(OpenVPNClient):
    """An :class:`OpenVPNClient` whose config is a generated ``.ovpn`` profile."""

    def __init__(self, ns, directory, pki, name, remote, profile, **kwargs):
        super().__init__(ns, directory, pki, name, remote, **kwargs)
        self.profile = profile

    def config_lines(self):
        lines = []
        for line in self.profile.splitlines():
            stripped = line.strip()
            if stripped == "dev tun":
                line = "dev %s" % self.dev  # one name per lab client (log parsing, vpn_ip())
            elif stripped == "auth-user-pass":
                if self.username is None:
                    raise AssertionError("profile asks for a password but the lab client has none")
                auth_path = os.path.join(self.directory, "auth.txt")
                with open(auth_path, "w") as f:
                    f.write("%s\n%s\n" % (self.username, self.password or ""))
                os.chmod(auth_path, 0o600)
                line = "auth-user-pass %s" % auth_path
            lines.append(line)
        # A lost control packet stalls a client for its whole hand-window (60 s by default) before
        # it restarts the handshake; CI once saw a client get the server's reset and then nothing
        # for 40 s. 15 s lets a test's 40 s wait cover a second attempt.
        return lines + ["hand-window 15", "log-append %s" % self.log_path, "writepid %s" % self.pid_path]


def add_profile_client(lab, name, profile, username=None, password=None):
    """A lab client (own namespace on the bridge) that runs ``profile``; started."""
    base = lab.add_client(name, username=username, password=password, start=False)
    client = ProfileClient(
        base.ns, base.directory, lab.pki, name, base.remote, profile,
        port=base.port, username=username, password=password, dev=base.dev,
    )
    lab.clients[lab.clients.index(base)] = client
    return client.start()


def client_config(config_path, user, pki, cert_cn, remote=SERVER_UNDERLAY_IP, port=SERVER_PORT):
    """``pocketproxyctl client-config`` (in-process) for ``user`` of the daemon configured by
    ``config_path``, with the lab's PKI → (exit code, profile text, stderr)."""
    from ovpnmgr import ctl

    cert, key = pki.client(cert_cn)
    out, err = io.StringIO(), io.StringIO()
    argv = [
        "--config", str(config_path), "client-config", user, "--remote", "%s:%d" % (remote, port),
        "--ca", pki.ca_cert, "--tls-crypt", pki.tls_crypt_key, "--cert", cert, "--key", key,
    ]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = ctl.main(argv)
    return code, out.getvalue(), err.getvalue()


def profiles(config_path, users, pki):
    """``{user: profile}`` from ``pocketproxyctl client-config`` for each of ``users`` (their
    certificate CN is their name); AssertionError with the command's message if one fails."""
    out = {}
    for user in users:
        code, profile, err = client_config(config_path, user, pki, user)
        if code != 0:
            raise AssertionError("pocketproxyctl client-config %s failed (%d): %s" % (user, code, err.strip()))
        out[user] = profile
    return out
