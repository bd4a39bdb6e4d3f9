"""The load generator of ``make bench-scale``, run as its own process in the client namespace.

It plays the VPN clients' side: every connection is bound to one of the
given source addresses (admitted clients' VPN addresses, or the peers' own
addresses) and dials ``198.51.100.2:<dport>``, which the server namespace
REDIRECTs to the relay under test. The byte checks are those of
:mod:`tests.bench.proxy_load` (a 1-byte echo through the sink proves every
connection end to end).

Control: one JSON object per line on stdin, one JSON object per line back on
stdout; EOF on stdin ends the process (so it never outlives the benchmark).

* ``{"cmd": "hold", "name", "dport", "client_connect", "n", "batch", "sources",
  "checkpoints", "timeout"}``: open ``n`` connections in batches (each echo-proven),
  print ``{"progress": held}`` after each batch; after the first batch that
  reaches a count listed in ``checkpoints`` print ``{"checkpoint": held}`` (the
  count reached) and wait for a ``{"cmd": "go"}`` line. With all open print ``{"held": n, "open_s": s}`` (time spent waiting at
  checkpoints excluded) and wait for ``{"cmd": "release"}``; then close them all
  and print ``{"released": n}``.
* ``{"cmd": "setup", "name", "dport", "client_connect", "count", "concurrency",
  "sources", "timeout"}``: :func:`tests.bench.proxy_load.setup_rate`; prints its result.

Errors are printed as ``{"error": "..."}``.
"""

import json
import resource
import sys
import time

from tests.bench import proxy_load


def _say(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _read():
    line = sys.stdin.readline()
    if not line:
        raise SystemExit(0)
    return json.loads(line)


def _expect(cmd):
    msg = _read()
    if msg.get("cmd") != cmd:
        raise proxy_load.LoadError("expected command %r, got %r" % (cmd, msg))


def hold(msg):
    target = proxy_load.Target(msg["name"], msg["dport"], msg["client_connect"])
    checkpoints = sorted(msg.get("checkpoints", ()))
    waited = [0.0]

    def progress(held):
        if checkpoints and held >= checkpoints[0] and held < msg["n"]:
            while checkpoints and held >= checkpoints[0]:
                checkpoints.pop(0)
            t = time.perf_counter()
            _say({"checkpoint": held})
            _expect("go")
            waited[0] += time.perf_counter() - t
        else:
            _say({"progress": held})

    def while_held():
        return None

    t0 = time.perf_counter()
    state = {}

    def held_all():
        state["open_s"] = time.perf_counter() - t0 - waited[0]
        _say({"held": msg["n"], "open_s": state["open_s"]})
        _expect("release")

    proxy_load.hold_idle(
        target, msg["n"], msg.get("batch", 500), msg.get("timeout", 30), held_all, progress=progress, sources=msg["sources"]
    )
    _say({"released": msg["n"], "open_s": state.get("open_s")})


def setup(msg):
    target = proxy_load.Target(msg["name"], msg["dport"], msg["client_connect"])
    result = proxy_load.setup_rate(target, msg["count"], msg["concurrency"], msg.get("timeout", 30), sources=msg["sources"])
    _say({"setup": result})


def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    _say({"ready": True, "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0]})
    while True:
        msg = _read()
        try:
            if msg["cmd"] == "hold":
                hold(msg)
            elif msg["cmd"] == "setup":
                setup(msg)
            else:
                _say({"error": "unknown command %r" % msg.get("cmd")})
        except proxy_load.LoadError as e:
            _say({"error": "%s" % e})
        except OSError as e:
            _say({"error": "%s: %s" % (type(e).__name__, e)})


if __name__ == "__main__":
    try:
        main()
    except (KeyboardInterrupt, BrokenPipeError):
        pass
