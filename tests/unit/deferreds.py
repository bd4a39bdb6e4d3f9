"""Synchronous inspection of already-fired Deferreds, shared by the unit tests."""

from twisted.python.failure import Failure


def result_of(d):
    """The result of a fired Deferred (raising its failure's exception)."""
    box = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def failure_of(d, *types):
    """The Failure of a fired, failed Deferred, checked against ``types``."""
    box = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    assert isinstance(box[0], Failure), "Deferred succeeded with %r" % (box[0],)
    assert box[0].check(*types), box[0]
    return box[0]
