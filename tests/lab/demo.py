"""``make demo``: real OpenVPN clients admitted by pocketproxy under twistd, browsing through a phone.

Everything runs as shipped: OpenVPN with ``conf/openvpn/server.conf`` (the lab's paths swapped
in), pocketproxy with the product's defaults (the lab gives paths, users and the phone; its
internet has the default resolver 1.1.1.1), customers with profiles from ``pocketproxyctl
client-config``. And the world is not kind: every customer has her own internet connection
(IPv4 and IPv6 default routes) and the server an uplink, so a leak would reach the origin.

Builds the lab (server namespace with OpenVPN 2.6 and pocketproxy, one namespace per customer
on an ISP, a "phone" namespace running tinyproxy, an origin with a DNS server for
``origin.test``, all on a lab "internet"), connects customers (one with a wrong password),
prints the routes alice got, resolves ``origin.test`` with the pushed DNS server and with a
public resolver of her choosing (both answered by pocketproxy through the phone), fetches
``http://origin.test/whoami`` and an HTTPS page through pocketproxy and the phone, shows that
IPv6 fails at once, prints what an operator would look at (the daemon's log, the kernel ipset
and the pocketproxy chains), restarts the daemon, and tears everything down on exit or Ctrl-C.
``--hold`` keeps the lab up until Ctrl-C. Every wait is bounded. Exits 1 unless the origin saw
the phone's address and nothing else.
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
from tests.lab.dnsclient import dig
from tests.lab.internet import customer_address
from tests.lab.openvpn import Lab
from tests.lab.world import DEFAULT_RESOLVER_IP, ORIGIN_IP, ORIGIN_IP6, ORIGIN_NAME, RESOLVER_IP, World
from tests.package.shipped import PEER_CHECK, SOURCE_SERVER_CONF, add_profile_client, install_shipped_server
from tests.package.shipped import profiles as shipped_profiles

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


def show(ns, *argv):
    out = ns.run(*argv, check=False)
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


def run(hold, workdir):
    with contextlib.ExitStack() as stack:
        lab = stack.enter_context(Lab(os.path.join(workdir, "lab"), start_server=False))
        world = stack.enter_context(World(lab.server_ns, os.path.join(workdir, "world"), lab.internet))
        section("lab")
        server = install_shipped_server(lab, SOURCE_SERVER_CONF, lab.server.mgmt_socket, drop=PEER_CHECK)
        print(
            "server namespace %s: OpenVPN 2.6 (pid %s) running %s (lab paths swapped in), uplink %s"
            % (lab.server_ns.name, server.pid, os.path.relpath(SOURCE_SERVER_CONF, str(ROOT)), lab.server.address)
        )
        phone = world.add_device("phone", username="dev", password="devpw")
        print(
            "phone namespace %s: tinyproxy (pid %s) at %s, reaches the internet from %s"
            % (phone.ns.name, phone.proc.pid, phone.url.replace(":devpw@", ":***@"), phone.origin_ip)
        )
        print(
            "origin namespace %s: %s and %s (%s) HTTP :80, HTTPS :443, banner :22, on the lab internet"
            % (world.origin.ns.name, ORIGIN_IP, ORIGIN_IP6, ORIGIN_NAME)
        )
        dns = world.start_dns()
        print("DNS server for zone test. on %s:53, on the public resolver %s:53 and on %s:53 (pocketproxy's "
              "default dns.resolver, reached through the phone)" % (dns.address, RESOLVER_IP, DEFAULT_RESOLVER_IP))
        print("customers: each on her own ISP (100.64.0.0/24, 2001:db8:64::/64) with IPv4 and IPv6 default routes")
        admin_socket = os.path.join(workdir, "admin.sock")
        daemon = Daemon(
            lab.server_ns, os.path.join(workdir, "daemon"), server.mgmt_socket, USERS,
            devices={"phone": phone.url}, admin={"socket": admin_socket},
        ).start()
        daemon.wait_log(r"reconciled with OpenVPN", timeout=30)
        print("pocketproxy under twistd (pid %s), config %s (product defaults)" % (daemon.proc.pid, daemon.config_path))

        section("customers connect with profiles from pocketproxyctl client-config")
        started = time.monotonic()
        profile = shipped_profiles(daemon.config_path, ("alice", "bob"), lab.pki)
        alice = add_profile_client(lab, "alice", profile["alice"], "alice", "alice-pw")
        bob = add_profile_client(lab, "bob", profile["bob"], "bob", "bob-pw")
        mallory = add_profile_client(lab, "mallory", profile["alice"], "alice", "guess")
        alice_ip = alice.wait_connected(timeout=40)
        bob_ip = bob.wait_connected(timeout=40)
        print(
            "alice connected as %s, bob as %s (static), %.1fs after start"
            % (alice_ip, bob_ip, time.monotonic() - started)
        )
        reason = mallory.wait_auth_failed(timeout=40)
        print("mallory (wrong password for alice) refused: %s" % reason)

        section("what alice was pushed, and the routes she got")
        pushed = [line for line in alice.log_text().splitlines() if "PUSH_REPLY" in line][-1]
        print("PUSH_REPLY: " + pushed.split("PUSH_REPLY,", 1)[-1].rstrip("'"))
        show(alice.ns, "ip", "route")
        show(alice.ns, "ip", "-6", "route")

        section("alice browses by name: DNS and TCP both go VPN -> pocketproxy -> phone -> origin")
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

        section("no leak: a resolver of alice's choosing, and IPv6")
        dns_mark = dns.log_mark()
        got = dig(alice.ns, "choice.bench.test", "udp", server=RESOLVER_IP)
        sources = sorted({q.source for q in dns.queries(since=dns_mark)})
        print("alice asks %s herself (UDP): %s; the resolver saw the query from %s (pocketproxy intercepted it)"
              % (RESOLVER_IP, got.get("answers") or got.get("error"), ", ".join(sources) or "nobody"))
        v6 = browse(alice, "http://[%s]/whoami" % ORIGIN_IP6, "-6")
        print("IPv6 to the origin: %s" % ("LEAKED" if v6 else "refused at once by the client's own OpenVPN (block-ipv6)"))
        alice_isp = set(customer_address(0))
        sources = world.origin_sources()
        clean = sources <= world.phone_addresses() and not sources & alice_isp
        print("every address the origin ever logged: %s (phone: %s)" % (", ".join(sorted(sources)), phone.origin_ip))
        print("the internet's leak counters: %s" % lab.internet.leaked())
        clean = clean and lab.internet.leaked() == {"customer": 0, "server": 0}

        section("what an operator looks at: pocketproxyctl over the admin socket")
        ctl(admin_socket, "clients")
        # Device health is on as shipped: the first probe comes at a random point of the first
        # 30 s interval (no probe storm at start), through the phone, to api.ipify.org.
        up = daemon.wait_log(r"device phone is up .*", timeout=40)
        print("health: %s" % up.group(0).split("] ", 1)[-1])
        ctl(admin_socket, "devices")
        ctl(admin_socket, "rules", "check")

        section("pocketproxy's log (admissions and denials)")
        for line in daemon.log_text().splitlines():
            if any(k in line for k in LOG_KEYS):
                print(line.split("] ", 1)[-1])

        section("kernel state an operator checks")
        show(lab.server_ns, "ipset", "list", "pocketproxy-clients")
        show(lab.server_ns, "iptables", "-t", "nat", "-S", "POCKETPROXY")
        show(lab.server_ns, "iptables", "-t", "filter", "-S", "POCKETPROXY")
        show(lab.server_ns, "iptables", "-t", "filter", "-S", "POCKETPROXY-IN")

        section("restart pocketproxy (SIGKILL) — clients stay connected, state rebuilt from status 3")
        mark = daemon.log_mark()
        daemon.kill()
        daemon.start()
        match = daemon.wait_log(r"reconciled with OpenVPN: .*", timeout=30, since=mark)
        print(match.group(0))
        daemon.wait_log(r"transparent proxy listening", timeout=30, since=mark)
        print("alice still pings the server: %s" % ("ok" if alice.ping(lab.server.vpn_ip) else "FAILED"))
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
    if not clean:
        print("FAILED: something other than the phone reached the origin or the internet")
        return 1
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hold", action="store_true", help="keep the lab up until Ctrl-C")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("make demo needs root (network namespaces, tun, ipset, iptables)")
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    workdir = tempfile.mkdtemp(prefix="pocketproxy-demo-")
    try:
        return run(args.hold, workdir)
    except KeyboardInterrupt:
        print("interrupted; lab torn down.")
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
