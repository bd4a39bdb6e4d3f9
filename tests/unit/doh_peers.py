"""Loopback peers for the DoH client's tests: a CA, a TLS DoH server and a CONNECT proxy.

All of them are real sockets on 127.0.0.1 in the test's reactor, so the client's TLS, HTTP and
tunnel code run for real; each peer records what it saw and can be told to misbehave.
"""

import base64
import datetime
import ipaddress
import os
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, protocol, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.names import dns
from twisted.web import resource, server


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_ca(directory, cn="doh-test-ca"):
    """``(ca_path, issue)``: a CA certificate file and ``issue(dns_names, ips=()) -> (cert_pem, key_pem)``
    (every entry of ``dns_names`` is written as a DNS SAN, even one that looks like an IP)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    path = os.path.join(directory, cn + ".pem")
    with open(path, "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))

    def issue(names, ips=()):
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(_name(cn))
            .public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _pem(leaf_key)

    return path, issue


def answer_for(wire, address="192.0.2.7", ttl=60):
    """A reply to ``wire`` (same ID and question) with one A record."""
    query = dns.Message()
    query.fromStr(wire)
    reply = dns.Message(id=query.id, answer=1, recAv=1, recDes=query.recDes)
    reply.queries = query.queries
    q = query.queries[0]
    reply.answers = [dns.RRHeader(q.name.name, dns.A, dns.IN, ttl, dns.Record_A(address, ttl))]
    return reply.toStr()


class DoHResource(resource.Resource):
    """``/dns-query``: answers GET ``?dns=`` with :func:`answer_for`; ``mode`` makes it misbehave.

    Modes: ``ok``, ``status`` (HTTP 503), ``html`` (200 text/html), ``huge`` (70,000-byte
    body), ``huge-chunked`` (80,000 bytes, chunked), ``empty`` (200 with no body), ``hang`` (never answers), ``close`` (``Connection: close`` on every reply).
    """

    isLeaf = True

    def __init__(self):
        resource.Resource.__init__(self)
        self.mode = "ok"
        self.requests = []  # (method, path, accept header, query ID)
        self.hung = []

    def render_GET(self, request):
        parsed = urlsplit(request.uri.decode("ascii"))
        encoded = parse_qs(parsed.query).get("dns", [""])[0]
        wire = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        query_id = int.from_bytes(wire[:2], "big")
        self.requests.append((request.method, parsed.path, request.getHeader("accept"), query_id))
        if self.mode == "hang":
            self.hung.append(request)
            return server.NOT_DONE_YET
        if self.mode == "status":
            request.setResponseCode(503)
            return b"busy"
        if self.mode == "html":
            request.setHeader("content-type", "text/html")
            return b"<html>captive portal</html>"
        request.setHeader("content-type", "application/dns-message")
        if self.mode == "close":
            request.setHeader("connection", "close")
        if self.mode == "empty":
            return b""
        if self.mode == "huge":
            return b"\0" * 70000
        if self.mode == "huge-chunked":  # no Content-Length: the client must count
            for _ in range(2):
                request.write(b"\0" * 40000)
            request.finish()
            return server.NOT_DONE_YET
        return answer_for(wire)


class DoHServer:
    """A TLS listener on 127.0.0.1 serving :class:`DoHResource`; counts TLS connections."""

    def __init__(self, cert_pem, key_pem):
        self.resource = DoHResource()
        self.connections = 0
        site = server.Site(self.resource)
        site.noisy = False
        owner = self
        build = site.buildProtocol

        def counted(addr):
            owner.connections += 1
            return build(addr)

        site.buildProtocol = counted
        options = ssl.PrivateCertificate.loadPEM(key_pem + cert_pem).options()
        self.port = reactor.listenSSL(0, site, options, interface="127.0.0.1")
        self.address = ("127.0.0.1", self.port.getHost().port)

    def stop(self):
        for request in self.resource.hung:
            if not request.finished and request.channel is not None:
                request.channel.transport.abortConnection()
        return self.port.stopListening()


class _Tunnel(protocol.Protocol):
    """The client side of a proxied connection: parses CONNECT, then relays to the target."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.head = b""
        self.peer = None
        self.pending = []

    def connectionMade(self):
        self.proxy.tunnels.append(self)

    def dataReceived(self, data):
        if self.peer is not None:
            self.peer.transport.write(data)
            return
        if self.head is None:
            self.pending.append(data)
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        head, rest = self.head.split(b"\r\n\r\n", 1)
        self.head = None
        target = head.split(b"\r\n")[0].split(b" ")[1].decode("ascii")
        self.proxy.targets.append(target)
        if self.proxy.refuse:
            self.transport.write(b"HTTP/1.1 403 Forbidden\r\n\r\n")
            self.transport.loseConnection()
            return
        if rest:
            self.pending.append(rest)
        d = connectProtocol(TCP4ClientEndpoint(reactor, *self.proxy.forward_to), _Far(self))
        d.addErrback(lambda f: self.transport.abortConnection())

    def far_connected(self, far):
        self.peer = far
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        for data in self.pending:
            far.transport.write(data)
        self.pending = []

    def connectionLost(self, reason):
        if self in self.proxy.tunnels:
            self.proxy.tunnels.remove(self)
        if self.peer is not None:
            self.peer.transport.loseConnection()


class _Far(protocol.Protocol):
    def __init__(self, tunnel):
        self.tunnel = tunnel

    def connectionMade(self):
        self.tunnel.far_connected(self)

    def dataReceived(self, data):
        self.tunnel.transport.write(data)

    def connectionLost(self, reason):
        self.tunnel.transport.loseConnection()


class ConnectProxy:
    """An HTTP CONNECT proxy on 127.0.0.1 that sends every tunnel to ``forward_to``.

    :ivar targets: the ``host:port`` each CONNECT asked for.
    :ivar tunnels: the tunnels open now (:meth:`drop_all` resets them).
    """

    def __init__(self, forward_to):
        self.forward_to = forward_to
        self.targets = []
        self.tunnels = []
        self.refuse = False
        factory = protocol.Factory.forProtocol(lambda: _Tunnel(self))
        factory.noisy = False
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.address = ("127.0.0.1", self.port.getHost().port)

    def black_hole(self):
        """From now on every open tunnel swallows what it gets, both ways, and stays up (a
        phone that lost signal: nothing arrives, nothing is refused)."""
        for tunnel in self.tunnels:
            tunnel.dataReceived = lambda data: None
            if tunnel.peer is not None:
                tunnel.peer.dataReceived = lambda data: None

    def drop_all(self):
        for tunnel in list(self.tunnels):
            tunnel.transport.abortConnection()

    def stop(self):
        self.drop_all()
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)
