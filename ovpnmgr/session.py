# -*- test-case-name: tests.unit.test_controller -*-
"""One OpenVPN client instance, its one explicit state, and how it is named and answered.

A session is keyed by (epoch, CID): OpenVPN restarts CIDs at 0 after a SIGHUP
while the management socket stays up. What a session holds (address, kernel set
member, mapping) is the :class:`~ovpnmgr.ledger.Ledger`'s to change; the session
only records the address the ledger gave it.
"""

import enum

from ovpnmgr import tunnel
from proxy.destinations import ClientPolicy
from proxy.mappings import Route


class State(enum.Enum):
    """Where a session is in its life; ``ENDED`` is final (denied, disconnected, replaced, killed)."""

    AUTHENTICATING = "authenticating"  # CONNECT seen, directory asked
    AUTHORIZING = "authorizing"  # client-auth sent, no reply yet
    AUTHORIZED = "authorized"  # client-auth SUCCESS
    ESTABLISHED = "established"
    ENDED = "ended"


class TemporaryFailure(Exception):
    """An admission step failed in a way that may pass; the client is told to retry."""


def client_reason(temporary, backoff, shown=None):
    """The reason a denied client is shown: TEMP (retry after ``backoff`` s) or final.

    :param shown: what the customer reads after ``TEMP[...]:`` (e.g. ``device offline``);
        None: a generic text that reveals nothing of the server's state.
    """
    if temporary:
        return "TEMP[backoff %d,advance no]: %s" % (backoff, shown or "temporary failure, retrying")
    return "authentication failed"


class Session:
    """One OpenVPN client instance (one CID in one epoch) and what it holds."""

    def __init__(self, epoch, cid, kid, env, started):
        self.epoch = epoch
        self.cid = cid
        self.kid = kid
        self.username = env.get("username", "")
        self.common_name = env.get("common_name", "")
        self.real_address = "%s:%s" % (env.get("untrusted_ip", ""), env.get("untrusted_port", ""))
        self.peer = tunnel.Peer.from_env(env)  # what to push depends on the client's version and platform
        self.started = started
        self.state = State.AUTHENTICATING
        self.user = None
        self.address = None  # written by the Ledger only
        self.connected_since = None
        self.admission_counted = False  # metrics: count client-auth SUCCESS once per session
        self.took_from = None  # the live session of the same user whose static address this one took
        self.pending_reauth = None  # a REAUTH event not yet answered (re-run after a management reconnect)
        self.bytes_in = None  # tunnel bytes from the client (OpenVPN's >BYTECOUNT_CLI), None until reported
        self.bytes_out = None  # tunnel bytes to the client

    @property
    def key(self):
        return (self.epoch, self.cid)

    @property
    def ended(self):
        return self.state is State.ENDED

    @property
    def name(self):
        """Who this is, the one way logs and tables name it: the users-file name once known,
        else the username sent, else the certificate CN (a certificate-only client)."""
        return self.user.name if self.user is not None else (self.username or self.common_name)

    @property
    def log_fields(self):
        """Who this is, as structured log fields (the proxy adds them to its events for this client)."""
        return {
            "user": self.name,
            "cid": self.cid,
            "vpn_ip": str(self.address) if self.address is not None else None,
            "device": self.user.device.name if self.user is not None else None,
        }

    def route(self):
        """The proxy's :class:`~proxy.mappings.Route` for this session's user and device: what the
        proxy and DNS service read per connection and query (rebuilt when a reload changes them)."""
        user = self.user
        policy = ClientPolicy(allow_private=user.private_networks == "allow", device_limit=user.device.max_clients)
        return Route(
            upstream=user.device.upstream,
            device=user.device.name,
            dns=user.device.dns,
            policy=policy,
            log_fields=self.log_fields,
        )

    def __repr__(self):
        return "<Session epoch=%d cid=%d user=%s ip=%s %s>" % (self.epoch, self.cid, self.name, self.address, self.state.value)
