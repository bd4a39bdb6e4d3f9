"""Smoke test of the INSTALLED package: the real daemon, unprivileged, in a lab.

Run as root from the checkout, after ``apt-get install ./dist/pocketproxy_*.deb``::

    /usr/bin/python3 -m tests.package.smoke

The checkout supplies only the lab (namespaces, OpenVPN, PKI, phone, origin). The
daemon is ``/usr/bin/twistd3 pocketproxy`` from dist-packages, started with a clean
environment (no PYTHONPATH) in a directory outside the checkout, through ``setpriv``
with exactly what ``pocketproxy.service`` grants: uid/gid pocketproxy, CAP_NET_ADMIN,
CAP_NET_RAW and CAP_NET_BIND_SERVICE as the only (ambient, inheritable, bounding)
capabilities, no_new_privs.

It checks, failing with a message and the logs otherwise:

1. the daemon runs as uid pocketproxy with CapEff = CAP_NET_ADMIN + CAP_NET_RAW +
   CAP_NET_BIND_SERVICE only (0000000000003400);
2. OpenVPN runs the shipped server config (lab paths swapped in), with
   ``management-client-user/group pocketproxy``;
3. the daemon installs its chains (``iptables-restore`` under those capabilities) and
   admits a password user and a certificate-only user whose profiles come from the
   installed ``pocketproxyctl client-config`` (ipset member added over netlink,
   address pushed with ``ifconfig-push``);
4. a TCP fetch from the client reaches the origin through the phone (the origin
   sees the phone's address);
5. ``pocketproxyctl clients`` over the admin socket lists both users;
6. SIGTERM to the daemon's PID ends it cleanly ("Server Shut Down.", exit 0 or the
   re-raised SIGTERM as twistd 22.4 does, admin socket removed).

Everything it creates (namespaces, processes, temporary files) is removed on exit.
"""

import grp
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import yaml

from tests.lab.netns import read_log, wait_for, wait_log
from tests.lab.openvpn import Lab, SERVER_PORT, SERVER_UNDERLAY_IP, VPN_SUBNET
from tests.lab.world import ORIGIN_IP, World
from tests.package.shipped import INSTALLED_SERVER_CONF, add_profile_client, install_shipped_server

TWISTD = "/usr/bin/twistd3"
CTL = "/usr/bin/pocketproxyctl"
INSTALLED_CONFIG = "/etc/pocketproxy/pocketproxy.yaml"
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
CAP_NET_RAW, CAP_NET_ADMIN, CAP_NET_BIND_SERVICE = 13, 12, 10
#: pocketproxy.service's AmbientCapabilities= / CapabilityBoundingSet=. CAP_NET_RAW is needed by
#: iptables' set match (libxt_set opens a raw socket for SO_IP_SET), CAP_NET_BIND_SERVICE by the
#: DNS service on port 53; see the unit file.
UNIT_CAPS = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW) | (1 << CAP_NET_BIND_SERVICE)
NETCLIENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lab", "netclient.py")
SETPRIV = [
    "setpriv",
    "--reuid=pocketproxy",
    "--regid=pocketproxy",
    "--init-groups",
    "--inh-caps=-all,+net_admin,+net_raw,+net_bind_service",
    "--ambient-caps=-all,+net_admin,+net_raw,+net_bind_service",
    "--bounding-set=-all,+net_admin,+net_raw,+net_bind_service",
    "--no-new-privs",
]


def step(text):
    print("smoke: %s" % text, flush=True)


def run(argv, **kwargs):
    """Run a host command with the clean environment; output captured as text."""
    kwargs.setdefault("env", CLEAN_ENV)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, **kwargs)


def proc_status(pid):
    with open("/proc/%d/status" % pid) as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def check_privileges(pid, uid, gid):
    """uid/gid pocketproxy everywhere, the unit's capabilities only, no_new_privs; returns a summary line."""
    status = proc_status(pid)
    uids, gids = status["Uid"].split(), status["Gid"].split()
    if uids != [str(uid)] * 4 or gids != [str(gid)] * 4:
        raise AssertionError("daemon Uid %s Gid %s, expected all %d/%d" % (uids, gids, uid, gid))
    want = UNIT_CAPS
    caps = {name: int(status[name], 16) for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    for name, value in caps.items():
        if value != want:
            raise AssertionError("daemon %s = %016x, expected %016x (CAP_NET_ADMIN, CAP_NET_RAW and CAP_NET_BIND_SERVICE only)" % (name, value, want))
    if status.get("NoNewPrivs", "0").strip() != "1":
        raise AssertionError("daemon runs without no_new_privs")
    with open("/proc/%d/environ" % pid, "rb") as f:
        environ = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    if b"PYTHONPATH" in environ:
        raise AssertionError("daemon has PYTHONPATH=%r: it must run the installed code" % environ[b"PYTHONPATH"])
    return "uid=%s gid=%s CapEff=%s CapBnd=%s CapAmb=%s NoNewPrivs=1" % (
        uids[0], gids[0], status["CapEff"], status["CapBnd"], status["CapAmb"]
    )


def write_private(path, text, gid, mode=0o640):
    with open(path, "w") as f:
        f.write(text)
    os.chown(path, 0, gid)
    os.chmod(path, mode)


def hash_password(password):
    out = run([CTL, "hash-password", "--stdin"], input=password + "\n")
    if out.returncode != 0:
        raise AssertionError("pocketproxyctl hash-password failed: %s" % out.stderr)
    return out.stdout.strip()


def client_config(config, user, pki, cert_cn):
    cert, key = pki.client(cert_cn)
    argv = [
        CTL, "client-config", user, "--config", config,
        "--remote", "%s:%d" % (SERVER_UNDERLAY_IP, SERVER_PORT),
        "--ca", pki.ca_cert, "--tls-crypt", pki.tls_crypt_key, "--cert", cert, "--key", key,
    ]
    out = run(argv)
    if out.returncode != 0:
        raise AssertionError("pocketproxyctl client-config %s: exit %d: %s" % (user, out.returncode, out.stderr))
    return out.stdout


def smoke(workdir):
    user = pwd.getpwnam("pocketproxy")
    gid = grp.getgrnam("pocketproxy").gr_gid
    os.chmod(workdir, 0o711)  # the daemon traverses to its files; it cannot list them
    rundir = os.path.join(workdir, "run")  # stands in for /run/pocketproxy (tmpfiles.d: 0750 pocketproxy:pocketproxy)
    etcdir = os.path.join(workdir, "etc")  # stands in for /etc/pocketproxy
    os.mkdir(rundir, 0o750)
    os.chown(rundir, user.pw_uid, gid)
    os.mkdir(etcdir, 0o750)
    os.chown(etcdir, 0, gid)
    mgmt_socket = os.path.join(rundir, "openvpn-mgmt.sock")
    admin_socket = os.path.join(rundir, "admin.sock")

    with Lab(os.path.join(workdir, "lab"), start_server=False) as lab, World(
        lab.server_ns, os.path.join(workdir, "world"), lab.internet
    ) as world:
        server = install_shipped_server(lab, INSTALLED_SERVER_CONF, mgmt_socket)
        step("OpenVPN runs the installed example config (pid %d), management socket %s" % (server.pid, mgmt_socket))
        phone = world.add_device("phone", username="dev", password="devpw")

        users = {
            "devices": {"phone": {"upstream": phone.url}},
            "users": {
                "alice": {"password": hash_password("alice-pw"), "device": "phone"},
                "carol": {"common_name": "carol", "device": "phone"},
            },
        }
        users_path = os.path.join(etcdir, "users.yaml")
        write_private(users_path, yaml.safe_dump(users), gid)
        with open(INSTALLED_CONFIG) as f:
            config = yaml.safe_load(f)
        config["openvpn"].update(management="unix:%s" % mgmt_socket)
        config.setdefault("admin", {}).update(socket=admin_socket)
        config["directory"]["file"] = users_path
        config_path = os.path.join(etcdir, "pocketproxy.yaml")
        write_private(config_path, yaml.safe_dump(config), gid)

        log_path = os.path.join(workdir, "daemon.log")
        argv = SETPRIV + [TWISTD, "--nodaemon", "--pidfile=", "pocketproxy", "--config", config_path]
        with open(log_path, "ab") as log:
            daemon = lab.server_ns.popen(
                argv, env=CLEAN_ENV, cwd=rundir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

        def exited():
            return "daemon exited (%s)" % daemon.returncode if daemon.poll() is not None else None

        def tail():
            return read_log(log_path)[-4000:]

        try:
            wait_log(log_path, r"reconciled with OpenVPN", 30, 0, exited, tail)
            step("daemon %s (pid %d) attached to OpenVPN" % (TWISTD, daemon.pid))
            step("daemon privileges: %s" % check_privileges(daemon.pid, user.pw_uid, gid))

            nat = lab.server_ns.run("iptables", "-t", "nat", "-S", config["firewall"]["chain"]).stdout
            if "REDIRECT" not in nat or config["firewall"]["ipset"] not in nat:
                raise AssertionError("nat chain not installed by the daemon:\n%s" % nat)
            step("iptables-restore under the unit capabilities installed: %s" % " | ".join(nat.strip().splitlines()[1:]))

            alice = add_profile_client(lab, "alice", client_config(config_path, "alice", lab.pki, "alice"), "alice", "alice-pw")
            carol = add_profile_client(lab, "carol", client_config(config_path, "carol", lab.pki, "carol"))
            alice_ip = alice.wait_connected(timeout=40)
            carol_ip = carol.wait_connected(timeout=40)
            for name, ip in (("alice", alice_ip), ("carol", carol_ip)):
                if ip is None or ipaddress_in(ip, VPN_SUBNET) is False:
                    raise AssertionError("%s got no address in %s: %r" % (name, VPN_SUBNET, ip))
            members = lab.server_ns.run("ipset", "list", config["firewall"]["ipset"]).stdout
            for ip in (alice_ip, carol_ip):
                if not re.search(r"^%s$" % re.escape(ip), members, re.M):
                    raise AssertionError("%s is not an ipset member:\n%s" % (ip, members))
            step("admitted: alice (password) %s, carol (certificate only) %s; both ipset members" % (alice_ip, carol_ip))

            out = alice.ns.run("/usr/bin/python3", NETCLIENT, "--timeout", "15", "fetch", "http://%s/whoami" % ORIGIN_IP, check=False)
            result = json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else {}
            seen = (result.get("body") or "").strip()
            if seen != phone.origin_ip:
                raise AssertionError("origin saw %r, expected the phone's %s (%s)" % (seen, phone.origin_ip, out.stderr or out.stdout))
            step("alice fetched http://%s/whoami through the phone: the origin saw %s" % (ORIGIN_IP, seen))
            reply = [line for line in alice.log_text().splitlines() if "PUSH_REPLY" in line][-1]
            if "redirect-gateway def1 ipv6,block-ipv6" not in reply:
                raise AssertionError("alice did not get the full tunnel: %s" % reply)
            sources = world.origin_sources()
            if not sources <= world.phone_addresses() or lab.internet.leaked() != {"customer": 0, "server": 0}:
                raise AssertionError("something but the phone reached the origin: %s, %s" % (sources, lab.internet.leaked()))
            step("alice got the full tunnel; the origin saw only the phone and the lab internet counted no leak")

            out = run([CTL, "--socket", admin_socket, "clients"])
            print(out.stdout.rstrip(), flush=True)
            if out.returncode != 0 or "alice" not in out.stdout or "carol" not in out.stdout:
                raise AssertionError("pocketproxyctl clients: exit %d: %s%s" % (out.returncode, out.stdout, out.stderr))
            step("pocketproxyctl clients over the admin socket lists alice and carol")

            os.kill(daemon.pid, signal.SIGTERM)
            code = daemon.wait(timeout=20)
            # twistd re-raises the signal that stopped the reactor once shutdown is complete, so a
            # clean stop ends "killed by SIGTERM" (systemd counts that as success for the main
            # process); anything else, or no "Server Shut Down.", is a failure.
            if code not in (0, -signal.SIGTERM) or "Server Shut Down." not in read_log(log_path):
                raise AssertionError("daemon did not shut down cleanly after SIGTERM (exit status %s)" % code)
            wait_for(lambda: not os.path.exists(admin_socket), 5, what="admin socket removed at stop")
            if "Traceback" in read_log(log_path):
                raise AssertionError("traceback in the daemon log")
            step(
                "daemon stopped by PID %d: 'Server Shut Down.', %s, admin socket removed, no traceback"
                % (daemon.pid, "exit 0" if code == 0 else "re-raised SIGTERM")
            )
        except BaseException:
            print("==== daemon log (%s) ====\n%s" % (log_path, tail()), flush=True)
            print(lab.logs(), flush=True)
            raise
        finally:
            if daemon.poll() is None:
                lab.server_ns.stop(daemon)


def ipaddress_in(ip, network):
    import ipaddress

    try:
        return ipaddress.IPv4Address(ip) in network
    except ValueError:
        return False


def main():
    if os.geteuid() != 0:
        sys.exit("smoke: needs root (network namespaces)")
    for path in (TWISTD, CTL, INSTALLED_SERVER_CONF, INSTALLED_CONFIG):
        if not os.path.exists(path):
            sys.exit("smoke: %s missing: install the package first" % path)
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="ppsmoke-")
    try:
        smoke(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    step("PASSED in %.1fs" % (time.monotonic() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
