# -*- test-case-name: tests.unit.test_dns_upstream -*-
"""A device's DNS queries shared fairly between the customers on that phone.

Each query carries its ``owner`` (the client's address). A client may hold only its
:func:`fair_share` of the device's queue (beyond it: :class:`~proxy.dnserrors.OverShare` at
once), queued queries are sent round robin across clients (:class:`FairQueue`), and part of
the in-flight window is kept for clients with nothing in flight. So one customer flooding slow
names cannot make a co-tenant's lookups wait or fail. Used by the device resolvers over TCP
and over DoH alike.
"""

from collections import Counter, deque

from proxy.dnserrors import Overloaded, OverShare

__all__ = ["MIN_SHARE", "fair_share", "FairQueue", "admit_fairly"]

MIN_SHARE = 8  # queries any one client may hold on a device, however many share it


def fair_share(capacity, owners, floor=MIN_SHARE):
    """How many queries one client may hold (in flight + queued) on one device.

    ``owners`` counts the clients holding queries there, the asker included. Each may hold
    ``capacity // (owners + 1)``, i.e. as if one more client were about to arrive: a lone
    client gets half of the device's queue, two get a third each, and so on, so there is room
    for a co-tenant who has not asked yet; never less than ``floor`` (a small share that keeps
    ordinary browsing working when many clients share one phone; the device's ``capacity``
    still bounds the total). Over its share a client's extra queries fail at once
    (:class:`OverShare`, a SERVFAIL), and when the device is full, a client under its share
    takes the place of the newest queued query of the client most over its share
    (:meth:`FairQueue.evict`).
    """
    return max(floor, capacity // (owners + 1))


class FairQueue:
    """The queries of one device resolver, per client (``owner``), served round robin.

    Tracks what each owner holds (queued + in flight) and has in flight. :meth:`take` picks
    the next query to send: owners take turns, and each may have at most
    ``(window - reserve) // owners`` in flight, where ``reserve = window // 4`` slots are kept
    for owners that have nothing in flight. A customer who just asked is therefore sent at
    once even when another one keeps the window full of names that answer slowly (or never).
    Pending objects need ``owner``, ``held`` and ``flying`` attributes (managed here).
    """

    def __init__(self, window):
        self.window = window
        self.reserve = window // 4
        self._queues = {}  # owner -> deque of pending; dict order is the round-robin order
        self._held = Counter()
        self._flying = Counter()
        self.queued = 0
        self.flying = 0

    def held(self, owner):
        """Queries ``owner`` has queued or in flight."""
        return self._held.get(owner, 0)

    def owners(self):
        """How many owners hold queries."""
        return len(self._held)

    def admit(self, p):
        """``p`` is now held by its owner (until :meth:`release`)."""
        p.held = True
        self._held[p.owner] += 1

    def release(self, p):
        """``p`` was answered or failed (idempotent)."""
        if p.held:
            p.held = False
            self._held[p.owner] -= 1
            if self._held[p.owner] <= 0:
                del self._held[p.owner]

    def enqueue(self, p, front=False):
        """Queue ``p`` (a retry goes ``front``, ahead of its owner's other queries)."""
        q = self._queues.get(p.owner)
        if q is None:
            q = self._queues[p.owner] = deque()
        if front:
            q.appendleft(p)
        else:
            q.append(p)
        self.queued += 1

    def remove(self, p):
        """Take a queued ``p`` out (its time ran out); False when it was not queued."""
        q = self._queues.get(p.owner)
        if q is None:
            return False
        try:
            q.remove(p)
        except ValueError:
            return False
        self.queued -= 1
        if not q:
            del self._queues[p.owner]
        return True

    def take(self):
        """The next query to send (now counted in flight), or None when none may go now."""
        if not self.queued or self.flying >= self.window:
            return None
        limit = max(1, (self.window - self.reserve) // max(1, len(self._held)))
        general = self.flying < self.window - self.reserve
        for owner in list(self._queues):
            flying = self._flying.get(owner, 0)
            if flying == 0 or (general and flying < limit):
                q = self._queues.pop(owner)
                p = q.popleft()
                if q:
                    self._queues[owner] = q  # to the back of the round
                self.queued -= 1
                self.sent(p)
                return p
        return None

    def sent(self, p):
        """``p`` is in flight."""
        if not p.flying:
            p.flying = True
            self.flying += 1
            self._flying[p.owner] += 1

    def landed(self, p):
        """``p`` is no longer in flight (answered, timed out, or its connection lost; idempotent)."""
        if p.flying:
            p.flying = False
            self.flying -= 1
            self._flying[p.owner] -= 1
            if self._flying[p.owner] <= 0:
                del self._flying[p.owner]

    def evict(self, share):
        """The newest queued query of the owner holding most beyond ``share``, dequeued; or None."""
        over = [o for o in self._queues if self._held.get(o, 0) > share]
        if not over:
            return None
        owner = max(over, key=lambda o: self._held.get(o, 0))
        q = self._queues[owner]
        p = q.pop()
        self.queued -= 1
        if not q:
            del self._queues[owner]
        return p

    def clear(self):
        """Every queued query, dequeued."""
        out = [p for q in self._queues.values() for p in q]
        self._queues = {}
        self.queued = 0
        return out


def admit_fairly(fair, owner, capacity, pending, where):
    """Check that ``owner`` may add a query to a device holding ``pending`` of ``capacity``.

    :returns: None, or the queued query evicted to make room (the caller fails it with
        :class:`OverShare`: its owner holds more than its share).
    :raises OverShare: ``owner`` holds its fair share already.
    :raises Overloaded: the device is full and nobody is over their share.
    """
    held = fair.held(owner)
    share = fair_share(capacity, fair.owners() + (0 if held else 1))
    if held >= share:
        raise OverShare("client holds %d DNS queries via %s (its fair share of %d)" % (held, where, capacity))
    if pending < capacity:
        return None
    victim = fair.evict(share)
    if victim is None:
        raise Overloaded("%d DNS queries pending via %s" % (pending, where))
    return victim
