"""One TCP client action for namespace tests; prints a JSON result line.

``python3 tcp_probe.py HOST PORT [--send HEX] [--recv N] [--timeout S] [--shut]``
connects, optionally sends bytes (then half-closes with ``--shut``), reads up
to N bytes, and reports how it ended: ``ok`` with the bytes, ``reset``,
``refused``, ``eof`` or ``timeout``, plus the elapsed seconds.
"""

import argparse
import json
import socket
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--send", default="")
    ap.add_argument("--recv", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--shut", action="store_true")
    a = ap.parse_args()
    family = socket.AF_INET6 if ":" in a.host else socket.AF_INET
    start = time.monotonic()
    got = b""
    result = "ok"
    try:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(a.timeout)
        s.connect((a.host, a.port))
        if a.send:
            s.sendall(bytes.fromhex(a.send))
        if a.shut:
            s.shutdown(socket.SHUT_WR)
        while len(got) < a.recv:
            chunk = s.recv(65536)
            if not chunk:
                result = "eof"
                break
            got += chunk
        s.close()
    except ConnectionResetError:
        result = "reset"
    except ConnectionRefusedError:
        result = "refused"
    except socket.timeout:
        result = "timeout"
    print(json.dumps({"result": result, "data": got.decode("latin-1"), "elapsed": time.monotonic() - start}))


if __name__ == "__main__":
    main()
