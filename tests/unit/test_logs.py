"""JSON log lines, the twistd hook (Application ILogObserver component), and structured fields."""

import io
import json
import pathlib
import subprocess
import sys
import textwrap

from twisted.application import service
from twisted.logger import ILogObserver, LogLevel, Logger, LogPublisher, globalLogPublisher
from twisted.python.failure import Failure

from ovpnmgr.config import LogConfig
from ovpnmgr.logs import JSONLineObserver, event_as_json, install, observer_for
from tests.unit.controller_world import World

ROOT = pathlib.Path(__file__).resolve().parents[2]


def emit(**kw):
    out = io.StringIO()
    publisher = LogPublisher(JSONLineObserver(out))
    log = Logger(namespace="ovpnmgr.test", observer=publisher)
    return log, out


def test_one_json_object_per_line_with_time_level_namespace_message_and_fields():
    """Each event is one line: ISO 8601 UTC time, level, namespace, formatted message, fields as keys."""
    log, out = emit()
    log.info("admitted user {user} cid {cid}", user="alice", cid=3, vpn_ip="10.9.0.2", event="admitted")
    log.warn("odd {thing}", thing=object(), nested={1: {"a", "b"}}, ratio=float("nan"))
    lines = out.getvalue().split("\n")
    assert lines[-1] == "" and len(lines) == 3
    first = json.loads(lines[0])
    assert first["level"] == "info" and first["namespace"] == "ovpnmgr.test"
    assert first["message"] == "admitted user alice cid 3"
    assert (first["user"], first["cid"], first["vpn_ip"], first["event"]) == ("alice", 3, "10.9.0.2", "admitted")
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert not any(k.startswith("log_") for k in first)
    second = json.loads(lines[1])
    assert second["level"] == "warn" and second["thing"].startswith("<object object at")
    assert second["nested"] == {"1": ["'a'", "'b'"]} or second["nested"] == {"1": ["a", "b"]}
    assert second["ratio"] == "nan"


def test_failures_carry_the_traceback():
    """log.failure → level critical, message, and the traceback text."""
    log, out = emit()
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("it broke for {user}", Failure(), user="bob")
    record = json.loads(out.getvalue())
    assert record["level"] == "critical" and record["message"].startswith("it broke for bob")
    assert "ZeroDivisionError" in record["traceback"] and "Traceback" in record["traceback"]


def test_legacy_events_keep_only_the_message():
    """twisted.python.log events (twistd's own lines) map to message/level without legacy keys."""
    from twisted.python import log as legacy

    out = io.StringIO()
    publisher = LogPublisher(JSONLineObserver(out))
    legacy.LogPublisher(observerPublisher=publisher, publishPublisher=publisher).msg("hello", "world")
    record = json.loads(out.getvalue())
    assert record["message"] == "hello world" and record["level"] == "info"
    assert not {"isError", "system", "format"} & set(record)


def test_an_unserialisable_event_still_yields_a_line():
    """A broken event never raises out of the observer."""
    out = io.StringIO()

    class Bad:
        def __repr__(self):
            raise RuntimeError("no repr")

    JSONLineObserver(out)({"log_format": "x", "log_level": LogLevel.info, "log_time": 1.0, "bad": Bad()})
    assert json.loads(out.getvalue())["bad"] == "<unrepresentable Bad>"


def test_observer_for_config(tmp_path):
    """text → None (twistd's own log); json → stdout, or the configured file in append mode."""
    assert observer_for(LogConfig()) is None
    assert isinstance(observer_for(LogConfig(format="json")), JSONLineObserver)
    path = tmp_path / "pp.jsonl"
    path.write_text("old\n")
    obs = observer_for(LogConfig(format="json", file=path))
    obs({"log_format": "hi", "log_level": LogLevel.info, "log_time": 0.0, "log_namespace": "n"})
    assert path.read_text().startswith("old\n{") and json.loads(path.read_text().split("\n")[1])["message"] == "hi"


def test_installed_as_the_applications_log_observer():
    """PocketproxyService gives twistd's Application its observer while being parented, before logging starts."""
    from ovpnmgr.tap import PocketproxyService

    app = service.Application("pocketproxy")
    top = PocketproxyService()
    top.log_observer = JSONLineObserver(io.StringIO())
    top.setServiceParent(app)
    assert app.getComponent(ILogObserver, None) is top.log_observer
    assert top.parent is service.IServiceCollection(app)
    plain = service.Application("pocketproxy")
    PocketproxyService().setServiceParent(plain)
    assert plain.getComponent(ILogObserver, None) is None
    assert not install(object(), top.log_observer)


_APPLOGGER = textwrap.dedent(
    """
    import io, json, sys
    from twisted.application import app, service
    from twisted.logger import Logger
    from ovpnmgr.logs import JSONLineObserver
    from ovpnmgr.tap import PocketproxyService

    captured = []
    def other():  # what --logger=dotted.name would build
        return captured.append
    out = io.StringIO()
    application = service.Application("pocketproxy")
    top = PocketproxyService()
    top.log_observer = JSONLineObserver(out)
    top.setServiceParent(application)
    options = {"logger": other} if sys.argv[1] == "logger" else {"nodaemon": True, "logfile": "-"}
    logger = app.AppLogger(options)
    logger.start(application)
    Logger(namespace="t").info("hello {user}", user="alice")
    logger.stop()
    json_lines = [json.loads(l) for l in out.getvalue().splitlines()]
    sys.__stdout__.write(json.dumps({
        "json": [l["message"] for l in json_lines if l["namespace"] == "t"],
        "other": [e.get("user") for e in captured if e.get("log_namespace") == "t"],
    }) + "\\n")
    sys.__stdout__.flush()  # twistd's logging may leave stdout redirected; flush explicitly
    """
)


def test_twistd_applogger_uses_it_unless_a_logger_is_given():
    """twistd's AppLogger (run in a child: it takes over global logging) logs to our observer by
    default, and to the --logger factory's observer when one is given."""

    def run(mode):
        out = subprocess.run(
            [sys.executable, "-c", _APPLOGGER, mode], capture_output=True, text=True, timeout=60, cwd=ROOT
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert run("default") == {"json": ["hello alice"], "other": []}
    assert run("logger") == {"json": [], "other": ["alice"]}


# --- the controller's audit lines ---------------------------------------------------------


def audit(events, name):
    return [e for e in events if e.get("event") == name]


def test_admission_denial_and_disconnect_are_one_event_each_with_fields():
    """admitted / denied / disconnected: one event each, carrying user, cid, vpn_ip, device, reason as keys;
    the CONNECT password is in no event."""
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        w = World()
        w.connect(0, password="pw")
        session = w.controller.sessions[(w.controller.epoch, 0)]
        w.script.notify_established(0, {"ifconfig_pool_remote_ip": str(session.address)})
        w.connect(1, user="bob", password="wrong-PASSWORD-xyz")
        w.script.notify_disconnect(0, {"bytes_received": "10", "bytes_sent": "20"})
    finally:
        globalLogPublisher.removeObserver(events.append)
    [admitted] = audit(events, "admitted")
    assert {k: admitted[k] for k in ("user", "cid", "vpn_ip", "device")} == {
        "user": "alice", "cid": 0, "vpn_ip": "10.9.0.2", "device": "p1"
    }
    [denied] = audit(events, "denied")
    assert (denied["user"], denied["cid"], denied["reason"], denied["kind"]) == (
        "bob", 1, "wrong password for user bob", "final"
    )
    assert "vpn_ip" in denied and "device" in denied
    [gone] = audit(events, "disconnected")
    assert {k: gone[k] for k in ("user", "cid", "vpn_ip", "device", "bytes_in", "bytes_out")} == {
        "user": "alice", "cid": 0, "vpn_ip": "10.9.0.2", "device": "p1", "bytes_in": 10, "bytes_out": 20
    }
    everything = "\n".join(event_as_json(e) for e in events)
    assert "wrong-PASSWORD-xyz" not in everything and '"pw"' not in everything
