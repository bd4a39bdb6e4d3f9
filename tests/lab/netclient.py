"""A measuring TCP client for lab namespaces: prints one JSON object per run.

Stdlib only, run by path under ``ip netns exec`` (``python3 netclient.py fetch URL``)
so it needs no checkout on ``sys.path``. Every mode is bounded by ``--timeout``.

- ``fetch URL``             HTTP GET (Connection: close): status, length, sha256, seconds, MB/s,
                            and the body when it is short.
- ``tls HOST PORT SNI``     TLS handshake with ``server_hostname=SNI`` (verified against
                            ``--cafile`` when given), ``GET /``, then the body of the reply.
- ``banner HOST PORT``      connect, time until the first line arrives, then one echo round trip.
- ``halfclose HOST PORT N`` read a banner line, send N bytes, ``shutdown(SHUT_WR)``, then read the
                            echo to EOF: did all N bytes come back after our FIN?
- ``probe HOST PORT``       connect, send ``--send``, report how the connection ended:
                            ``reset`` (RST, also one that beat connect()'s return), ``eof``,
                            ``data``, ``timeout``, ``error`` or ``connect-failed``, with seconds.
- ``hold HOST PORT``        connect, read the first chunk and print it as a JSON line at once
                            (the caller knows the connection is up), then wait without sending
                            until the connection ends; the final line says how (``reset``,
                            ``eof``, ``timeout``) and when (``ended_at``, wall-clock seconds).
"""

import argparse
import hashlib
import http.client
import json
import socket
import ssl
import sys
import time
from urllib.parse import urlsplit


def fetch(url, timeout):
    parts = urlsplit(url)
    started = time.monotonic()
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    conn.request("GET", parts.path or "/", headers={"Connection": "close"})
    response = conn.getresponse()
    first_byte = time.monotonic() - started
    digest = hashlib.sha256()
    length = 0
    head = b""
    while True:
        chunk = response.read(262144)
        if not chunk:
            break
        digest.update(chunk)
        if len(head) < 4096:
            head += chunk[: 4096 - len(head)]
        length += len(chunk)
    seconds = time.monotonic() - started
    conn.close()
    return {
        "status": response.status,
        "length": length,
        "sha256": digest.hexdigest(),
        "seconds": seconds,
        "first_byte_seconds": first_byte,
        "mb_per_s": length / 1e6 / seconds if seconds > 0 else None,
        "body": head.decode("latin-1") if length <= 4096 else None,
    }


def tls(host, port, sni, cafile, timeout):
    context = ssl.create_default_context(cafile=cafile) if cafile else ssl._create_unverified_context()
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname=sni) as conn:
            version = conn.version()
            conn.sendall(b"GET / HTTP/1.0\r\nHost: %s\r\n\r\n" % sni.encode())
            reply = b""
            while len(reply) < 65536:
                try:
                    data = conn.recv(4096)
                except ssl.SSLZeroReturnError:
                    break
                if not data:
                    break
                reply += data
            return {
                "reply": reply.split(b"\r\n\r\n", 1)[-1].decode("latin-1").strip(),
                "version": version,
                "verified": bool(cafile),
                "seconds": time.monotonic() - started,
            }


def banner(host, port, timeout):
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=timeout) as conn:
        connected = time.monotonic() - started
        line = b""
        while not line.endswith(b"\n"):
            data = conn.recv(4096)
            if not data:
                break
            line += data
        banner_seconds = time.monotonic() - started
        conn.sendall(b"echo-me\n")
        echo = b""
        while len(echo) < len(b"echo-me\n"):
            data = conn.recv(4096)
            if not data:
                break
            echo += data
        return {
            "banner": line.decode("latin-1"),
            "connect_seconds": connected,
            "banner_seconds": banner_seconds,
            "echo": echo.decode("latin-1"),
        }


def halfclose(host, port, size, timeout):
    """Read the banner, send ``size`` bytes, shutdown(SHUT_WR), read the echo to EOF."""
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=timeout) as conn:
        line = b""
        while not line.endswith(b"\n"):
            data = conn.recv(4096)
            if not data:
                break
            line += data
        payload = hashlib.sha256(b"halfclose").digest() * (size // 32 + 1)
        payload = payload[:size]
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        digest = hashlib.sha256()
        echoed = 0
        end = "eof"
        try:
            while True:
                data = conn.recv(262144)
                if not data:
                    break
                digest.update(data)
                echoed += len(data)
        except OSError as e:
            end = repr(e)
        return {
            "banner": line.decode("latin-1"),
            "sent": size,
            "echoed": echoed,
            "intact": echoed == size and digest.digest() == hashlib.sha256(payload).digest(),
            "end": end,
            "seconds": time.monotonic() - started,
        }


def probe(host, port, send, timeout, until_eof=False):
    """One connection: its outcome and the first chunk, or with ``until_eof`` everything the peer sent
    before closing (a reply written in several segments, e.g. headers then body, arrives whole)."""
    started = time.monotonic()
    result = {"outcome": None, "error": None}
    try:
        conn = socket.create_connection((host, port), timeout=timeout)
    except ConnectionResetError as e:
        # Accepted, then reset before connect() returned: with a timeout, Python reads SO_ERROR after
        # the handshake, and a fast RST is already there. Still a reset, not a refused connect.
        return {"outcome": "reset", "error": repr(e), "during_connect": True, "seconds": time.monotonic() - started}
    except OSError as e:
        return {"outcome": "connect-failed", "error": repr(e), "seconds": time.monotonic() - started}
    with conn:
        result["connect_seconds"] = time.monotonic() - started
        try:
            if send:
                conn.sendall(send.encode())
            data = conn.recv(65536)
            result["outcome"] = "data" if data else "eof"
            while until_eof and data and len(data) < 65536:
                more = conn.recv(65536)
                if not more:
                    break
                data += more
            result["data"] = data[: 4096 if until_eof else 200].decode("latin-1")
        except ConnectionResetError as e:
            result["outcome"], result["error"] = "reset", repr(e)
        except socket.timeout as e:
            result["outcome"], result["error"] = "timeout", repr(e)
        except OSError as e:
            result["outcome"], result["error"] = "error", repr(e)
    result["seconds"] = time.monotonic() - started
    return result


def hold(host, port, timeout):
    conn = socket.create_connection((host, port), timeout=timeout)
    with conn:
        first = conn.recv(4096)
        print(json.dumps({"connected": True, "first": first[:200].decode("latin-1")}), flush=True)
        result = {"outcome": None}
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    result["outcome"] = "eof"
                    break
        except ConnectionResetError as e:
            result["outcome"], result["error"] = "reset", repr(e)
        except socket.timeout as e:
            result["outcome"], result["error"] = "timeout", repr(e)
        except OSError as e:
            result["outcome"], result["error"] = "error", repr(e)
        result["ended_at"] = time.time()
        return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=30.0)
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("fetch")
    p.add_argument("url")
    p = sub.add_parser("tls")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("sni")
    p.add_argument("--cafile")
    p = sub.add_parser("banner")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p = sub.add_parser("halfclose")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("size", type=int)
    p = sub.add_parser("hold")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p = sub.add_parser("probe")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--send", default="")
    p.add_argument("--until-eof", action="store_true", help="read the whole reply, not only its first chunk")
    args = parser.parse_args(argv)
    try:
        if args.mode == "fetch":
            out = fetch(args.url, args.timeout)
        elif args.mode == "tls":
            out = tls(args.host, args.port, args.sni, args.cafile, args.timeout)
        elif args.mode == "banner":
            out = banner(args.host, args.port, args.timeout)
        elif args.mode == "halfclose":
            out = halfclose(args.host, args.port, args.size, args.timeout)
        elif args.mode == "hold":
            out = hold(args.host, args.port, args.timeout)
        else:
            out = probe(args.host, args.port, args.send, args.timeout, args.until_eof)
    except Exception as e:  # reported, not raised: the caller asserts on the JSON
        out = {"exception": "%s: %s" % (type(e).__name__, e)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
