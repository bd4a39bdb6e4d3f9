# -*- test-case-name: tests.unit.test_dns_origin -*-
"""The lab's authoritative DNS server for the zone ``test.``, run inside the origin namespace.

Started by :meth:`tests.lab.world.World.start_dns` (like ``origin_server.py`` for HTTP)::

    python3 dns_origin.py --address 203.0.113.10 --log FILE --ready FILE [--ttl 300] [--negative-ttl 30]
                          [--doh-port 8443 --cert origin.crt --key origin.key]

It answers UDP and TCP on every ``--address`` (repeatable, IPv4 or IPv6), port ``--port`` (53), with Twisted's DNS protocols and this zone
(and, with ``--doh-port``, DNS over HTTPS: see below):

===========================  ===============================================================
``origin.test``              A 203.0.113.10 and AAAA 2001:db8:113::10 (the HTTP/TLS origin, dual
                             stack like most of the web), TTL ``--ttl``
``big.test``                 :data:`BIG_COUNT` (40) A records 198.18.1.1..40: about 670 bytes,
                             so a plain UDP answer does not fit 512 bytes (see truncation)
``txt.test``                 one TXT record of 4 × 200-byte strings (about 830 bytes)
``<N>.ttl.test``             A 203.0.113.10 with TTL N (0..86400): for cache expiry tests
``<anything>.bench.test``    wildcard: A :func:`bench_address` of the name (a crc32 of it in
                             198.18.0.0/15), so a checker can tell every answer is the right one
``<M>.delay.test``           A 203.0.113.10, answered after M ms (at most 30,000)
``drop.test``                never answered (an upstream that times out)
other names under ``test.``  NXDOMAIN; an existing name with another type is NODATA. Both carry
                             the zone's SOA (minimum = ``--negative-ttl``) in the authority section
names outside ``test.``      REFUSED (authoritative only, no recursion)
===========================  ===============================================================

Truncation: over UDP a reply larger than 512 bytes (or the EDNS payload size the query
announced, at most 4096) is sent with TC=1 and empty answer/authority sections, as the client
is then expected to ask again over TCP. TCP replies are never truncated.

DNS over HTTPS (RFC 8484), with ``--doh-port``: an HTTPS listener (Twisted web, TLS with
``--cert``/``--key``, ALPN and HTTP/1.1 only, persistent connections, idle ones closed after
``--doh-idle-timeout`` if given) on ``--address:--doh-port`` serving
``GET --doh-path?dns=<base64url DNS message>`` and ``POST --doh-path`` with the body as
``Content-Type: application/dns-message``, answered from the same zone as TCP (never truncated;
the reply carries the query's ID, normally 0) with ``Content-Type: application/dns-message``
and ``Content-Length``. A missing or undecodable ``dns`` parameter or message, a POST of another
content type, or a reply rather than a query gets HTTP 400 and is not logged as a query (stderr
gets ``doh <source ip> 400 <why>``); other paths are 404, other methods 405.
``drop.test`` is never answered (the request stays open), ``<M>.delay.test`` after M ms.

Every query is logged, before it is answered, as one line in ``--log``::

    <source ip> <udp|tcp|doh> <qname> <qtype>

(``qname`` lower-case without the final dot, ``qtype`` a mnemonic such as ``A`` or ``TYPE65``),
so a test can prove where queries came from: a device's 203.0.113.x, never the VPN server.
Every TCP connection the DoH listener accepts is logged as ``<source ip> doh-connect``, so a
test can count connections and show that queries reuse one (keep-alive).
``--ready FILE`` is written once every socket listens; SIGTERM stops the server.
"""

import argparse
import base64
import ipaddress
import os
import re
import sys
import zlib

from twisted.names import dns

ZONE = "test"
ORIGIN_IP = "203.0.113.10"
ORIGIN_IP6 = "2001:db8:113::10"
BIG_COUNT = 40
BIG_NET = ipaddress.IPv4Address("198.18.1.0")
BENCH_NET = ipaddress.IPv4Network("198.18.0.0/15")
TXT_STRINGS = [(b"%d" % i) * 200 for i in range(1, 5)]
MAX_TTL = 86400
MAX_DELAY_MS = 30000
UDP_PLAIN = 512
UDP_EDNS_MAX = 4096
DOH_PATH = "/dns-query"
DOH_TYPE = b"application/dns-message"
DOH_MAX_MESSAGE = 65535
_BASE64URL = re.compile(rb"^[A-Za-z0-9_-]*={0,2}$")


def bench_address(qname):
    """The A answer for a ``*.bench.test`` name: deterministic, spread over 198.18.0.0/15.

    :param qname: the name, any case, with or without the final dot.
    """
    key = qname.lower().rstrip(".").encode("ascii")
    offset = 1 + zlib.crc32(key) % (BENCH_NET.num_addresses - 2)
    return str(BENCH_NET.network_address + offset)


def big_addresses():
    """The A records of ``big.test``, in order."""
    return [str(BIG_NET + i) for i in range(1, BIG_COUNT + 1)]


def qtype_name(qtype):
    return dns.QUERY_TYPES.get(qtype) or dns.EXT_QUERIES.get(qtype) or "TYPE%d" % qtype


class Zone:
    """The answers of the zone ``test.`` (pure: no sockets, no clock).

    :param ttl: TTL of the fixed records.
    :param negative_ttl: the SOA minimum, i.e. how long NXDOMAIN/NODATA may be cached.
    """

    def __init__(self, ttl=300, negative_ttl=30):
        self.ttl = ttl
        self.negative_ttl = negative_ttl

    def soa(self):
        record = dns.Record_SOA(
            mname=b"ns.test", rname=b"hostmaster.test", serial=1, refresh=3600, retry=600,
            expire=86400, minimum=self.negative_ttl, ttl=self.negative_ttl,
        )
        return dns.RRHeader(name=ZONE.encode(), type=dns.SOA, ttl=self.negative_ttl, payload=record, auth=True)

    def _a(self, name, address, ttl):
        return dns.RRHeader(name=name, type=dns.A, ttl=ttl, payload=dns.Record_A(address, ttl), auth=True)

    def lookup(self, qname, qtype):
        """What the zone says about ``qname``/``qtype``.

        :returns: ``(action, rcode, answers, authority)`` where action is ``"answer"``,
            ``"drop"`` or ``("delay", seconds)``.
        """
        name = qname.lower().rstrip(".")
        raw = name.encode("ascii", "replace")
        labels = name.split(".") if name else []
        if not labels or labels[-1] != ZONE:
            return "answer", dns.EREFUSED, [], []
        records = None  # None: the name does not exist; []: exists, but not with this type
        action = "answer"
        if name == ZONE:
            records = [self.soa()] if qtype == dns.SOA else []
        elif name == "origin.test":
            records = [
                self._a(raw, ORIGIN_IP, self.ttl),
                dns.RRHeader(name=raw, type=dns.AAAA, ttl=self.ttl, payload=dns.Record_AAAA(ORIGIN_IP6, self.ttl), auth=True),
            ]
        elif name == "big.test":
            records = [self._a(raw, address, self.ttl) for address in big_addresses()]
        elif name == "txt.test":
            records = [
                dns.RRHeader(name=raw, type=dns.TXT, ttl=self.ttl, payload=dns.Record_TXT(*TXT_STRINGS, ttl=self.ttl),
                             auth=True)
            ]
        elif name == "drop.test":
            return "drop", None, [], []
        elif len(labels) == 3 and labels[1] == "ttl" and labels[0].isdigit() and int(labels[0]) <= MAX_TTL:
            records = [self._a(raw, ORIGIN_IP, int(labels[0]))]
        elif len(labels) == 3 and labels[1] == "delay" and labels[0].isdigit():
            records = [self._a(raw, ORIGIN_IP, self.ttl)]
            action = ("delay", min(int(labels[0]), MAX_DELAY_MS) / 1000.0)
        elif len(labels) >= 3 and labels[-2] == "bench":
            records = [self._a(raw, bench_address(name), self.ttl)]
        if records is None:
            return action, dns.ENAME, [], [self.soa()]
        answers = [r for r in records if r.type == qtype or qtype == dns.ALL_RECORDS]
        return action, dns.OK, answers, ([] if answers else [self.soa()])

    def respond(self, query, udp):
        """The reply to ``query`` (a decoded :class:`dns.Message`) as ``(action, bytes)``; bytes is
        None when the query gets no answer."""
        edns = [r for r in query.additional if r.type == dns.OPT]
        reply = dns.Message(id=query.id, answer=1, opCode=query.opCode, auth=1, recDes=query.recDes, recAv=0, maxSize=0)
        reply.queries = list(query.queries[:1])
        if query.opCode != dns.OP_QUERY or len(query.queries) != 1:
            reply.rCode = dns.ENOTIMP if query.opCode != dns.OP_QUERY else dns.EFORMAT
            return "answer", reply.toStr()
        q = query.queries[0]
        action, rcode, answers, authority = self.lookup(q.name.name.decode("ascii", "replace"), q.type)
        if action == "drop":
            return action, None
        reply.rCode = rcode
        reply.answers, reply.authority = answers, authority
        limit = UDP_PLAIN
        if edns:
            limit = max(UDP_PLAIN, min(UDP_EDNS_MAX, edns[0].cls))
            reply.additional = [dns.RRHeader(name=b"", type=dns.OPT, cls=UDP_EDNS_MAX, ttl=0, payload=dns.UnknownRecord(b""))]
        data = reply.toStr()
        if udp and len(data) > limit:
            reply.answers, reply.authority, reply.trunc = [], [], 1
            data = reply.toStr()
        return action, data


def query_line(source, proto, query):
    """The log line for one question: ``<source> <proto> <qname> <qtype>`` and a newline."""
    return "%s %s %s %s\n" % (
        source, proto, query.name.name.decode("ascii", "replace").lower().rstrip("."), qtype_name(query.type))


def _factory(zone, log):
    """A DNSServerFactory whose queries go through :meth:`Zone.respond` and get logged."""
    from twisted.internet import reactor
    from twisted.names import server

    class _OriginFactory(server.DNSServerFactory):
        def messageReceived(self, message, proto, address=None):
            udp = address is not None
            source = address[0] if udp else proto.transport.getPeer().host
            for q in message.queries[:1]:
                log.write(query_line(source, "udp" if udp else "tcp", q))
            if message.answer:
                return
            action, data = zone.respond(message, udp)
            if data is None:
                return

            def send():
                if udp:
                    proto.transport.write(data, address)
                elif proto.transport is not None and proto.transport.connected:
                    proto.transport.write(len(data).to_bytes(2, "big") + data)

            if isinstance(action, tuple):
                reactor.callLater(action[1], send)
            else:
                send()

    return _OriginFactory()


def decode_dns_param(value):
    """The DNS message in a GET's ``dns`` parameter: base64url, padding optional (RFC 8484 §4.1).

    :raises ValueError: not base64url, or longer than a DNS message can be.
    """
    value = value.strip()
    if not value or not _BASE64URL.match(value):
        raise ValueError("dns parameter is not base64url")
    data = value.rstrip(b"=")
    try:
        wire = base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))
    except (ValueError, TypeError) as e:  # binascii.Error is a ValueError
        raise ValueError("dns parameter is not base64url: %s" % e)
    if not wire or len(wire) > DOH_MAX_MESSAGE:
        raise ValueError("dns parameter decodes to %d bytes" % len(wire))
    return wire


def _doh_resource(zone, log, clock):
    """The twisted.web leaf answering RFC 8484 GET and POST from ``zone`` (see the module docstring)."""
    from twisted.web import resource, server

    class DoHResource(resource.Resource):
        isLeaf = True

        def render(self, request):
            if request.method == b"GET":
                return self.render_GET(request)
            if request.method == b"POST":
                return self.render_POST(request)
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, POST")
            request.setHeader(b"content-type", b"text/plain")
            return b"method not allowed\n"

        def render_GET(self, request):
            values = request.args.get(b"dns") or []
            if len(values) != 1:
                return self._bad(request, "expected one dns parameter, got %d" % len(values))
            try:
                wire = decode_dns_param(values[0])
            except ValueError as e:
                return self._bad(request, str(e))
            return self._answer(request, wire)

        def render_POST(self, request):
            ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
            if ctype != DOH_TYPE:
                return self._bad(request, "content type %r" % ctype.decode("latin-1"))
            wire = request.content.read(DOH_MAX_MESSAGE + 1)
            if not wire or len(wire) > DOH_MAX_MESSAGE:
                return self._bad(request, "body of %d bytes" % len(wire))
            return self._answer(request, wire)

        def _bad(self, request, why):
            sys.stderr.write("doh %s 400 %s\n" % (request.getClientAddress().host, why))
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"text/plain")
            return ("bad DoH request: %s\n" % why).encode("utf-8", "replace")

        def _answer(self, request, wire):
            message = dns.Message()
            try:
                message.fromStr(wire)
            except Exception as e:  # anything the decoder raises on garbage
                return self._bad(request, "undecodable DNS message (%s)" % type(e).__name__)
            if message.answer:
                return self._bad(request, "a DNS response, not a query")
            for q in message.queries[:1]:
                log.write(query_line(request.getClientAddress().host, "doh", q))
            action, data = zone.respond(message, False)
            if data is None:
                return server.NOT_DONE_YET  # drop.test: never answered; the client gives up
            if isinstance(action, tuple):
                call = clock.callLater(action[1], self._send, request, data)
                request.notifyFinish().addErrback(lambda _: call.cancel() if call.active() else None)
                return server.NOT_DONE_YET
            self._headers(request, data)
            return data

        def _headers(self, request, data):
            request.setHeader(b"content-type", DOH_TYPE)
            request.setHeader(b"content-length", b"%d" % len(data))
            request.setHeader(b"cache-control", b"no-store")

        def _send(self, request, data):
            self._headers(request, data)
            request.write(data)
            request.finish()

    return DoHResource()


def doh_site(zone, log, path=DOH_PATH, reactor=None, idle_timeout=None):
    """A twisted.web ``Site`` serving DoH at ``path`` from ``zone``; other paths are 404.

    Each connection it builds is logged to ``log`` as ``<source ip> doh-connect``.

    :param reactor: an ``IReactorTime`` (a ``Clock`` in tests) for delayed answers and timeouts.
    :param idle_timeout: seconds before an idle connection is closed (None: Twisted's default).
    """
    from twisted.web import resource, server

    if reactor is None:
        from twisted.internet import reactor
    segments = [s.encode("ascii") for s in path.strip("/").split("/")]
    if not all(segments):
        raise ValueError("DoH path must be like /dns-query, got %r" % path)

    class NotFound(resource.Resource):
        isLeaf = True

        def render(self, request):
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain")
            return b"not found\n"

    class Node(resource.Resource):
        def getChild(self, name, request):  # instead of Twisted's NoResource (deprecated in 22.10)
            return NotFound()

    root = node = Node()
    for segment in segments[:-1]:
        child = Node()
        node.putChild(segment, child)
        node = child
    node.putChild(segments[-1], _doh_resource(zone, log, reactor))
    query_log = log

    class DoHSite(server.Site):
        noisy = False

        def buildProtocol(self, addr):
            query_log.write("%s doh-connect\n" % getattr(addr, "host", addr))
            return server.Site.buildProtocol(self, addr)

        def log(self, request):  # no access log
            pass

        def acceptableProtocols(self):
            # ALPN: HTTP/1.1 only, even where the h2 package would let Twisted offer HTTP/2.
            return [b"http/1.1"]

    kwargs = {} if idle_timeout is None else {"timeout": idle_timeout}
    return DoHSite(root, reactor=reactor, **kwargs)


def tls_options(cert_path, key_path):
    """Server TLS options (pyOpenSSL, i.e. ``Twisted[tls]``) for ``cert_path``/``key_path`` (PEM)."""
    try:
        from twisted.internet import ssl
        import OpenSSL  # noqa: F401  (twisted.internet.ssl imports without it)
    except ImportError as e:
        raise SystemExit("DNS over HTTPS needs pyOpenSSL (Twisted[tls]): %s" % e)
    with open(cert_path) as f:
        cert = f.read()
    with open(key_path) as f:
        key = f.read()
    return ssl.PrivateCertificate.loadPEM(cert + key).options()


def serve(addresses, port, log_path, ready=None, ttl=300, negative_ttl=30, doh_port=None, cert=None, key=None,
          doh_path=DOH_PATH, doh_idle_timeout=None):
    """Listen on ``port`` of every address (UDP and TCP) and, with ``doh_port``, HTTPS on the
    first address's ``doh_port`` (``cert``/``key`` PEM files); write ``ready``, run until SIGTERM."""
    from twisted.internet import reactor

    log = open(log_path, "a", buffering=1)  # one write per query line
    zone = Zone(ttl, negative_ttl)
    factory = _factory(zone, log)
    for address in addresses:
        reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface=address)
        reactor.listenTCP(port, factory, interface=address, backlog=1024)
    if doh_port is not None:
        site = doh_site(zone, log, doh_path, reactor, doh_idle_timeout)
        reactor.listenSSL(doh_port, site, tls_options(cert, key), interface=addresses[0], backlog=1024)
    if ready:
        with open(ready + ".tmp", "w") as f:
            f.write("%d\n" % os.getpid())
        os.rename(ready + ".tmp", ready)
    reactor.run()
    log.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", action="append", help="listen here (repeatable; default %s)" % ORIGIN_IP)
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--log", required=True, help="one line per query: <source ip> <udp|tcp|doh> <qname> <qtype>")
    parser.add_argument("--ready")
    parser.add_argument("--ttl", type=int, default=300)
    parser.add_argument("--negative-ttl", type=int, default=30)
    parser.add_argument("--doh-port", type=int, help="serve DNS over HTTPS on this port (needs --cert, --key)")
    parser.add_argument("--doh-path", default=DOH_PATH)
    parser.add_argument("--doh-idle-timeout", type=float, help="close idle DoH connections after this many seconds")
    parser.add_argument("--cert", help="PEM certificate for DoH")
    parser.add_argument("--key", help="PEM private key for DoH")
    args = parser.parse_args(argv)
    if args.doh_port is not None and not (args.cert and args.key):
        parser.error("--doh-port needs --cert and --key")
    try:
        from twisted.internet import epollreactor

        epollreactor.install()
    except Exception:
        pass
    serve(args.address or [ORIGIN_IP], args.port, args.log, args.ready, args.ttl, args.negative_ttl, args.doh_port, args.cert,
          args.key, args.doh_path, args.doh_idle_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
