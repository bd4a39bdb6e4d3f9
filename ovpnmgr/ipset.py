# -*- test-case-name: tests.unit.test_ipset -*-
"""A tiny adapter over pyroute2's synchronous ``IPSet`` for one ``hash:ip`` set.

:class:`NetlinkIPSet` is what the daemon uses: ``ensure()`` the set exists,
``add``/``delete`` one IPv4 address (both idempotent), ``members()``,
``flush()``. Every failure is an :class:`IPSetError` with a human message
("set is full (maxelem reached)") instead of pyroute2's "Unknown error 4352".

:class:`FakeIPSet` has the same interface, keeps members in memory and can be
told to fail; tests of the firewall and controller use it.

Works with pyroute2 0.7.2 (Debian 12) and 0.9.x (PyPI): one long-lived
``IPSet`` socket, opened lazily and used only from the thread that opened it
(the reactor thread); dump results are materialised with ``list()`` because
0.9 returns lazy generators that raise only while being iterated.
"""

import errno as _errno
import ipaddress
import os
import socket
import threading

from twisted.logger import Logger

# Kernel ipset error codes (include/uapi/linux/netfilter/ipset/ip_set.h and
# ip_set_hash.h); pyroute2 0.7.2/0.9.x have no message for the hash-specific ones.
IPSET_ERR_PROTOCOL = 4097
IPSET_ERR_FIND_TYPE = 4098
IPSET_ERR_MAX_SETS = 4099
IPSET_ERR_BUSY = 4100
IPSET_ERR_EXIST_SETNAME2 = 4101
IPSET_ERR_TYPE_MISMATCH = 4102
IPSET_ERR_EXIST = 4103
IPSET_ERR_INVALID_CIDR = 4104
IPSET_ERR_INVALID_NETMASK = 4105
IPSET_ERR_INVALID_FAMILY = 4106
IPSET_ERR_TIMEOUT = 4107
IPSET_ERR_REFERENCED = 4108
IPSET_ERR_IPADDR_IPV4 = 4109
IPSET_ERR_IPADDR_IPV6 = 4110
IPSET_ERR_COUNTER = 4111
IPSET_ERR_COMMENT = 4112
IPSET_ERR_INVALID_MARKMASK = 4113
IPSET_ERR_SKBINFO = 4114
IPSET_ERR_TYPE_SPECIFIC = 4352
IPSET_ERR_HASH_FULL = 4352
IPSET_ERR_HASH_ELEM = 4353

_MESSAGES = {
    _errno.ENOENT: "set does not exist",
    _errno.EPERM: "operation not permitted (CAP_NET_ADMIN is needed)",
    _errno.EPROTONOSUPPORT: "ipset is not supported by the kernel (ip_set module missing?)",
    IPSET_ERR_PROTOCOL: "kernel ipset protocol error",
    IPSET_ERR_FIND_TYPE: "set type not supported by the kernel",
    IPSET_ERR_MAX_SETS: "the kernel's maximal number of sets is reached",
    IPSET_ERR_BUSY: "set is in use by a kernel component (e.g. an iptables rule)",
    IPSET_ERR_EXIST_SETNAME2: "the second set name is already in use",
    IPSET_ERR_TYPE_MISMATCH: "set types do not match",
    IPSET_ERR_EXIST: "element already exists / does not exist",
    IPSET_ERR_INVALID_CIDR: "invalid CIDR value",
    IPSET_ERR_INVALID_NETMASK: "invalid netmask value",
    IPSET_ERR_INVALID_FAMILY: "address family not supported by the set type",
    IPSET_ERR_TIMEOUT: "timeout cannot be used: set was created without timeout support",
    IPSET_ERR_REFERENCED: "set is referenced by another component",
    IPSET_ERR_IPADDR_IPV4: "an IPv4 address was expected",
    IPSET_ERR_IPADDR_IPV6: "an IPv6 address was expected",
    IPSET_ERR_COUNTER: "counters cannot be used: set was created without counter support",
    IPSET_ERR_COMMENT: "comment string is too long",
    IPSET_ERR_INVALID_MARKMASK: "invalid markmask value",
    IPSET_ERR_SKBINFO: "skbinfo cannot be used: set was created without skbinfo support",
    IPSET_ERR_HASH_FULL: "set is full (maxelem reached)",
    IPSET_ERR_HASH_ELEM: "a zero-valued element cannot be stored",
}
# Messages that depend on the operation.
_OP_MESSAGES = {
    ("create", _errno.EEXIST): "a set with this name already exists with a different type or options",
    ("add", IPSET_ERR_EXIST): "element is already in the set",
    ("delete", IPSET_ERR_EXIST): "element is not in the set",
}


def describe_error(operation, code):
    """A human message for kernel/netlink error ``code`` during ``operation``."""
    message = _OP_MESSAGES.get((operation, code)) or _MESSAGES.get(code)
    if message is not None:
        return message
    if 0 < code < 4096:
        return os.strerror(code)
    return "ipset error code %d" % code


class IPSetError(Exception):
    """An ipset operation failed.

    :ivar operation: ``"create"``, ``"add"``, ``"delete"``, ``"list"`` or ``"flush"``.
    :ivar set_name: the set's name.
    :ivar ip: the address involved, or ``None``.
    :ivar errno: the kernel error code (an errno or an ``IPSET_ERR_*`` code).
    :ivar message: the human reason, e.g. ``"set is full (maxelem reached)"``.
    """

    def __init__(self, operation, set_name, ip, errno, message=None):
        self.operation = operation
        self.set_name = set_name
        self.ip = ip
        self.errno = errno
        self.message = message if message is not None else describe_error(operation, errno)
        super().__init__(operation, set_name, ip, errno, self.message)

    def __str__(self):
        what = "ipset %s" % self.operation
        if self.ip is not None:
            what += " %s" % self.ip
        return "%s on set %r failed: %s (error %s)" % (what, self.set_name, self.message, self.errno)


def _ipv4(ip):
    """``ip`` as an IPv4Address; ``ValueError`` for anything else."""
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    return ipaddress.IPv4Address(ip)


class NetlinkIPSet:
    """One ``hash:ip`` (family inet) set, managed over netlink with pyroute2.

    Synchronous: every call is one netlink round trip (microseconds). Use an
    instance from one thread only (the reactor thread); it opens its socket
    lazily on first use and re-opens it after a socket-level failure.

    :param name: the set name (``FirewallConfig.ipset``).
    :param maxelem: the maximum number of members, used when creating the set.
    :param ipset_factory: callable returning a pyroute2 ``IPSet``-like object
        (default ``pyroute2.IPSet``); for tests.
    """

    _log = Logger()

    def __init__(self, name, maxelem=65536, ipset_factory=None):
        self.name = name
        self.maxelem = maxelem
        self._factory = ipset_factory
        self._sock = None
        self._thread = None

    # -- plumbing ---------------------------------------------------------

    def _netlink_error(self):
        from pyroute2 import NetlinkError

        return NetlinkError

    def _open(self):
        if self._sock is not None:
            if threading.get_ident() != self._thread:
                raise RuntimeError("NetlinkIPSet used from a second thread; use it from the reactor thread only")
            return self._sock
        factory = self._factory
        if factory is None:
            from pyroute2 import IPSet

            factory = IPSet
        self._sock = factory()
        self._thread = threading.get_ident()
        return self._sock

    def close(self):
        """Close the netlink socket (re-opened on next use)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except Exception:
                pass

    def _call(self, operation, ip, fn):
        """Run ``fn(sock)``; map failures to :class:`IPSetError`."""
        NetlinkError = self._netlink_error()
        try:
            return fn(self._open())
        except NetlinkError as e:
            raise IPSetError(operation, self.name, ip, e.code) from e
        except OSError as e:
            # Socket-level trouble: start over with a fresh socket next time.
            self.close()
            raise IPSetError(operation, self.name, ip, e.errno or 0, e.strerror or str(e)) from e

    # -- the interface ----------------------------------------------------

    def ensure(self):
        """Create the set as ``hash:ip family inet maxelem N`` unless it exists.

        An existing set of the same type is accepted even if its options
        (maxelem, hashsize, counters...) differ; that is logged. A set of
        another type or family is an :class:`IPSetError` (EEXIST).
        """

        def create(sock):
            sock.create(self.name, stype="hash:ip", family=socket.AF_INET, exclusive=False, maxelem=self.maxelem)

        try:
            self._call("create", None, create)
        except IPSetError as e:
            if e.errno != _errno.EEXIST:
                raise
            headers = self._call("create", None, lambda sock: list(sock.list(self.name)))
            stype = family = maxelem = None
            for msg in headers:
                stype = msg.get_attr("IPSET_ATTR_TYPENAME")
                family = msg.get_attr("IPSET_ATTR_FAMILY")
                data = msg.get_attr("IPSET_ATTR_DATA")
                if data is not None:
                    maxelem = data.get_attr("IPSET_ATTR_MAXELEM")
                break
            if stype != "hash:ip" or family != socket.AF_INET:
                fam = {socket.AF_INET: "inet", socket.AF_INET6: "inet6"}.get(family, family)
                raise IPSetError(
                    "create",
                    self.name,
                    None,
                    _errno.EEXIST,
                    "a set with this name already exists as %s family %s (expected hash:ip family inet);"
                    " destroy it or choose another firewall.ipset name" % (stype, fam),
                )
            self._log.warn(
                "ipset {name} already exists as hash:ip with other options (maxelem {actual}, configured {wanted});"
                " keeping it",
                name=self.name,
                actual=maxelem,
                wanted=self.maxelem,
            )

    def add(self, ip):
        """Add ``ip``; already present is fine."""
        ip = _ipv4(ip)
        self._call("add", ip, lambda sock: sock.add(self.name, str(ip), family=socket.AF_INET, exclusive=False))

    def delete(self, ip):
        """Remove ``ip``; absent is fine."""
        ip = _ipv4(ip)
        self._call("delete", ip, lambda sock: sock.delete(self.name, str(ip), family=socket.AF_INET, exclusive=False))

    def members(self):
        """The set's current members as a ``set`` of IPv4Address."""
        messages = self._call("list", None, lambda sock: list(sock.list(self.name)))
        found = set()
        for msg in messages:
            adt = msg.get_attr("IPSET_ATTR_ADT")
            if adt is None:
                continue
            for data in adt.get_attrs("IPSET_ATTR_DATA"):
                ip_from = data.get_attr("IPSET_ATTR_IP_FROM")
                if ip_from is None:
                    continue
                addr = ip_from.get_attr("IPSET_ATTR_IPADDR_IPV4")
                if addr is not None:
                    found.add(ipaddress.IPv4Address(addr))
        return found

    def flush(self):
        """Remove all members."""
        self._call("flush", None, lambda sock: sock.flush(self.name))


class FakeIPSet:
    """In-memory stand-in for :class:`NetlinkIPSet`, with failure injection.

    Members live in :attr:`content` (a set of IPv4Address); :attr:`exists`
    says whether ``ensure()`` has created the set (operations on a missing
    set fail with ENOENT like the kernel, unless ``exists=True`` is passed).
    Adding beyond ``maxelem`` fails with "set is full". Every call is
    appended to :attr:`calls` as ``(operation, ip_or_None)``.

    Failure injection, per operation ``ensure``/``add``/``delete``/``members``/``flush``:

    - ``FakeIPSet(fail_add=True)``: every ``add`` raises an :class:`IPSetError`
      (a generic EPERM one); ``fail_add=IPSetError(...)`` raises that one;
      same for ``fail_ensure``, ``fail_delete``, ``fail_members``, ``fail_flush``
      (also settable as attributes later);
    - ``fake.fail_next_add = IPSetError(...)`` (or ``True``): only the next
      ``add`` raises it, then the attribute resets to ``None``; likewise
      ``fail_next_delete`` etc.

    A failing call changes nothing.
    """

    _OPS = ("ensure", "add", "delete", "members", "flush")

    def __init__(self, name="pocketproxy-clients", maxelem=65536, members=(), exists=True, **failures):
        self.name = name
        self.maxelem = maxelem
        self.content = {_ipv4(ip) for ip in members}
        self.exists = exists
        self.calls = []
        for op in self._OPS:
            setattr(self, "fail_" + op, failures.pop("fail_" + op, None))
            setattr(self, "fail_next_" + op, failures.pop("fail_next_" + op, None))
        if failures:
            raise TypeError("unknown FakeIPSet arguments: %s" % ", ".join(sorted(failures)))

    def _check(self, op, ip):
        self.calls.append((op, ip))
        operation = {"ensure": "create", "members": "list"}.get(op, op)
        injected = getattr(self, "fail_next_" + op)
        if injected is not None and injected is not False:
            setattr(self, "fail_next_" + op, None)
        else:
            injected = getattr(self, "fail_" + op)
        if injected is True:
            raise IPSetError(operation, self.name, ip, _errno.EPERM, "injected failure")
        if injected:
            raise injected
        if op != "ensure" and not self.exists:
            raise IPSetError(operation, self.name, ip, _errno.ENOENT)

    def ensure(self):
        """Create the (in-memory) set if needed."""
        self._check("ensure", None)
        self.exists = True

    def add(self, ip):
        """Add ``ip``; already present is fine; full set raises."""
        ip = _ipv4(ip)
        self._check("add", ip)
        if ip not in self.content and len(self.content) >= self.maxelem:
            raise IPSetError("add", self.name, ip, IPSET_ERR_HASH_FULL)
        self.content.add(ip)

    def delete(self, ip):
        """Remove ``ip``; absent is fine."""
        ip = _ipv4(ip)
        self._check("delete", ip)
        self.content.discard(ip)

    def members(self):
        """A copy of the members."""
        self._check("members", None)
        return set(self.content)

    def flush(self):
        """Remove all members."""
        self._check("flush", None)
        self.content.clear()

    def close(self):
        """Nothing to close."""
