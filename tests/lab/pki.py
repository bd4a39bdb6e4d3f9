"""A throwaway PKI for the lab, made with the ``openssl`` CLI (EC P-256, a few ms per cert).

``make_pki(directory)`` writes a CA, a server certificate (serverAuth EKU), client
certificates by CN (clientAuth EKU) and a ``tls-crypt`` key. ``session_pki()`` returns one
PKI per Python process (cached, removed at exit); ``Pki.client(cn)`` adds a client
certificate on demand. Nothing here is secret beyond the lab: keys are unencrypted.
"""

import atexit
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field

OPENSSL = "openssl"
OPENVPN = "/usr/sbin/openvpn"
DAYS = 30

_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyAgreement
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyAgreement
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def _check_cn(cn):
    if not cn or not all(c.isalnum() or c in "-_." for c in cn) or cn.startswith("."):
        raise ValueError("lab CNs must be [A-Za-z0-9._-]+, got %r" % (cn,))


@dataclass
class Pki:
    """Paths of one lab PKI. ``clients`` maps CN -> (cert path, key path)."""

    directory: str
    ca_cert: str
    ca_key: str
    server_cert: str
    server_key: str
    tls_crypt_key: str
    clients: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def _cnf(self):
        return os.path.join(self.directory, "openssl.cnf")

    def _issue(self, stem, cn, extensions):
        cert = os.path.join(self.directory, stem + ".crt")
        key = os.path.join(self.directory, stem + ".key")
        _openssl(
            "req", "-x509", "-config", self._cnf, "-extensions", extensions,
            "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", key, "-out", cert, "-days", str(DAYS), "-subj", "/CN=" + cn,
            "-CA", self.ca_cert, "-CAkey", self.ca_key,
        )
        return cert, key

    def client(self, cn):
        """(cert, key) for client CN ``cn``, issuing it now if it does not exist yet."""
        _check_cn(cn)
        with self._lock:
            if cn not in self.clients:
                self.clients[cn] = self._issue("client-" + cn, cn, "client_ext")
            return self.clients[cn]


def _openssl(*args):
    subprocess.run([OPENSSL, *args], check=True, capture_output=True, timeout=30)


def make_pki(directory, client_cns=("alice", "bob", "carol"), server_cn="pocketproxy-lab-server"):
    """Write a fresh CA, server cert, client certs and tls-crypt key into ``directory``."""
    os.makedirs(directory, exist_ok=True)
    cnf = os.path.join(directory, "openssl.cnf")
    with open(cnf, "w") as f:
        f.write(_OPENSSL_CNF)
    ca_cert = os.path.join(directory, "ca.crt")
    ca_key = os.path.join(directory, "ca.key")
    _openssl(
        "req", "-x509", "-config", cnf, "-extensions", "ca_ext",
        "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", ca_key, "-out", ca_cert, "-days", str(DAYS), "-subj", "/CN=pocketproxy-lab-ca",
    )
    tls_crypt_key = os.path.join(directory, "tls-crypt.key")
    subprocess.run([OPENVPN, "--genkey", "tls-crypt", tls_crypt_key], check=True, capture_output=True, timeout=30)
    pki = Pki(directory, ca_cert, ca_key, "", "", tls_crypt_key)
    pki.server_cert, pki.server_key = pki._issue("server", server_cn, "server_ext")
    for cn in client_cns:
        pki.client(cn)
    return pki


_session = None
_session_lock = threading.Lock()


def session_pki():
    """One PKI per process, made on first use and deleted at interpreter exit."""
    global _session
    with _session_lock:
        if _session is None:
            directory = tempfile.mkdtemp(prefix="pplab-pki-")
            atexit.register(shutil.rmtree, directory, True)
            _session = make_pki(directory)
        return _session
