# -*- test-case-name: tests.unit.test_dns_origin -*-
"""The lab's authoritative DNS server for the zone ``test.``, run inside the origin namespace.

Started by :meth:`tests.lab.world.World.start_dns` (like ``origin_server.py`` for HTTP)::

    python3 dns_origin.py --address 203.0.113.10 --log FILE --ready FILE [--ttl 300] [--negative-ttl 30]

It answers UDP and TCP on ``--address:--port`` (53) with Twisted's DNS protocols and this zone:

===========================  ===============================================================
``origin.test``              A 203.0.113.10 (the HTTP/TLS origin), TTL ``--ttl``
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

Every query is logged, before it is answered, as one line in ``--log``::

    <source ip> <udp|tcp> <qname> <qtype>

(``qname`` lower-case without the final dot, ``qtype`` a mnemonic such as ``A`` or ``TYPE65``),
so a test can prove where queries came from: a device's 203.0.113.x, never the VPN server.
``--ready FILE`` is written once both sockets listen; SIGTERM stops the server.
"""

import argparse
import ipaddress
import os
import sys
import zlib

from twisted.names import dns

ZONE = "test"
ORIGIN_IP = "203.0.113.10"
BIG_COUNT = 40
BIG_NET = ipaddress.IPv4Address("198.18.1.0")
BENCH_NET = ipaddress.IPv4Network("198.18.0.0/15")
TXT_STRINGS = [(b"%d" % i) * 200 for i in range(1, 5)]
MAX_TTL = 86400
MAX_DELAY_MS = 30000
UDP_PLAIN = 512
UDP_EDNS_MAX = 4096


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
            records = [self._a(raw, ORIGIN_IP, self.ttl)]
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


def _factory(zone, log):
    """A DNSServerFactory whose queries go through :meth:`Zone.respond` and get logged."""
    from twisted.internet import reactor
    from twisted.names import server

    class _OriginFactory(server.DNSServerFactory):
        def messageReceived(self, message, proto, address=None):
            udp = address is not None
            source = address[0] if udp else proto.transport.getPeer().host
            for q in message.queries[:1]:
                log.write("%s %s %s %s\n" % (
                    source, "udp" if udp else "tcp", q.name.name.decode("ascii", "replace").lower().rstrip("."),
                    qtype_name(q.type)))
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


def serve(address, port, log_path, ready=None, ttl=300, negative_ttl=30):
    """Listen on ``address:port`` (UDP and TCP), write ``ready``, run until SIGTERM."""
    from twisted.internet import reactor

    log = open(log_path, "a", buffering=1)  # one write per query line
    factory = _factory(Zone(ttl, negative_ttl), log)
    reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface=address)
    reactor.listenTCP(port, factory, interface=address, backlog=1024)
    if ready:
        with open(ready + ".tmp", "w") as f:
            f.write("%d\n" % os.getpid())
        os.rename(ready + ".tmp", ready)
    reactor.run()
    log.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=ORIGIN_IP)
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--log", required=True, help="one line per query: <source ip> <udp|tcp> <qname> <qtype>")
    parser.add_argument("--ready")
    parser.add_argument("--ttl", type=int, default=300)
    parser.add_argument("--negative-ttl", type=int, default=30)
    args = parser.parse_args(argv)
    try:
        from twisted.internet import epollreactor

        epollreactor.install()
    except Exception:
        pass
    serve(args.address, args.port, args.log, args.ready, args.ttl, args.negative_ttl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
