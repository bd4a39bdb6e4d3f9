"""``make demo``: a real OpenVPN client admitted by pocketproxy under twistd, in a namespace lab.

Builds the lab (server namespace with OpenVPN 2.6 and pocketproxy, one
namespace per customer), connects two customers (one with a password, one
with a wrong password), prints what an operator would look at — the daemon's
admission log, the kernel ipset and the pocketproxy chains — and tears
everything down on exit or Ctrl-C. ``--hold`` keeps the lab up until Ctrl-C.
"""

import argparse
import os
import signal
import sys
import tempfile
import time

from tests.lab.daemon import Daemon
from tests.lab.openvpn import Lab

USERS = {"alice": {"password": "alice-pw"}, "bob": {"password": "bob-pw", "address": "10.9.0.77"}}


def section(title):
    print("\n=== %s ===" % title, flush=True)


def show(lab, *argv):
    out = lab.server_ns.run(*argv, check=False)
    print("$ %s\n%s" % (" ".join(argv), (out.stdout + out.stderr).rstrip()), flush=True)


def run(hold):
    workdir = tempfile.mkdtemp(prefix="pocketproxy-demo-")
    with Lab(os.path.join(workdir, "lab")) as lab:
        section("lab")
        print("server namespace %s: OpenVPN 2.6 (pid %s), management socket %s" % (lab.server_ns.name, lab.server.pid, lab.server.mgmt_socket))
        daemon = Daemon(lab.server_ns, os.path.join(workdir, "daemon"), lab.server.mgmt_socket, USERS).start()
        daemon.wait_log(r"reconciled with OpenVPN", timeout=30)
        print("pocketproxy under twistd (pid %s), config %s" % (daemon.proc.pid, daemon.config_path))

        section("customers connect")
        started = time.monotonic()
        alice = lab.add_client("alice", username="alice", password="alice-pw")
        bob = lab.add_client("bob", username="bob", password="bob-pw")
        mallory = lab.add_client("mallory", username="alice", password="guess")
        alice_ip = alice.wait_connected(timeout=30)
        bob_ip = bob.wait_connected(timeout=30)
        print("alice connected as %s, bob as %s (static), %.1fs after start" % (alice_ip, bob_ip, time.monotonic() - started))
        reason = mallory.wait_auth_failed(timeout=30)
        print("mallory (wrong password for alice) refused: %s" % reason)
        print("alice pings the server through the tunnel: %s" % ("ok" if alice.ping(lab.server.vpn_ip) else "FAILED"))

        section("pocketproxy's log (admissions and denials)")
        for line in daemon.log_text().splitlines():
            if any(k in line for k in ("ipset member added", "client-auth sent", "admitted user", "denied cid", "reconciled")):
                print(line.split("] ", 1)[-1])

        section("kernel state an operator checks")
        show(lab, "ipset", "list", "pocketproxy-clients")
        show(lab, "iptables", "-t", "nat", "-S", "POCKETPROXY")
        show(lab, "iptables", "-t", "filter", "-S", "POCKETPROXY")

        section("restart pocketproxy (SIGKILL) — clients stay connected, state rebuilt from status 3")
        mark = daemon.log_mark()
        daemon.kill()
        daemon.start()
        match = daemon.wait_log(r"reconciled with OpenVPN: .*", timeout=30, since=mark)
        print(match.group(0))
        print("alice still pings: %s" % ("ok" if alice.ping(lab.server.vpn_ip) else "FAILED"))

        if hold:
            section("lab is up; Ctrl-C tears it down")
            print("daemon log: %s" % daemon.log_path)
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass
        section("tearing down")
    print("done: namespaces, processes and rules removed.")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hold", action="store_true", help="keep the lab up until Ctrl-C")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("make demo needs root (network namespaces, tun, ipset, iptables)")
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return run(args.hold)
    except KeyboardInterrupt:
        print("interrupted; lab torn down.")
        return 130


if __name__ == "__main__":
    sys.exit(main())
