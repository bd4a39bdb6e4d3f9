"""A scripted OpenVPN 2.6 management peer on a real unix socket, for benchmarks.

It plays OpenVPN's side of ``management PATH unix`` with the line formats of
:mod:`ovpnmgr.testing` (``banner_line``, ``status3_lines``,
``client_block_lines``): banner on connect, ``SUCCESS:`` replies to
``state on``/``hold release``/``bytecount``, ``status 3`` + ``END``, and
``SUCCESS: client-auth command succeeded`` after each ``client-auth`` block's
``END``, exactly as a 2.6.14 server does.

The driver side (:class:`ManagementPeer`) writes ``>CLIENT:CONNECT`` blocks
and records, per CID, ``time.perf_counter()`` just before the block is handed
to the transport (``t0``) and when the ``client-auth CID KID`` header line is
read back (``t1``). Denials and kills are recorded so a benchmark can fail
loudly instead of reporting fast wrong answers. ``marks`` records
``(what, perf_counter())`` for each management connect/loss and each
``status``/``bytecount`` command, so a benchmark can time a (re)attach: the
controller asks for ``bytecount`` right after it reconciled ``status 3``.
"""

import time

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver

from ovpnmgr.testing import DEFAULT_TIME, banner_line, client_block_lines, connect_env, status3_lines


class PeerError(Exception):
    """The client under test answered a CONNECT wrongly (deny, kill, timeout)."""


def cert_connect_env(cid, common_name):
    """A realistic CONNECT env of a certificate-only client (empty password, no username)."""
    env = connect_env(
        username="",
        password="",
        untrusted_ip="198.51.%d.%d" % (100 + (cid // 250) % 100, cid % 250 + 1),
        untrusted_port=str(20000 + cid % 40000),
    )
    # What a client certificate adds (OpenVPN 2.6.14, newest first after n_clients).
    env.update(
        {
            "common_name": common_name,
            "tls_id_0": "CN=%s" % common_name,
            "X509_0_CN": common_name,
            "tls_serial_hex_0": "3a:%02x:%02x" % (cid % 256, (cid // 256) % 256),
            "tls_serial_0": str(3801088 + cid),
            "tls_digest_sha256_0": "a3:" * 31 + "01",
            "tls_digest_0": "b1:" * 19 + "02",
            "tls_id_1": "CN=pocketproxy-ca",
            "X509_1_CN": "pocketproxy-ca",
            "tls_serial_hex_1": "01",
            "tls_serial_1": "1",
            "IV_NCP": "2",
            "IV_MTU": "1600",
            "IV_TCPNL": "1",
        }
    )
    return env


def disconnect_env(connect):
    """DISCONNECT env: the CONNECT env without the password, plus the traffic counters."""
    env = {k: v for k, v in connect.items() if k != "password"}
    env.update({"bytes_received": "12345", "bytes_sent": "67890", "time_duration": "3"})
    return env


class _PeerLine(LineOnlyReceiver):
    """OpenVPN's side of one management connection."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def connectionMade(self):
        self._block = None
        self.factory.peer.marks.append(("connect", time.perf_counter()))
        self.factory.peer._connected(self)
        self.send_lines(banner_line(5))

    def connectionLost(self, reason=None):
        self.factory.peer.marks.append(("lost", time.perf_counter()))
        self.factory.peer._lost(self)

    def send_lines(self, *lines):
        self.transport.write(b"".join(line.encode("utf-8") + b"\r\n" for line in lines))

    def lineReceived(self, line):
        now = time.perf_counter()
        text = line.rstrip(b"\r").decode("utf-8", "replace")
        peer = self.factory.peer
        if self._block is not None:
            if text == "END":
                header, t1, lines = self._block
                self._block = None
                self.send_lines("SUCCESS: client-auth command succeeded")
                peer._client_auth(header, t1, lines)
            else:
                self._block[2].append(text)
            return
        words = text.split()
        verb = words[0] if words else ""
        arg = words[1] if len(words) > 1 else ""
        if verb == "client-auth":
            self._block = (words, now, [])
        elif verb == "client-auth-nt":
            self.send_lines("SUCCESS: client-auth command succeeded")
        elif verb == "state" and arg in ("on", "off"):
            self.send_lines("SUCCESS: real-time state notification set to %s" % arg.upper())
        elif verb == "status":
            peer.marks.append(("status", now))
            peer.status_served += 1
            self.send_lines(*status3_lines(peer.status_clients, include_end=True))
        elif verb == "hold":
            self.send_lines("SUCCESS: hold release succeeded" if arg == "release" else "SUCCESS: hold=0")
        elif verb == "bytecount":
            peer.marks.append(("bytecount", now))
            self.send_lines("SUCCESS: bytecount interval changed")
        elif verb in ("client-deny", "client-kill"):
            self.send_lines("SUCCESS: %s command succeeded" % verb)
            peer._refused(verb, words, text)
        elif verb == "pid":
            self.send_lines("SUCCESS: pid=4242")
        else:
            self.send_lines("ERROR: unknown command, enter 'help' for more options")


class ManagementPeer:
    """Listens on ``path`` (one management client at a time, like OpenVPN) and drives it."""

    def __init__(self, reactor, path):
        self.reactor = reactor
        self.path = str(path)
        self.port = None
        self.conn = None
        self.status_clients = []
        self.status_served = 0
        self.marks = []  # (what, perf_counter()): connect, lost, status, bytecount
        self.t0 = {}
        self.t1 = {}
        self.pushed = {}  # cid -> pushed IPv4 address (str)
        self.refusals = []  # (verb, text)
        self._waiting = {}  # cid -> Deferred
        self._envs = {}
        self._connected_d = []

    # --- server ---

    def listen(self):
        factory = Factory.forProtocol(_PeerLine)
        factory.peer = self
        self.port = self.reactor.listenUNIX(self.path, factory, backlog=1)
        return self

    def when_connected(self):
        if self.conn is not None:
            return defer.succeed(self.conn)
        d = defer.Deferred()
        self._connected_d.append(d)
        return d

    def _connected(self, conn):
        self.conn = conn
        waiters, self._connected_d = self._connected_d, []
        for d in waiters:
            d.callback(conn)

    def _lost(self, conn):
        if self.conn is conn:
            self.conn = None
        waiting, self._waiting = self._waiting, {}
        for cid, d in waiting.items():
            d.errback(PeerError("management connection lost while cid %d waited for client-auth" % cid))

    def stop(self):
        if self.conn is not None and self.conn.transport is not None:
            self.conn.transport.loseConnection()
        if self.port is not None:
            port, self.port = self.port, None
            return defer.maybeDeferred(port.stopListening)
        return defer.succeed(None)

    # --- what the client under test sent ---

    def _client_auth(self, header, t1, lines):
        try:
            cid = int(header[1])
        except (IndexError, ValueError):
            self.refusals.append(("client-auth", " ".join(header)))
            return
        self.t1[cid] = t1
        for line in lines:
            words = line.split()
            if words[:1] == ["ifconfig-push"] and len(words) >= 2:
                self.pushed[cid] = words[1]
        d = self._waiting.pop(cid, None)
        if d is not None:
            d.callback(cid)

    def _refused(self, verb, words, text):
        self.refusals.append((verb, text))
        try:
            cid = int(words[1])
        except (IndexError, ValueError):
            return
        d = self._waiting.pop(cid, None)
        if d is not None:
            d.errback(PeerError("cid %d: %s" % (cid, text)))

    # --- driving ---

    def _write(self, lines):
        if self.conn is None:
            raise PeerError("no management client attached")
        self.conn.send_lines(*lines)

    def connect(self, cid, env, timeout=None):
        """Write ``>CLIENT:CONNECT,cid,1`` + env; the Deferred fires with cid at ``client-auth``."""
        d = defer.Deferred()
        self._waiting[cid] = d
        self._envs[cid] = env
        self.t1.pop(cid, None)
        lines = client_block_lines("CONNECT", (cid, 1), env)
        self.t0[cid] = time.perf_counter()
        self._write(lines)
        if timeout is not None:
            d.addTimeout(timeout, self.reactor, onTimeoutCancel=self._timed_out(cid))
        return d

    def _timed_out(self, cid):
        def raise_(result, timeout):
            self._waiting.pop(cid, None)
            raise PeerError("cid %d: no client-auth within %gs" % (cid, timeout))

        return raise_

    def connect_many(self, items, timeout):
        """Write CONNECT blocks for ``[(cid, env)]`` back to back; fires when all are answered."""
        ds = []
        for cid, env in items:
            ds.append(self.connect(cid, env))
        d = defer.gatherResults(ds, consumeErrors=True)
        d.addTimeout(timeout, self.reactor)
        return d

    def establish(self, cids):
        """``>CLIENT:ADDRESS`` + ``>CLIENT:ESTABLISHED`` for admitted ``cids``, in one write."""
        lines = []
        for cid in cids:
            ip = self.pushed[cid]
            lines.append(">CLIENT:ADDRESS,%d,%s,1" % (cid, ip))
            env = {k: v for k, v in self._envs[cid].items() if k != "password"}
            env.update(
                {
                    "ifconfig_pool_remote_ip": ip,
                    "ifconfig_pool_netmask": "255.255.0.0",
                    "trusted_ip": env.get("untrusted_ip", ""),
                    "trusted_port": env.get("untrusted_port", ""),
                    "time_unix": str(DEFAULT_TIME),
                }
            )
            lines.extend(client_block_lines("ESTABLISHED", (cid,), env))
        if lines:
            self._write(lines)

    def disconnect(self, cids):
        """``>CLIENT:DISCONNECT`` blocks (full env) for ``cids``, in one write."""
        lines = []
        for cid in cids:
            lines.extend(client_block_lines("DISCONNECT", (cid,), disconnect_env(self._envs.pop(cid, {}))))
            self.pushed.pop(cid, None)
        if lines:
            self._write(lines)

    def latency_ms(self, cid):
        return (self.t1[cid] - self.t0[cid]) * 1000.0
