"""The relays of ``make bench-proxy`` and what /proc says about them.

Each relay runs as its own process started here (tracked by PID, stopped by
PID). CPU comes from ``/proc/<pid>/stat`` (utime+stime of the process plus
cutime+cstime of its reaped children), summed over the process tree, so
socat's fork-per-connection children are counted: a child's time moves into
the parent's cutime/cstime when socat reaps it, and callers wait for the tree
to have no children before reading (see :meth:`Relay.settle`).

Each relay also declares what bounds the idle test's connection count:
``idle_fds_per_conn`` (fds per idle connection in the one process holding
them), ``forks_per_conn`` (a process per connection instead, bounded by
:func:`process_budget`) and ``max_connections`` (its own cap, if any).
"""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- /proc


def children(pid):
    out = []
    try:
        for tid in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def tree(pid):
    """``pid`` and all its descendants alive now."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def _stat_fields(pid):
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_seconds(pid):
    """utime+stime+cutime+cstime of ``pid`` and its live descendants, in seconds."""
    ticks = 0
    for p in tree(pid):
        try:
            fields = _stat_fields(p)
        except OSError:
            continue
        # after ")" : state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
        ticks += sum(int(x) for x in fields[11:15])
    return ticks / CLK_TCK


def _status_kib(pid, field):
    return _status_kib_file("/proc/%d/status" % pid, field)


def _status_kib_file(path, field):
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kib(pid):
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _fds(pid):
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return 0


def process_fds(pid):
    """Open fds of ``pid`` alone (RLIMIT_NOFILE is per process, so this is what has to fit)."""
    return _fds(pid)


def _read_int(path):
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


def _cgroup_pids():
    """(pids.max, pids.current) of our cgroup, v2 or v1; (None, None) when unlimited or unknown."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None, None
    for line in lines:
        hier, controllers, path = line.split(":", 2)
        if hier == "0" and not controllers:
            base = "/sys/fs/cgroup" + path
        elif "pids" in controllers.split(","):
            base = "/sys/fs/cgroup/pids" + path
        else:
            continue
        limit = _read_int(base.rstrip("/") + "/pids.max")
        if limit is not None:
            return limit, _read_int(base.rstrip("/") + "/pids.current") or 0
    return None, None


def process_budget(per_process_kib, spare=1000):
    """How many more processes may be forked now: pid_max, RLIMIT_NPROC and the cgroup's pids.max minus
    the tasks alive (``/proc/loadavg`` counts threads, which use pids too) and ``spare``, and MemAvailable
    at ``per_process_kib`` each. :returns: (count, what bounds it)."""
    with open("/proc/loadavg") as f:
        tasks = int(f.read().split()[3].split("/")[1])
    bounds = [("pid_max", _read_int("/proc/sys/kernel/pid_max") - tasks - spare)]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    if nproc != resource.RLIM_INFINITY:
        bounds.append(("RLIMIT_NPROC", nproc - tasks - spare))
    limit, current = _cgroup_pids()
    if limit is not None:
        bounds.append(("cgroup pids.max", limit - current - spare))
    bounds.append(("MemAvailable", _status_kib_file("/proc/meminfo", "MemAvailable") // per_process_kib))
    return min((max(0, n), what) for what, n in bounds)


def memory(pid):
    """VmRSS and PSS (KiB), open fds and process count, summed over the tree."""
    procs = tree(pid)
    return {
        "rss_kib": sum(_status_kib(p, "VmRSS") for p in procs),
        "pss_kib": sum(_pss_kib(p) for p in procs),
        "fds": sum(_fds(p) for p in procs),
        "processes": len(procs),
    }


def listening(port):
    """True once something listens on TCP ``port`` (IPv4 or IPv6) in this namespace."""
    want = ":%04X" % port
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[1].endswith(want) and parts[3] == "0A":
                        return True
        except OSError:
            pass
    return False


# --------------------------------------------------------------------------- relays


class RelayError(Exception):
    """A relay did not start or died."""


class Relay:
    """One relay process listening on ``port`` and dialing the sink on ``sink_port``."""

    name = None
    kind = None
    #: fds the process holding the connections opens per idle connection (RLIMIT_NOFILE is per process)
    idle_fds_per_conn = 2
    #: True when every connection gets its own forked process instead (socat)
    forks_per_conn = False
    #: the relay's own cap on concurrent connections, None when it has none
    max_connections = None

    def __init__(self, name, port, sink_port, tmp, client_ip):
        self.name = name
        self.port = port
        self.sink_port = sink_port
        self.tmp = Path(tmp)
        self.client_ip = client_ip
        self.proc = None
        self.stderr_path = self.tmp / ("%s.stderr" % name)

    def argv(self):
        raise NotImplementedError

    def start(self, root, timeout=20):
        env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            self.argv(),
            cwd=str(root),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=self._stderr,
            start_new_session=True,  # a terminal Ctrl-C reaches the benchmark, which stops us by PID
        )
        deadline = time.monotonic() + timeout
        while not listening(self.port):
            if self.proc.poll() is not None:
                raise RelayError("%s exited with %s: %s" % (self.name, self.proc.returncode, self.stderr_tail()))
            if time.monotonic() > deadline:
                raise RelayError(
                    "%s not listening on %d after %ds: %s" % (self.name, self.port, timeout, self.stderr_tail())
                )
            time.sleep(0.05)
        return self

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def check(self):
        if not self.alive():
            raise RelayError("%s died (exit %s): %s" % (self.name, self.proc.returncode, self.stderr_tail()))

    def cpu(self):
        return cpu_seconds(self.pid)

    def memory(self):
        return memory(self.pid)

    def settle(self, timeout=10.0, fds=None):
        """Wait (bounded) until no child process is left and, if given, the fd count is back to ``fds``.

        :returns: True when settled.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not children(self.pid) and (fds is None or _fds(self.pid) <= fds):
                return True
            time.sleep(0.02)
        return False

    def stderr_tail(self, n=2000):
        try:
            return self.stderr_path.read_bytes()[-n:].decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def stop(self, timeout=10):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
        self._stderr.close()


class PocketProxy(Relay):
    """``proxy.server`` via :mod:`tests.bench.proxy_runner`, run with /usr/bin/python3 (or ``python``)."""

    kind = "pocketproxy"
    idle_fds_per_conn = 2  # client + upstream socket; splice pipes only while a connection is spliced

    def __init__(self, *a, python="/usr/bin/python3", splice=True, max_connections=None, **kw):
        """:param max_connections: passed as ``--max-connections``; None keeps the product's
        ``RLIMIT_NOFILE``-derived default (the runner reports both)."""
        super().__init__(*a, **kw)
        self.python = python
        self.splice = splice
        self.max_connections = max_connections

    def argv(self):
        argv = [
            self.python,
            "-m",
            "tests.bench.proxy_runner",
            "--port",
            str(self.port),
            "--client",
            self.client_ip,
            "--upstream",
            "http://127.0.0.1:%d" % self.sink_port,
        ]
        if not self.splice:
            argv.append("--no-splice")
        if self.max_connections:
            argv += ["--max-connections", str(self.max_connections)]
        return argv + [
            "--stats-file",
            str(self.stats_path),
            "--profile-file",
            str(self.tmp / ("%s.profile.txt" % self.name)),
        ]

    @property
    def stats_path(self):
        return self.tmp / ("%s.stats.json" % self.name)

    def profile(self, timeout=5.0):
        """Toggle the runner's cProfile (SIGUSR2); the second call waits for and returns the report text."""
        path = self.tmp / ("%s.profile.txt" % self.name)
        if not getattr(self, "_profiling", False):
            self._profiling = True
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            os.kill(self.pid, signal.SIGUSR2)
            time.sleep(0.2)
            return None
        self._profiling = False
        os.kill(self.pid, signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                time.sleep(0.1)
                return path.read_text()
            time.sleep(0.05)
        return None

    def stats(self, timeout=5.0):
        """The factory's counters (SIGUSR1 makes the runner write them), or None."""
        try:
            self.stats_path.unlink()
        except FileNotFoundError:
            pass
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return json.loads(self.stats_path.read_text())
            except (FileNotFoundError, ValueError):
                time.sleep(0.02)
        return None


class Redsocks(Relay):
    """redsocks 0.5: ``redirector = iptables``, ``type = http-connect``, splice at its default (on)."""

    kind = "redsocks"

    def __init__(self, *a, splice=None, nofile=262144, conn_max=30000, **kw):
        super().__init__(*a, **kw)
        self.splice = splice
        self.nofile = nofile
        self.conn_max = conn_max
        self.max_connections = conn_max
        # splice (its default) opens both pipes when a connection is accepted: 2 sockets + 2 pipes = 6 fds
        self.idle_fds_per_conn = 2 if splice is False else 6

    def config(self):
        splice = "" if self.splice is None else "  splice = %s;\n" % ("true" if self.splice else "false")
        return (
            "base {\n"
            "  log_debug = off;\n  log_info = off;\n  log = stderr;\n  daemon = off;\n"
            "  redirector = iptables;\n"
            "  rlimit_nofile = %d;\n"
            "  redsocks_conn_max = %d;\n"
            "}\n"
            "redsocks {\n"
            "  local_ip = 0.0.0.0;\n  local_port = %d;\n"
            "  ip = 127.0.0.1;\n  port = %d;\n"
            "  type = http-connect;\n"
            "  listenq = 4096;\n"
            "%s"
            "}\n" % (self.nofile, self.conn_max, self.port, self.sink_port, splice)
        )

    def argv(self):
        path = self.tmp / ("%s.conf" % self.name)
        path.write_text(self.config())
        return ["redsocks", "-c", str(path)]


class Socat(Relay):
    """socat as a plain forwarder, one forked child per connection; the client sends CONNECT itself.

    ``-t 30``: after one side's EOF socat shuts the other side's write and
    exits ``-t`` seconds later (default 0.5 s) even if the reverse direction is
    still open, so with the default a count reply that comes later than 0.5 s
    after the client's FIN is lost (seen with 64 streams on 2 cores). With 30 s
    it still exits as soon as both directions have ended.
    """

    kind = "socat"
    idle_fds_per_conn = 0  # the listening parent holds none; each child has its 2 sockets (7 fds in all)
    forks_per_conn = True

    def __init__(self, *a, buffer=None, half_close_timeout=30, **kw):
        super().__init__(*a, **kw)
        self.buffer = buffer
        self.half_close_timeout = half_close_timeout

    def argv(self):
        argv = ["socat", "-t", str(self.half_close_timeout)]
        if self.buffer:
            argv += ["-b", str(self.buffer)]
        return argv + ["TCP-LISTEN:%d,fork,reuseaddr,backlog=4096" % self.port, "TCP:127.0.0.1:%d" % self.sink_port]


def python_for_pocketproxy():
    """/usr/bin/python3 as the brief says; the bench itself may run under another interpreter."""
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
