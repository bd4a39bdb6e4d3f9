"""Probing a lab from a namespace: run :mod:`tests.lab.netclient` and read its JSON, and a TCP
:class:`Listener` that records every peer it accepts.

Shared by the integration tests (``test_hostile.py``, ``test_destinations.py``,
``test_kernel_guards.py``, ``test_dns.py``, ...). Every helper process is bounded by its own
deadline and started with ``Namespace.popen`` / ``Namespace.run``.
"""

import json
import os
import subprocess
import sys

from tests.lab.netns import wait_for

NETCLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "netclient.py")

# Listens on (address, port) and appends one line per accepted connection to a file.
_LISTENER = r"""
import socket, sys
address, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((address, port)); s.listen(16)
open(path, "a").close()
while True:
    c, peer = s.accept()
    with open(path, "a") as f:
        f.write("%s:%d\n" % peer)
    c.close()
"""

_SENTINEL = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()"


def last_json(result, what):
    """The JSON object on the last line of a finished process's stdout (``CompletedProcess`` or
    anything with ``stdout``/``stderr``); an AssertionError naming ``what`` when there is none."""
    text = result.stdout if isinstance(result.stdout, str) else result.stdout.decode()
    try:
        return json.loads(text.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise AssertionError("%s printed no result: %r %r" % (what, text, result.stderr))


def run_json(ns, *argv, timeout=30):
    """Run ``argv`` in ``ns`` (bounded by ``timeout`` + 30 s) and return the JSON on its last line."""
    out = ns.run(*argv, check=False, timeout=timeout + 30)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise AssertionError("%s failed (%s): %s %s" % (argv, out.returncode, out.stdout, out.stderr))


def probe(ns, host, port, send="", timeout=10, until_eof=False):
    """One connection attempt from ``ns``: reset / eof / data / connect-failed / timeout (tests/lab/netclient.py);
    ``until_eof`` returns the whole reply rather than its first segment."""
    out = ns.run(sys.executable, NETCLIENT, "--timeout", str(timeout), "probe", host, str(port), "--send", send,
                 *(["--until-eof"] if until_eof else []), check=False, timeout=timeout + 30)
    return last_json(out, "netclient probe")


class Listener:
    """A TCP listener in a namespace that records every accepted peer (stopped by PID at teardown)."""

    def __init__(self, ns, address, port, directory):
        self.ns = ns
        self.address, self.port = address, port
        self.path = os.path.join(directory, "accepts-%s-%d" % (address, port))
        self.proc = ns.popen([sys.executable, "-c", _LISTENER, address, str(port), self.path],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: os.path.exists(self.path) or self.proc.poll() is not None, 10, what="listener")
        assert self.proc.poll() is None, "listener on %s:%d failed to start" % (address, port)

    def accepted(self):
        with open(self.path) as f:
            return f.read().split()

    def before_sentinel(self):
        """Every peer accepted before a sentinel connection made now from the listener's own
        namespace: it is recorded after anything already in the accept queue, so waiting for it
        proves what did *not* arrive (no fixed sleep)."""
        before = len(self.accepted())
        self.ns.run(sys.executable, "-c", _SENTINEL, self.address, str(self.port), timeout=15)
        wait_for(lambda: len(self.accepted()) > before, 10, what="the sentinel connection to %s:%d" % (self.address, self.port))
        return self.accepted()[:-1]

    def stop(self):
        self.ns.stop(self.proc, timeout=5)
