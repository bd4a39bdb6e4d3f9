"""The DNS load generator for ``make bench-dns``: plain UDP sockets, bounded in count and time.

Stdlib only. Run by :mod:`tests.bench.dns` in the client (or peer) namespace::

    python3 -m tests.bench.dns_load --server 10.53.0.1 --prefix u1 --count 2000 --concurrency 32

It sends ``--count`` A queries for ``<prefix>-<i % distinct>.bench.test`` (``--distinct 0``: every
name unique) with at most ``--concurrency`` in flight, one connected UDP socket per slot and one
query per socket at a time, and checks every reply: same id, same question, NOERROR, not
truncated, exactly the A record :func:`tests.lab.dns_origin.bench_address` says. A query with no
reply within ``--timeout`` seconds is a failure (no retries: a lost query must show); once
``--deadline`` seconds have passed no new query is sent and the rest count as not sent.
It prints one JSON object: counts, failures (the first few described), the per-query latencies
in ms (send → verified reply, ``time.perf_counter``), the wall time and queries per second.
"""

import argparse
import json
import os
import random
import selectors
import socket
import struct
import sys
import time

from tests.lab.dns_origin import bench_address

TYPE_A = 1
CLASS_IN = 1


def encode_query(qid, qname, qtype=TYPE_A, rd=True):
    """A DNS query message (no EDNS)."""
    out = bytearray(struct.pack(">HHHHHH", qid, 0x0100 if rd else 0, 1, 0, 0, 0))
    for label in qname.rstrip(".").split("."):
        raw = label.encode("ascii")
        out += bytes([len(raw)]) + raw
    out += b"\x00" + struct.pack(">HH", qtype, CLASS_IN)
    return bytes(out)


def _read_name(data, offset):
    """(name lower-case without the final dot, offset after it); follows compression pointers."""
    labels = []
    end = None
    for _ in range(128):
        length = data[offset]
        if length & 0xC0 == 0xC0:
            if end is None:
                end = offset + 2
            offset = ((length & 0x3F) << 8) | data[offset + 1]
            continue
        offset += 1
        if length == 0:
            break
        labels.append(data[offset:offset + length].decode("ascii", "replace").lower())
        offset += length
    else:
        raise ValueError("name too long or looping")
    return ".".join(labels), (end if end is not None else offset)


def parse_reply(data):
    """A dict: id, rcode, tc, qname, qtype, answers [(type, ttl, value)] (A values as text)."""
    if len(data) < 12:
        raise ValueError("short message (%d bytes)" % len(data))
    qid, flags, qd, an, _ns, _ar = struct.unpack(">HHHHHH", data[:12])
    offset = 12
    qname, qtype = None, None
    for _ in range(qd):
        qname, offset = _read_name(data, offset)
        qtype = struct.unpack(">H", data[offset:offset + 2])[0]
        offset += 4
    answers = []
    for _ in range(an):
        _name, offset = _read_name(data, offset)
        rtype, _cls, ttl, length = struct.unpack(">HHIH", data[offset:offset + 10])
        offset += 10
        rdata = data[offset:offset + length]
        offset += length
        answers.append((rtype, ttl, socket.inet_ntoa(rdata) if rtype == TYPE_A and length == 4 else rdata))
    return {
        "id": qid, "qr": bool(flags & 0x8000), "tc": bool(flags & 0x0200), "rcode": flags & 0xF,
        "qname": qname, "qtype": qtype, "answers": answers,
    }


def check_reply(reply, qid, qname):
    """None if ``reply`` is the right answer to (qid, qname), else what is wrong."""
    if reply["id"] != qid or not reply["qr"]:
        return "id/qr mismatch"
    if reply["qname"] != qname or reply["qtype"] != TYPE_A:
        return "question %r/%r, asked %r/A" % (reply["qname"], reply["qtype"], qname)
    if reply["tc"]:
        return "truncated"
    if reply["rcode"] != 0:
        return "rcode %d" % reply["rcode"]
    addresses = [value for rtype, _ttl, value in reply["answers"] if rtype == TYPE_A]
    want = bench_address(qname)
    if addresses != [want]:
        return "answer %s, want %s" % (addresses, want)
    return None


def names(prefix, count, distinct=0):
    """The query names, in order."""
    return ["%s-%d.bench.test" % (prefix, i % distinct if distinct else i) for i in range(count)]


def run(server, port, qnames, concurrency, timeout, deadline, source=None):
    """Send every name in ``qnames`` (at most ``concurrency`` in flight); a result dict."""
    sel = selectors.DefaultSelector()
    rng = random.Random(os.getpid() ^ int(time.time() * 1000))
    slots = []
    for _ in range(max(1, min(concurrency, len(qnames)))):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if source:
            sock.bind((source, 0))
        sock.connect((server, port))
        sock.setblocking(False)
        slots.append({"sock": sock, "busy": None})
        sel.register(sock, selectors.EVENT_READ, slots[-1])
    latencies, failures = [], []
    failed = 0
    nxt = 0
    start = time.perf_counter()
    hard_end = start + deadline

    def issue(slot):
        nonlocal nxt
        qname = qnames[nxt]
        nxt += 1
        qid = rng.randrange(1 << 16)
        t0 = time.perf_counter()
        slot["busy"] = (qid, qname, t0, t0 + timeout)
        slot["sock"].send(encode_query(qid, qname))

    try:
        for slot in slots:
            if nxt < len(qnames):
                issue(slot)
        while True:
            now = time.perf_counter()
            busy = [s for s in slots if s["busy"] is not None]
            if not busy and (nxt >= len(qnames) or now >= hard_end):
                break
            wait = min(s["busy"][3] for s in busy) - now if busy else 0
            for key, _ in sel.select(max(0.0, min(wait, 0.5))):
                slot = key.data
                try:
                    data = slot["sock"].recv(65535)
                except (BlockingIOError, ConnectionRefusedError) as e:
                    if isinstance(e, ConnectionRefusedError) and slot["busy"] is not None:
                        failed += 1
                        if len(failures) < 10:
                            failures.append("%s: ICMP port unreachable" % slot["busy"][1])
                        slot["busy"] = None
                    continue
                if slot["busy"] is None:
                    continue  # a late reply to a query that already timed out
                qid, qname, t0, _end = slot["busy"]
                try:
                    reply = parse_reply(data)
                except (ValueError, IndexError, struct.error) as e:
                    reply, problem = None, "unparsable reply: %s" % e
                if reply is not None and reply["id"] != qid:
                    continue  # stale
                t1 = time.perf_counter()
                problem = check_reply(reply, qid, qname) if reply is not None else problem
                if problem:
                    failed += 1
                    if len(failures) < 10:
                        failures.append("%s: %s" % (qname, problem))
                else:
                    latencies.append((t1 - t0) * 1000.0)
                slot["busy"] = None
            now = time.perf_counter()
            for slot in slots:
                if slot["busy"] is not None and now >= slot["busy"][3]:
                    failed += 1
                    if len(failures) < 10:
                        failures.append("%s: no reply within %.1fs" % (slot["busy"][1], timeout))
                    slot["busy"] = None
                if slot["busy"] is None and nxt < len(qnames) and now < hard_end:
                    issue(slot)
    finally:
        for slot in slots:
            sel.unregister(slot["sock"])
            slot["sock"].close()
        sel.close()
    wall = time.perf_counter() - start
    return {
        "count": len(qnames), "sent": nxt, "ok": len(latencies), "failed": failed, "not_sent": len(qnames) - nxt,
        "failures": failures, "wall_s": round(wall, 4), "qps": round(len(latencies) / wall, 1) if wall > 0 else 0.0,
        "concurrency": len(slots), "latencies_ms": [round(x, 4) for x in latencies],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m tests.bench.dns_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--source")
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--distinct", type=int, default=0, help="cycle over this many names (0: all unique)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=5.0, help="per query, seconds")
    parser.add_argument("--deadline", type=float, default=60.0, help="no new query after this many seconds")
    args = parser.parse_args(argv)
    result = run(args.server, args.port, names(args.prefix, args.count, args.distinct), args.concurrency,
                 args.timeout, args.deadline, args.source)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
