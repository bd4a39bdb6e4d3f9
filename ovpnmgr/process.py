# -*- test-case-name: tests.unit.test_firewall -*-
"""Run short external commands (``iptables``, ``iptables-restore``) from the reactor.

:class:`ProcessRunner` spawns through ``reactor.spawnProcess`` (never a blocking
``subprocess`` call), feeds optional stdin, collects stdout/stderr and fires
``(exit_code, stdout, stderr)``. A non-zero exit is a normal result, not an
error: the caller decides what it means. Errors (errback) are only

- :class:`CommandNotFound`: the executable is not on ``PATH``;
- :class:`CommandTimeout`: the command did not finish within the timeout
  (driven by an injectable clock); the child is killed by its PID first.

:class:`FakeRunner` has the same ``run()`` and records every call; it is the
seam for unit tests of anything that runs commands.
"""

import os
import shutil
import signal as _signal

from twisted.internet import defer, error
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

# Directories where iptables and friends live; appended to PATH when missing
# (a daemon started with a minimal PATH must still find /usr/sbin/iptables).
_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class CommandError(Exception):
    """A command could not be run to completion (not: it exited non-zero)."""

    def __init__(self, argv, problem):
        self.argv = list(argv)
        self.problem = problem
        super().__init__("%s: %s" % (" ".join(self.argv), problem))


class CommandNotFound(CommandError):
    """The executable does not exist on PATH."""


class CommandTimeout(CommandError):
    """The command ran longer than allowed and was killed."""

    def __init__(self, argv, timeout):
        self.timeout = timeout
        super().__init__(argv, "no result after %gs; killed" % (timeout,))


def command_environment(base=None):
    """The environment for child commands: ``base`` (default ``os.environ``),
    ``LC_ALL=C`` for parseable output, and the sbin directories on PATH."""
    env = dict(os.environ if base is None else base)
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p]
    for extra in ("/usr/local/bin", "/usr/bin", "/bin") + _SBIN_DIRS:
        if extra not in path:
            path.append(extra)
    env["PATH"] = os.pathsep.join(path)
    env["LC_ALL"] = "C"
    return env


class _Collector(ProcessProtocol):
    """Collects one child's output and fires ``deferred`` exactly once."""

    def __init__(self, argv, stdin, deferred):
        self.argv = argv
        self.stdin = stdin
        self.deferred = deferred
        self.out = []
        self.err = []
        self.timer = None
        self.finished = False

    def connectionMade(self):
        if self.stdin:
            self.transport.write(self.stdin)
        self.transport.closeStdin()

    def childDataReceived(self, childFD, data):
        (self.out if childFD == 1 else self.err).append(data)

    def processEnded(self, reason):
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.finished:
            return
        self.finished = True
        value = reason.value
        code = getattr(value, "exitCode", None)
        if code is None:
            # Killed by a signal: report it the way subprocess does (-SIGNUM).
            code = -(getattr(value, "signal", None) or _signal.SIGKILL)
        self.deferred.callback((code, b"".join(self.out), b"".join(self.err)))

    def kill(self):
        """Send SIGKILL to the child by its PID (Twisted's ``signalProcess``)."""
        try:
            self.transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    def timedOut(self, timeout):
        self.timer = None
        if self.finished:
            return
        self.finished = True
        self.kill()
        self.deferred.errback(CommandTimeout(self.argv, timeout))


class ProcessRunner:
    """Run commands through ``reactor.spawnProcess`` with a timeout.

    :param reactor: an ``IReactorProcess`` (and ``IReactorTime`` unless
        ``clock`` is given).
    :param timeout: seconds before a command is killed and its Deferred fails
        with :class:`CommandTimeout` (``FirewallConfig.command_timeout``).
    :param clock: the ``IReactorTime`` driving the timeout; default ``reactor``.
    :param env: base environment for children; default ``os.environ``.
    """

    _log = Logger()

    def __init__(self, reactor, timeout=10.0, clock=None, env=None):
        self.reactor = reactor
        self.timeout = timeout
        self.clock = reactor if clock is None else clock
        self.env = command_environment(env)

    def run(self, argv, stdin=b""):
        """Run ``argv``; fire ``(exit_code, stdout_bytes, stderr_bytes)``.

        ``exit_code`` is negative (-signal) if the child died of a signal.
        Cancelling the returned Deferred kills the child.
        """
        argv = [str(a) for a in argv]
        executable = argv[0]
        if os.sep not in executable:
            found = shutil.which(executable, path=self.env["PATH"])
            if found is None:
                return defer.fail(CommandNotFound(argv, "command not found on PATH %s" % self.env["PATH"]))
            executable = found
        collector = None

        def cancel(d):
            if collector is not None and not collector.finished:
                collector.finished = True
                if collector.timer is not None and collector.timer.active():
                    collector.timer.cancel()
                collector.timer = None
                collector.kill()

        d = defer.Deferred(cancel)
        collector = _Collector(argv, stdin, d)
        try:
            self.reactor.spawnProcess(collector, executable, argv, env=self.env)
        except OSError as e:
            return defer.fail(CommandError(argv, "cannot start: %s" % (e.strerror or e)))
        if not collector.finished:
            collector.timer = self.clock.callLater(self.timeout, collector.timedOut, self.timeout)
        return d


class FakeRunner:
    """A scripted stand-in for :class:`ProcessRunner` for unit tests.

    Every call is recorded in :attr:`calls` as ``(argv, stdin)``. Results
    are chosen by the longest registered argv prefix (see :meth:`on`);
    unmatched commands succeed with ``(0, b"", b"")``.

    Example::

        runner = FakeRunner()
        runner.on(["iptables", "-w", "-t", "nat", "-S"], stdout=b"-P PREROUTING ACCEPT\\n")
        runner.on(["iptables-restore"], exit_code=1, stderr=b"line 3 failed")
        runner.on(["slow"], error=CommandTimeout(["slow"], 10))   # errback instead
        runner.on(["iptables-restore"], handler=lambda argv, stdin: (0, b"", b""))
    """

    def __init__(self):
        self.calls = []
        self._responses = []

    def on(self, prefix, exit_code=0, stdout=b"", stderr=b"", error=None, handler=None):
        """Answer commands starting with ``prefix``; later registrations of
        the same prefix replace earlier ones. ``handler(argv, stdin)`` may
        return a result tuple, raise, or return a Deferred."""
        prefix = list(prefix)
        self._responses = [r for r in self._responses if r[0] != prefix]
        self._responses.append((prefix, (exit_code, stdout, stderr), error, handler))

    def run(self, argv, stdin=b""):
        """Record the call and answer it from the script."""
        argv = list(argv)
        self.calls.append((argv, stdin))
        best = None
        for entry in self._responses:
            prefix = entry[0]
            if argv[: len(prefix)] == prefix and (best is None or len(prefix) > len(best[0])):
                best = entry
        if best is None:
            return defer.succeed((0, b"", b""))
        _, result, err, handler = best
        if err is not None:
            return defer.fail(err)
        if handler is not None:
            return defer.maybeDeferred(handler, argv, stdin)
        return defer.succeed(result)

    def argvs(self):
        """Just the argv lists of all calls so far."""
        return [argv for argv, _ in self.calls]
