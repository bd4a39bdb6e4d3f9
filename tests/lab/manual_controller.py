"""A minimal blocking management-interface peer, to prove the lab before the real daemon.

It connects to OpenVPN's unix management socket, answers the unterminated
``ENTER PASSWORD:`` prompt, releases holds, and answers every ``>CLIENT:CONNECT`` block with::

    client-auth CID KID
    ifconfig-push 10.9.0.X 255.255.255.0
    END

(X from 10 upwards, one per username/common name; REAUTH gets ``client-auth-nt``).
Everything received is kept with timestamps so tests can wait for lines and events.

Not the product: no reconnects, no epochs, no firewall. ``python3 -m
tests.lab.manual_controller SOCKET [--password PW]`` runs it in the foreground.
"""

import ipaddress
import re
import socket
import threading
import time

PROMPT = b"ENTER PASSWORD:"
_HEADER = re.compile(r">CLIENT:(CONNECT|REAUTH|ESTABLISHED|DISCONNECT|CR_RESPONSE),(\d+)(?:,(\d+))?")
_ADDRESS = re.compile(r">CLIENT:ADDRESS,(\d+),([^,]+),(\d+)")


class ClientEvent:
    """One parsed ``>CLIENT:`` notification (block or ADDRESS line)."""

    def __init__(self, kind, cid, kid=None, at=None):
        self.kind = kind
        self.cid = cid
        self.kid = kid
        self.env = {}
        self.address = None
        self.at = at if at is not None else time.monotonic()

    @property
    def name(self):
        """The identity the controller keys IPs by: username, else common_name."""
        return self.env.get("username") or self.env.get("common_name") or ""

    def __repr__(self):
        return "<%s cid=%s kid=%s name=%r>" % (self.kind, self.cid, self.kid, self.name)


class ManualController:
    """Blocking test peer on the management socket; the reader runs in a daemon thread.

    ``decide(event)`` may override the default answer to CONNECT; it returns one of
    ``("auth", [config lines])``, ``("deny", "reason")`` or ``("ignore", None)``.
    """

    def __init__(self, path, password=None, subnet="10.9.0.0/24", first_host=10,
                 ips=None, decide=None, auto_hold_release=True):
        self.path = path
        self.password = password
        self.subnet = ipaddress.IPv4Network(subnet)
        self.next_host = first_host
        self.ips = dict(ips or {})  # name -> ip (str)
        self.decide = decide
        self.auto_hold_release = auto_hold_release
        self.lines = []  # (monotonic time, line) for every line received
        self.events = []  # ClientEvent, in arrival order
        self.sent = []  # (monotonic time, line) for every line sent
        self.errors = []
        self.prompts = 0
        self.closed = threading.Event()
        self._sock = None
        self._thread = None
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._block = None

    # --- connection ---

    def connect(self, timeout=10, wait_banner=True):
        """Connect (retrying while the socket does not exist yet), start the reader, wait for the banner."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise AssertionError("management socket %s not connectable within %.1fs" % (self.path, timeout))
                time.sleep(0.05)
        self._sock = sock
        self._thread = threading.Thread(target=self._read_loop, name="manual-controller", daemon=True)
        self._thread.start()
        if wait_banner:  # also guarantees the password (if any) was accepted
            self.wait_line(r"^>INFO:OpenVPN Management Interface", timeout)
        return self

    def close(self, timeout=5):
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, line):
        """Send one command line (``\\n`` appended)."""
        with self._send_lock:
            self.sent.append((time.monotonic(), line))
            self._sock.sendall(line.encode() + b"\n")

    # --- reading ---

    def _read_loop(self):
        buf = b""
        try:
            while True:
                data = self._sock.recv(65536)
                if not data:
                    break
                buf += data
                *complete, buf = buf.split(b"\n")
                for raw in complete:
                    self._line(raw.rstrip(b"\r").decode("utf-8", "replace"))
                # The password prompt comes without CR/LF: look at the unterminated rest.
                if buf.startswith(PROMPT):
                    buf = buf[len(PROMPT):]
                    self._prompt()
        except OSError as e:
            if not self.closed.is_set():
                self.errors.append(e)
        except Exception as e:  # surface parser bugs to the test
            self.errors.append(e)
        finally:
            self.closed.set()
            with self._cond:
                self._cond.notify_all()

    def _prompt(self):
        self.prompts += 1
        with self._cond:
            self.lines.append((time.monotonic(), PROMPT.decode()))
            self._cond.notify_all()
        if self.password is None:
            self.errors.append(AssertionError("ENTER PASSWORD: prompt but no password configured"))
            return
        self.send(self.password)

    def _line(self, line):
        now = time.monotonic()
        event = None
        if self._block is not None:
            if line == ">CLIENT:ENV,END":
                event, self._block = self._block, None
            elif line.startswith(">CLIENT:ENV,"):
                key, _, value = line[len(">CLIENT:ENV,"):].partition("=")
                self._block.env[key] = value
        elif line.startswith(">CLIENT:ADDRESS,"):
            m = _ADDRESS.match(line)
            event = ClientEvent("ADDRESS", int(m.group(1)), at=now)
            event.address = m.group(2)
        elif line.startswith(">CLIENT:"):
            m = _HEADER.match(line)
            if m:
                self._block = ClientEvent(m.group(1), int(m.group(2)),
                                          int(m.group(3)) if m.group(3) else None, at=now)
        with self._cond:
            self.lines.append((now, line))
            if event is not None:
                self.events.append(event)
            self._cond.notify_all()
        if line.startswith(">HOLD:") and self.auto_hold_release:
            self.send("hold release")
        if event is not None:
            self._answer(event)

    def ip_for(self, name):
        """The IP for ``name``: from ``ips``, else the next free host from ``first_host`` up."""
        if name not in self.ips:
            self.ips[name] = str(self.subnet.network_address + self.next_host)
            self.next_host += 1
        return self.ips[name]

    def _answer(self, event):
        if event.kind == "REAUTH":
            self.send("client-auth-nt %d %d" % (event.cid, event.kid))
            return
        if event.kind != "CONNECT":
            return
        verdict = self.decide(event) if self.decide else None
        if verdict is None:
            verdict = ("auth", ["ifconfig-push %s %s" % (self.ip_for(event.name), self.subnet.netmask)])
        action, arg = verdict
        if action == "auth":
            with self._send_lock:  # keep the block contiguous
                block = ["client-auth %d %d" % (event.cid, event.kid), *arg, "END"]
                now = time.monotonic()
                self.sent.extend((now, l) for l in block)
                self._sock.sendall(("\n".join(block) + "\n").encode())
        elif action == "deny":
            reason = arg.replace("\\", "\\\\").replace('"', '\\"')
            self.send('client-deny %d %d "%s" "%s"' % (event.cid, event.kid, reason, reason))
        elif action != "ignore":
            raise ValueError("unknown verdict %r" % (verdict,))

    # --- waiting (all bounded) ---

    def wait_line(self, regex, timeout=10, since=0):
        """Wait for a received line matching ``regex`` at index >= ``since``; return (index, match)."""
        pattern = re.compile(regex)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(since, len(self.lines)):
                    m = pattern.search(self.lines[i][1])
                    if m:
                        return i, m
                since = max(since, len(self.lines))
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.closed.is_set():
                    raise AssertionError(
                        "%s waiting for %r on the management socket; last lines:\n%s"
                        % ("connection closed" if self.closed.is_set() else "timed out after %.1fs" % timeout,
                           regex, "\n".join(l for _, l in self.lines[-25:]))
                    )
                self._cond.wait(min(remaining, 0.5))

    def wait_event(self, kind, timeout=10, cid=None, since=0):
        """Wait for a ClientEvent of ``kind`` (and ``cid``) at index >= ``since``; return (index, event)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(since, len(self.events)):
                    e = self.events[i]
                    if e.kind == kind and (cid is None or e.cid == cid):
                        return i, e
                since = max(since, len(self.events))
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.closed.is_set():
                    raise AssertionError(
                        "%s waiting for %s cid=%s; events so far: %r"
                        % ("connection closed" if self.closed.is_set() else "timed out after %.1fs" % timeout,
                           kind, cid, self.events)
                    )
                self._cond.wait(min(remaining, 0.5))

    def command(self, line, timeout=10):
        """Send a single-line command and wait for its ``SUCCESS:``/``ERROR:`` reply line."""
        with self._cond:
            mark = len(self.lines)
        self.send(line)
        return self.wait_line(r"^(SUCCESS|ERROR):", timeout, since=mark)[1].string


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("socket")
    parser.add_argument("--password")
    parser.add_argument("--state", action="store_true", help="send 'state on'")
    args = parser.parse_args(argv)
    ctl = ManualController(args.socket, password=args.password).connect()
    if args.state:
        ctl.send("state on")
    seen = 0
    try:
        while not ctl.closed.is_set():
            time.sleep(0.2)
            for _, line in ctl.lines[seen:]:
                print("<", line, flush=True)
            seen = len(ctl.lines)
    except KeyboardInterrupt:
        pass
    finally:
        ctl.close()


if __name__ == "__main__":
    main()
