"""Run a benchmark module again inside a private network namespace, and always remove it.

Both benchmarks need kernel state (ipset, iptables REDIRECT) that must never
touch the host's root namespace: the outer process makes a namespace, re-runs
``python -m MODULE --inside ...`` there with a deadline, and tears it down on
success, failure, Ctrl-C or SIGTERM.
"""

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_inside(label, role, module, passthrough, timeout):
    """Exit status of the inner run (3: deadline, 4: namespace left behind, 130: interrupted)."""
    from tests.lab.netns import Namespace

    def on_term(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, on_term)
    ns = None
    rc = 1
    try:
        ns = Namespace(role)
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
        proc = ns.popen([sys.executable, "-m", module, "--inside", *passthrough], cwd=str(ROOT), env=env)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            sys.stderr.write("%s: inner run exceeded %ds; stopping it\n" % (label, timeout))
            rc = 3
    except KeyboardInterrupt:
        sys.stderr.write("%s: interrupted; tearing the namespace down\n" % label)
        rc = 130
    finally:
        if ns is not None:
            ns.destroy()
            left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
            if any(line.split()[:1] == [ns.name] for line in left.splitlines()):
                sys.stderr.write("%s: namespace %s still exists after teardown!\n" % (label, ns.name))
                rc = rc or 4
    if rc < 0:
        rc = 128 - rc
    return rc


# --- shared by the inner runs ---------------------------------------------------------------


class BenchTimeout(BaseException):
    """The inner deadline passed (BaseException so no measurement swallows it)."""


def arm_inner_deadline(seconds):
    """SIGALRM after ``seconds`` raises :class:`BenchTimeout`; SIGTERM raises KeyboardInterrupt,
    so the inner run unwinds through its ``finally`` blocks either way."""

    def on_alarm(signum, frame):
        raise BenchTimeout("inner deadline of %ds exceeded" % seconds)

    def on_term(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.alarm(seconds)


def raise_nofile(want=None):
    """RLIMIT_NOFILE soft = hard = ``want`` if allowed, else the hard limit (raising the hard limit
    needs CAP_SYS_RESOURCE); returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if want is not None:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            pass
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def percentile(values, p):
    """Nearest-rank percentile of ``values`` (p in 0..100); NaN when empty."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, -(-len(ordered) * p // 100) - 1))
    return ordered[int(k)]
