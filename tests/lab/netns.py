"""Network namespaces for tests and the demo lab: created here, always torn down here.

Every namespace gets a unique ``pp``-prefixed name, processes started in it are
tracked by PID and stopped by PID, and ``destroy()`` is safe to call twice.
Nothing here touches the root namespace except creating veth pairs that are
moved into lab namespaces at once.
"""

import itertools
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

_counter = itertools.count()


def unique_name(role):
    """A short unique namespace/interface-safe name (interface names max 15 chars)."""
    return "pp%s%d%d" % (role[:3], os.getpid() % 10000, next(_counter))


def require_root():
    """Skip when not root, unless integration tests are demanded (CI), then fail."""
    if os.geteuid() == 0:
        return
    if os.environ.get("POCKETPROXY_REQUIRE_INTEGRATION"):
        pytest.fail("integration tests demanded but not running as root")
    pytest.skip("needs root for network namespaces")


NETNS_ETC = "/etc/netns"  # ``ip netns exec`` bind-mounts /etc/netns/NAME/* over /etc/*


def require_tools(*paths):
    """Skip when a program the test drives is missing, or fail when integration tests are demanded."""
    missing = [path for path in paths if not shutil.which(path)]
    if not missing:
        return
    if os.environ.get("POCKETPROXY_REQUIRE_INTEGRATION"):
        pytest.fail("integration tests demanded but missing: %s" % ", ".join(missing))
    pytest.skip("missing: %s" % ", ".join(missing))


def stop_process(proc, sig=signal.SIGTERM, timeout=10):
    """Stop one process we started (a ``Popen``), by PID; SIGKILL if it does not go in time.

    :returns: its return code.
    """
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    return proc.returncode


class Namespace:
    """One network namespace with lo up, and the processes started inside it.

    ``hosts``: ``{name: address}`` written to ``/etc/netns/NAME/hosts``, which
    ``ip netns exec`` mounts over ``/etc/hosts`` for every process started here
    (the lab has no DNS; removed again by ``destroy()``).
    """

    def __init__(self, role, hosts=None):
        self.name = unique_name(role)
        self._procs = []
        self._etc = None
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.run("ip", "link", "set", "lo", "up")
        if hosts:
            self._etc = os.path.join(NETNS_ETC, self.name)
            os.makedirs(self._etc, exist_ok=True)
            lines = ["127.0.0.1 localhost"] + ["%s %s" % (address, name) for name, address in hosts.items()]
            with open(os.path.join(self._etc, "hosts"), "w") as f:
                f.write("\n".join(lines) + "\n")

    def argv(self, *argv):
        """The command line that runs ``argv`` inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv, check=True, timeout=60, input=None, env=None):
        """Run a command in the namespace to completion; output captured as text."""
        return subprocess.run(
            self.argv(*argv),
            check=check,
            timeout=timeout,
            input=input,
            env=env,
            capture_output=True,
            text=True,
        )

    def popen(self, argv, **kwargs):
        """Start a long-running process in the namespace; stopped by ``destroy()``."""
        proc = subprocess.Popen(self.argv(*argv), **kwargs)
        self._procs.append(proc)
        return proc

    def stop(self, proc, sig=signal.SIGTERM, timeout=10):
        """Stop one process we started, by PID; SIGKILL if it does not go in time."""
        return stop_process(proc, sig, timeout)

    def destroy(self):
        """Stop our processes (by PID), kill anything left in the namespace, delete it."""
        for proc in reversed(self._procs):
            try:
                self.stop(proc, timeout=5)
            except Exception:
                pass
        self._procs = []
        listed = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, text=True
        )
        for pid in listed.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout.strip() == "":
                break
            time.sleep(0.05)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        if self._etc:
            shutil.rmtree(self._etc, ignore_errors=True)
            self._etc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()


def link(ns_a, addr_a, ns_b, addr_b, prefixlen=24):
    """Connect two namespaces with a veth pair and address both ends."""
    name_a = unique_name("va")
    name_b = unique_name("vb")
    subprocess.run(
        ["ip", "link", "add", name_a, "netns", ns_a.name, "type", "veth", "peer", "name", name_b, "netns", ns_b.name],
        check=True,
    )
    ns_a.run("ip", "addr", "add", "%s/%d" % (addr_a, prefixlen), "dev", name_a)
    ns_b.run("ip", "addr", "add", "%s/%d" % (addr_b, prefixlen), "dev", name_b)
    ns_a.run("ip", "link", "set", name_a, "up")
    ns_b.run("ip", "link", "set", name_b, "up")
    return name_a, name_b


def add_bridge(ns, name):
    """Create bridge ``name`` in ``ns`` with a fixed, locally administered MAC address.

    A bridge left to itself takes the lowest MAC of its ports, so plugging in a later port
    (a phone added mid-test) can change the MAC behind the bridge's addresses; every neighbour
    that cached the old one then sends into the void until its ARP entry is re-checked, seconds
    later (an established connection stalls in retransmits). A MAC set by hand never changes.
    """
    mac = "02:%s" % ":".join("%02x" % b for b in os.urandom(5))
    ns.run("ip", "link", "add", name, "address", mac, "type", "bridge")
    return name


def wait_for(predicate, timeout, interval=0.05, what="condition"):
    """Poll ``predicate`` until true; raise AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def read_log(path):
    """A log file's text so far ("" before the process has created it)."""
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def wait_log(path, regex, timeout, since=0, exited=None, describe=None):
    """Wait until ``regex`` matches the log at ``path`` after offset ``since``; return the match.

    :param exited: optional callable returning an error text once the writer has
        died (waiting on would be pointless), else None.
    :param describe: callable giving the failure message's context (a log tail).
    """
    pattern = re.compile(regex)
    describe = describe or (lambda: read_log(path)[since:][-3000:])
    deadline = time.monotonic() + timeout
    while True:
        match = pattern.search(read_log(path), since)
        if match:
            return match
        dead = exited() if exited is not None else None
        if dead:
            raise AssertionError("%s while waiting for %r; log tail:\n%s" % (dead, regex, describe()))
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %r in %s; tail:\n%s" % (timeout, regex, path, describe()))
        time.sleep(0.05)
