"""pocketproxy's transparent proxy as a stand-alone process for ``make bench-proxy``.

Built like the daemon builds it: a :class:`proxy.mappings.MappingTable` with
one static mapping (the load generator's source address → the sink's CONNECT
address), a :class:`proxy.server.ProxyFactory` with default
:class:`proxy.server.ProxySettings` (except a per-client limit high enough for
the idle-connections test and, when the benchmark asks with ``--max-connections``,
a global cap above the one derived from ``RLIMIT_NOFILE``), the splice pump when splice is on, the
listener from :func:`proxy.server.listen` and the timeout sweeper (both via
:class:`proxy.service.ProxyService`, as ``ovpnmgr.tap.build_proxy`` wires it). The epoll
reactor, logs below ``warn`` dropped (as admission.py does), warnings to
stderr. ``--stats-file`` gets the factory's counters as JSON on SIGUSR1 and at
exit, so the benchmark can cross-check what the proxy saw; ``--profile-file``
gets a cProfile report of the reactor thread between two SIGUSR2s.

Run by tests/bench/proxy.py inside its network namespace with /usr/bin/python3.
"""

import argparse
import json
import os
import resource
import signal
import sys


class _WarnObserver:
    """Drop events below warn; print the rest to stderr (with tracebacks)."""

    def __init__(self):
        from twisted.logger import LogLevel, formatEvent

        self._loud = (LogLevel.warn, LogLevel.error, LogLevel.critical)
        self._format = formatEvent
        self.count = 0

    def __call__(self, event):
        if event.get("log_level") in self._loud:
            self.count += 1
            if self.count > 200:
                return
            text = self._format(event)
            failure = event.get("log_failure")
            if failure is not None:
                text += "\n" + failure.getTraceback()
            sys.stderr.write("[pocketproxy %s] %s\n" % (event["log_level"].name, text))
            sys.stderr.flush()


def _splice_policy():
    """The product's default splice policy, as ``ovpnmgr.tap.build_proxy`` makes it (None if unavailable)."""
    from proxy.splice import SplicePolicy

    policy = SplicePolicy()
    if not policy.available:
        sys.stderr.write("[pocketproxy] splice(2) is not available here; using the plain relay\n")
        return None
    return policy


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m tests.bench.proxy_runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bind", default="0.0.0.0")
    parser.add_argument("--client", required=True, help="the load generator's source address")
    parser.add_argument("--upstream", required=True, help="the sink, e.g. http://127.0.0.1:9001")
    parser.add_argument("--no-splice", action="store_true")
    parser.add_argument("--per-client", type=int, default=100000)
    parser.add_argument(
        "--max-connections", type=int, default=0, help="global cap (0: derived from RLIMIT_NOFILE, the default)"
    )
    parser.add_argument("--stats-file")
    parser.add_argument("--profile-file", help="SIGUSR2 starts cProfile, the next SIGUSR2 writes the report here")
    args = parser.parse_args(argv)

    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    observer = _WarnObserver()
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    from proxy.mappings import MappingTable
    from proxy.server import ProxyFactory, ProxySettings, fd_derived_limit, raise_nofile_limit
    from proxy.service import ProxyService
    from proxy.upstream import Upstream

    raise_nofile_limit()
    settings = ProxySettings(
        max_connections=args.max_connections, max_connections_per_client=args.per_client, splice=not args.no_splice
    )
    mappings = MappingTable()
    mappings.add(args.client, Upstream.parse(args.upstream), owner="bench")
    factory = ProxyFactory(reactor, mappings, settings, splice=_splice_policy() if settings.splice else None)
    service = ProxyService(reactor, factory, args.port, (args.bind,))  # listen() + the timeout sweeper
    service.privilegedStartService()
    reactor.callWhenRunning(service.startService)

    def dump_stats(*_):
        if args.stats_file:
            snap = factory.stats.snapshot()
            snap["max_connections"] = factory.max_connections
            snap["max_connections_default"] = fd_derived_limit(factory.splice is not None)
            snap["splice"] = factory.splice is not None
            if factory.splice is not None:
                snap["splice_stats"] = dict(factory.splice.stats(), min_bytes=factory.splice.min_bytes)
            snap["nofile"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            snap["warnings"] = observer.count
            snap["delayed_calls"] = len(reactor.getDelayedCalls())
            snap["tracked_connections"] = len(factory.connections)
            tmp = args.stats_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump(snap, f)
            os.replace(tmp, args.stats_file)

    profiler = {}

    def toggle_profile():
        import cProfile
        import io
        import pstats

        if "p" not in profiler:
            profiler["p"] = cProfile.Profile()
            profiler["p"].enable()
            return
        prof = profiler.pop("p")
        prof.disable()
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text)
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(40)
        stats.sort_stats("tottime").print_callers(20)
        if args.profile_file:
            tmp = args.profile_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(text.getvalue())
            os.replace(tmp, args.profile_file)
            prof.dump_stats(args.profile_file + ".pstats")  # the raw data, for pstats' other views

    signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(dump_stats))
    signal.signal(signal.SIGUSR2, lambda *_: reactor.callFromThread(toggle_profile))
    reactor.addSystemEventTrigger("before", "shutdown", dump_stats)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
