"""A stub resolver for lab namespaces: one DNS query over UDP (a connected socket, so only a
reply from the address asked is accepted) or TCP, run with the interpreter under ``ip netns exec``.
"""

import json
import sys

A, NOERROR, SERVFAIL, NXDOMAIN, REFUSED = 1, 0, 2, 3, 5

# A stub resolver: one query over UDP (connected socket) or TCP; prints one JSON object.
_DIG = r"""
import json, random, socket, struct, sys, time
server, port, proto, qname, qtype, timeout, edns = (
    sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), float(sys.argv[6]), sys.argv[7] == "edns")
qid = random.randrange(65536)
wire = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 1 if edns else 0)
for label in qname.rstrip(".").split("."):
    wire += bytes([len(label)]) + label.encode()
wire += b"\0" + struct.pack("!HH", qtype, 1)
if edns:
    wire += b"\0" + struct.pack("!HHIH", 41, 1232, 0, 0)

def skip_name(data, i):
    while True:
        n = data[i]
        if n & 0xC0 == 0xC0:
            return i + 2
        if n == 0:
            return i + 1
        i += 1 + n

out = {"proto": proto}
started = time.monotonic()
try:
    if proto == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(timeout)
        s.connect((server, port))
        s.send(wire)
        data = s.recv(65535)
    else:
        s = socket.create_connection((server, port), timeout=timeout)
        s.sendall(struct.pack("!H", len(wire)) + wire)
        buf = b""
        while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
            chunk = s.recv(65535)
            if not chunk:
                raise EOFError("closed after %d bytes" % len(buf))
            buf += chunk
        data = buf[2:2 + struct.unpack("!H", buf[:2])[0]]
    rid, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", data[:12])
    out.update(id_ok=rid == qid, qr=flags >> 15, tc=(flags >> 9) & 1, rcode=flags & 0xF, size=len(data),
               ancount=an, answers=[], ttls=[])
    i = 12
    for _ in range(qd):
        i = skip_name(data, i) + 4
    for _ in range(an):
        i = skip_name(data, i)
        rtype, rclass, ttl, rdlen = struct.unpack("!HHIH", data[i:i + 10])
        i += 10
        if rtype == 1 and rdlen == 4:
            out["answers"].append(socket.inet_ntoa(data[i:i + 4]))
            out["ttls"].append(ttl)
        i += rdlen
except socket.timeout:
    out["error"] = "timeout"
except ConnectionRefusedError:
    out["error"] = "refused"
except ConnectionResetError:
    out["error"] = "reset"
except Exception as e:
    out["error"] = repr(e)
out["seconds"] = time.monotonic() - started
print(json.dumps(out))
"""


def dig(ns, qname, proto="udp", server="10.9.0.1", port=53, qtype=A, timeout=5.0, edns=False):
    """One query from namespace ``ns``; the stub's JSON (``rcode``, ``tc``, ``answers``... or ``error``)."""
    out = ns.run(sys.executable, "-c", _DIG, server, str(port), proto, qname, str(qtype), str(timeout),
                 "edns" if edns else "plain", check=False, timeout=timeout + 30)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise AssertionError("dig %s failed (%s): %r %r" % (qname, out.returncode, out.stdout, out.stderr))
