"""pocketproxy's customer DNS server as a stand-alone process for ``make bench-dns``.

Built from the DNS core's public API (:mod:`proxy.dnsserver`), the way the daemon wires it:
a :class:`proxy.dnsserver.DNSServer` listening on ``--listen:--port`` (UDP and TCP), resolving
through the resolver ``--resolver`` (the lab's origin DNS), with a ``route_for`` that maps every
client address to one device (``--upstream``, the phone's proxy URL), so every query that is
not answered from the cache goes over the phone's HTTP CONNECT/SOCKS5 proxy. ``stats=None``.
With ``--doh-url`` (``https://origin.test:8443/dns-query``) the resolver is that DNS-over-HTTPS
URL instead (``DNSSettings(resolver=parse_doh_url(...), ca_file=--ca-file,
max_doh_connections=--max-doh-connections)``): every miss is an RFC 8484 GET over TLS through
the phone's proxy, on at most that many keep-alive tunnels; ``--resolver`` is then unused.

The epoll reactor; logs below ``warn`` dropped, warnings to stderr (as ``proxy_runner``).
``--ready FILE`` is written once the server listens; ``--stats-file`` gets a JSON snapshot
(``route_for`` calls per client address, warnings, the server's own ``stats`` if it has any) on
SIGUSR1 and at exit. SIGTERM stops the reactor after ``server.stop()``.
Exit status 2 (and one line on stderr) when the DNS core cannot be imported.

Run by tests/bench/dns.py inside the server namespace with /usr/bin/python3.
"""

import argparse
import collections
import json
import os
import sys

from tests.bench.proxy_runner import _WarnObserver


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m tests.bench.dns_runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--resolver", help="the origin DNS address (reached through the device)")
    parser.add_argument("--resolver-port", type=int, default=53)
    parser.add_argument("--doh-url", help="resolve misses with DNS over HTTPS at this URL instead (through the device)")
    parser.add_argument("--ca-file", default="", help="with --doh-url: the PEM CA the resolver's certificate chains to")
    parser.add_argument("--max-doh-connections", type=int, default=4, help="with --doh-url: keep-alive tunnels")
    parser.add_argument("--upstream", required=True, help="the device's proxy URL, e.g. http://192.168.255.2:8080")
    parser.add_argument("--ready", required=True)
    parser.add_argument("--stats-file")
    args = parser.parse_args(argv)
    if not (args.resolver or args.doh_url):
        parser.error("one of --resolver or --doh-url is required")

    try:
        from proxy.dnsserver import DNSRoute, DNSServer, DNSSettings
        from proxy.upstream import Upstream

        if args.doh_url:
            from proxy.dohurl import parse_doh_url
    except ImportError as e:
        sys.stderr.write("dns_runner: the DNS core is not available: %s\n" % e)
        return 2

    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import defer, reactor
    from twisted.logger import globalLogBeginner

    observer = _WarnObserver()
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    upstream = Upstream.parse(args.upstream)
    routed = collections.Counter()

    def route_for(ip):
        routed[str(ip)] += 1
        return DNSRoute(key="phone", upstream=upstream)

    if args.doh_url:
        settings = DNSSettings(listen_host=args.listen, listen_port=args.port, resolver=parse_doh_url(args.doh_url),
                               ca_file=args.ca_file, max_doh_connections=args.max_doh_connections)
    else:
        settings = DNSSettings(listen_host=args.listen, listen_port=args.port,
                               resolver=(args.resolver, args.resolver_port))
    server = DNSServer(reactor, settings, route_for=route_for, stats=None)

    def dump_stats(*_):
        if not args.stats_file:
            return
        snap = {"route_for_calls": dict(routed), "warnings": observer.count}
        own = getattr(server, "stats", None)
        for name in ("snapshot", "as_dict"):
            if own is not None and callable(getattr(own, name, None)):
                try:
                    snap["server_stats"] = getattr(own, name)()
                except Exception as e:  # a report, never a crash
                    snap["server_stats_error"] = repr(e)
                break
        tmp = args.stats_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(snap, f, default=repr)
        os.replace(tmp, args.stats_file)

    def started(_):
        with open(args.ready + ".tmp", "w") as f:
            f.write("%d\n" % os.getpid())
        os.replace(args.ready + ".tmp", args.ready)

    def failed(failure):
        sys.stderr.write("dns_runner: listen failed: %s\n" % failure.getTraceback())
        reactor.stop()

    def start():
        defer.maybeDeferred(server.listen).addCallbacks(started, failed)

    import signal

    signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(dump_stats))
    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.maybeDeferred(server.stop))
    reactor.addSystemEventTrigger("before", "shutdown", dump_stats)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
