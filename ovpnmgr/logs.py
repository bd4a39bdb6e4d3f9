# -*- test-case-name: tests.unit.test_logs -*-
"""Optional JSON log output (``log.format: json``) for journald, ELK and friends.

Every ``twisted.logger`` event becomes one JSON object on one line::

    {"time": "2026-01-02T03:04:05.678901Z", "level": "info", "namespace": "ovpnmgr.admission.Admission",
     "message": "admitted user alice cid 0 ...", "event": "admitted", "user": "alice", "cid": 0, ...}

``time`` is ISO 8601 UTC, ``message`` the formatted text, and every other
field the event carried is a key of its own, so a log pipeline can filter on
``user``, ``cid``, ``vpn_ip``, ``device``, ``dest`` or ``reason`` without
parsing text. Values JSON cannot hold are ``repr``-ed; a failure adds
``traceback``. Twisted's private ``log_*`` keys and the legacy
``twisted.python.log`` keys are left out.

twistd picks the observer up from the application: :func:`install` sets it as
the Application's ``ILogObserver`` component, which ``AppLogger.start`` uses
unless ``--logger`` names another (the same on Twisted 22.4 and 26.x).
"""

import datetime
import json
import math
import sys

from twisted.logger import ILogObserver, formatEvent
from zope.interface import implementer

#: Keys of the legacy twisted.python.log event dict (they duplicate ``message``/``level``).
_LEGACY_KEYS = frozenset({"message", "isError", "system", "time", "format", "why", "failure", "printed"})
_OWN_KEYS = ("time", "level", "namespace", "message", "traceback")


def _jsonable(value, depth=0):
    """``value`` as plain JSON types; anything else (or too deep) as its ``repr``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if depth < 4:
        if isinstance(value, dict):
            return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
            return [_jsonable(v, depth + 1) for v in items]
    try:
        return repr(value)
    except Exception:
        return "<unrepresentable %s>" % type(value).__name__


def _iso(t):
    if t is None:
        return None
    stamp = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    return stamp.isoformat(timespec="microseconds").replace("+00:00", "Z")


def event_as_json(event):
    """One event as a JSON text (no line end)."""
    record = {
        "time": _iso(event.get("log_time")),
        "level": getattr(event.get("log_level"), "name", None),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = repr(failure)
    legacy = "isError" in event and isinstance(event.get("message"), tuple)  # from twisted.python.log
    for key, value in event.items():
        if key.startswith("log_") or key in record or key in _OWN_KEYS or (legacy and key in _LEGACY_KEYS):
            continue
        record[key] = _jsonable(value)
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


@implementer(ILogObserver)
class JSONLineObserver:
    """Writes each event as one JSON line to a text file object and flushes it."""

    def __init__(self, out):
        """:param out: a text file object (the real stdout, or an opened log file)."""
        self._out = out

    def __call__(self, event):
        """``ILogObserver.__call__``: never raises (an observer that raises loses the log)."""
        try:
            line = event_as_json(event)
        except Exception as e:
            line = json.dumps(
                {"time": _iso(event.get("log_time")), "level": "error", "namespace": __name__,
                 "message": "unloggable event (%s: %s)" % (type(e).__name__, e)}
            )
        try:
            self._out.write(line + "\n")
            self._out.flush()
        except Exception:
            pass  # nowhere left to report it


def observer_for(config):
    """The JSON observer for a :class:`~ovpnmgr.config.LogConfig`, or None for twistd's text log.

    The file is opened (append, line-buffered) now: before twistd drops privileges
    and before it redirects ``sys.stdout`` into the log (which would loop).
    """
    if config.format != "json":
        return None
    if config.file is None:
        return JSONLineObserver(sys.stdout)
    return JSONLineObserver(open(config.file, "a", encoding="utf-8", buffering=1))


def install(application, observer):
    """Make ``observer`` twistd's log observer for ``application`` (an Application, i.e. Componentized).

    :returns: True if it was installed (``application`` takes components).
    """
    set_component = getattr(application, "setComponent", None)
    if observer is None or set_component is None:
        return False
    set_component(ILogObserver, observer)
    return True
