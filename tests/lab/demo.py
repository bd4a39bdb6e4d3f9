"""``make demo``: a real OpenVPN client admitted by pocketproxy under twistd, browsing through a phone.

Builds the lab (server namespace with OpenVPN 2.6 and pocketproxy, one
namespace per customer, a "phone" namespace running tinyproxy and an origin
reachable only through the phone, with a DNS server for ``origin.test``),
connects customers (one with a wrong password), resolves ``origin.test`` with
the pushed DNS server (pocketproxy, which asks through the phone), fetches
``http://origin.test/whoami`` and an HTTPS page from a customer through
pocketproxy and the phone, prints what an operator would
look at — the daemon's log, the kernel ipset and the pocketproxy chains — and
tears everything down on exit or Ctrl-C. ``--hold`` keeps the lab up until
Ctrl-C. Every wait is bounded.
"""

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from tests.lab.daemon import ROOT, Daemon
from tests.lab.openvpn import Lab
from tests.lab.world import ORIGIN_IP, ORIGIN_NAME, PUSH_ROUTE, World

USERS = {"alice": {"password": "alice-pw"}, "bob": {"password": "bob-pw", "address": "10.9.0.77"}}


LOG_KEYS = (
    "ipset member added",
    "client-auth sent",
    "admitted user",
    "denied cid",
    "reconciled",
    "proxy listening",
    "refused connection",
    "upstream failed",
)


def section(title):
    print("\n=== %s ===" % title, flush=True)


def show(lab, *argv):
    out = lab.server_ns.run(*argv, check=False)
    print("$ %s\n%s" % (" ".join(argv), (out.stdout + out.stderr).rstrip()), flush=True)


def ctl(admin_socket, *argv):
    """Run ``pocketproxyctl`` from the checkout against the daemon's admin socket; print it like a shell."""
    command = [sys.executable, "-m", "ovpnmgr.ctl", "--socket", admin_socket, *argv]
    out = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=str(ROOT))
    print("$ pocketproxyctl %s\n%s" % (" ".join(argv), (out.stdout + out.stderr).rstrip()), flush=True)
    return out


def browse(client, url, *curl_args):
    """Fetch ``url`` with curl in the client's namespace; print the command and the answer."""
    argv = ["curl", "-sS", "--max-time", "10", *curl_args, url]
    started = time.monotonic()
    out = client.ns.run(*argv, check=False, timeout=30)
    answer = out.stdout.strip() or out.stderr.strip() or "(nothing)"
    status = "ok" if out.returncode == 0 else "curl exit %d" % out.returncode
    ms = (time.monotonic() - started) * 1000
    print("%s$ %s\n%s   [%s, %.0f ms]" % (client.name, " ".join(argv), answer, status, ms), flush=True)
    return out.stdout.strip() if out.returncode == 0 else None


@contextlib.contextmanager
def pushed_resolver(client, server_ip):
    """What a client's resolvconf hook does with the pushed ``dhcp-option DNS``: ``nameserver``
    in the client namespace's /etc/resolv.conf (``ip netns exec`` bind-mounts
    /etc/netns/NAME/resolv.conf). Removed on exit."""
    directory = os.path.join("/etc/netns", client.ns.name)
    os.makedirs(directory, exist_ok=True)
    try:
        with open(os.path.join(directory, "resolv.conf"), "w") as f:
            f.write("nameserver %s\noptions timeout:3 attempts:2\n" % server_ip)
        yield
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run(hold):
    workdir = tempfile.mkdtemp(prefix="pocketproxy-demo-")
    with contextlib.ExitStack() as stack:
        lab = stack.enter_context(Lab(os.path.join(workdir, "lab")))
        world = stack.enter_context(World(lab.server_ns, os.path.join(workdir, "world")))
        section("lab")
        print(
            "server namespace %s: OpenVPN 2.6 (pid %s), management socket %s"
            % (lab.server_ns.name, lab.server.pid, lab.server.mgmt_socket)
        )
        phone = world.add_device("phone", username="dev", password="devpw")
        print(
            "phone namespace %s: tinyproxy (pid %s) at %s, reaches the origin from %s"
            % (phone.ns.name, phone.proc.pid, phone.url.replace(":devpw@", ":***@"), phone.origin_ip)
        )
        print(
            "origin namespace %s: %s (%s) HTTP :80, HTTPS :443, banner :22; linked only to the phone"
            % (world.origin.ns.name, ORIGIN_IP, ORIGIN_NAME)
        )
        dns = world.start_dns()
        print("origin DNS server for zone test. on %s:53 (the customers' resolver, reached through the phone)" % dns.address)
        print("server -> origin directly: %s" % (world.server_route_error() or "ROUTE EXISTS (unexpected)"))
        admin_socket = os.path.join(workdir, "admin.sock")
        daemon = Daemon(
            lab.server_ns, os.path.join(workdir, "daemon"), lab.server.mgmt_socket, USERS,
            devices={"phone": phone.url}, openvpn={"push": [PUSH_ROUTE]}, admin={"socket": admin_socket},
            dns={"resolver": "%s:53" % ORIGIN_IP},
        ).start()
        daemon.wait_log(r"reconciled with OpenVPN", timeout=30)
        print("pocketproxy under twistd (pid %s), config %s" % (daemon.proc.pid, daemon.config_path))

        section("customers connect")
        started = time.monotonic()
        alice = lab.add_client("alice", username="alice", password="alice-pw")
        bob = lab.add_client("bob", username="bob", password="bob-pw")
        mallory = lab.add_client("mallory", username="alice", password="guess")
        alice_ip = alice.wait_connected(timeout=30)
        bob_ip = bob.wait_connected(timeout=30)
        print(
            "alice connected as %s, bob as %s (static), %.1fs after start"
            % (alice_ip, bob_ip, time.monotonic() - started)
        )
        reason = mallory.wait_auth_failed(timeout=30)
        print("mallory (wrong password for alice) refused: %s" % reason)
        print("alice pings the server through the tunnel: %s" % ("ok" if alice.ping(lab.server.vpn_ip) else "FAILED"))

        section("alice browses by name: DNS and TCP both go VPN -> pocketproxy -> phone -> origin")
        pushed = [line for line in alice.log_text().splitlines() if "PUSH_REPLY" in line]
        print("pushed to alice: %s" % ("dhcp-option DNS %s" % lab.server.vpn_ip if any(
            "dhcp-option DNS %s" % lab.server.vpn_ip in line for line in pushed) else "NO dhcp-option DNS"))
        stack.enter_context(pushed_resolver(alice, lab.server.vpn_ip))
        mark = phone.log_mark()
        dns_mark = dns.log_mark()
        seen = browse(alice, "http://%s/whoami" % ORIGIN_NAME)
        for query in dns.queries(since=dns_mark, qname=ORIGIN_NAME):
            print("origin DNS server: %s %s from %s over %s" % (query.qtype, query.qname, query.source, query.proto))
        through_phone = seen == phone.origin_ip
        print(
            "the origin saw %s: %s"
            % (seen or "nothing", "the phone's address" if through_phone else "NOT the phone's address %s" % phone.origin_ip)
        )
        browse(alice, "https://%s/" % ORIGIN_NAME, "--cacert", world.origin.ca_cert)
        print("the phone's tinyproxy log (what pocketproxy asked it for):")
        for line in phone.log_text()[mark:].splitlines():
            if "Request (" in line:
                print("  " + line.split(": ", 1)[-1])

        section("what an operator looks at: pocketproxyctl over the admin socket")
        ctl(admin_socket, "clients")
        ctl(admin_socket, "devices")
        ctl(admin_socket, "rules", "check")

        section("pocketproxy's log (admissions and denials)")
        for line in daemon.log_text().splitlines():
            if any(k in line for k in LOG_KEYS):
                print(line.split("] ", 1)[-1])

        section("kernel state an operator checks")
        show(lab, "ipset", "list", "pocketproxy-clients")
        show(lab, "iptables", "-t", "nat", "-S", "POCKETPROXY")
        show(lab, "iptables", "-t", "filter", "-S", "POCKETPROXY")
        show(lab, "iptables", "-t", "filter", "-S", "POCKETPROXY-IN")

        section("restart pocketproxy (SIGKILL) — clients stay connected, state rebuilt from status 3")
        mark = daemon.log_mark()
        daemon.kill()
        daemon.start()
        match = daemon.wait_log(r"reconciled with OpenVPN: .*", timeout=30, since=mark)
        print(match.group(0))
        daemon.wait_log(r"transparent proxy listening", timeout=30, since=mark)
        print("alice still pings: %s" % ("ok" if alice.ping(lab.server.vpn_ip) else "FAILED"))
        browse(alice, "http://%s/whoami" % ORIGIN_IP)

        if hold:
            section("lab is up; Ctrl-C tears it down")
            print("daemon log: %s" % daemon.log_path)
            print("try: ip netns exec %s curl http://%s/whoami" % (alice.ns.name, ORIGIN_NAME))
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass
        section("tearing down")
    print("done: namespaces, processes and rules removed.")
    if not through_phone:
        print("FAILED: the origin did not see the phone's address")
        return 1
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
