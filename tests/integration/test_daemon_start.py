"""``twistd -n pocketproxy --config conf/pocketproxy.yaml`` starts, installs its rules and stops cleanly.

Run inside a private namespace (the shipped config installs kernel rules).
In the PyPI leg the venv's own ``twistd`` (the installed plugin) is used.
"""

import contextlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys

from tests.lab.daemon import ROOT
from tests.lab.netns import Namespace, require_root, wait_for

RUN_DIR = pathlib.Path("/run/pocketproxy")  # the shipped config's socket directory (tmpfiles.d in the package)


@contextlib.contextmanager
def shipped_run_dir():
    """/run/pocketproxy for the shipped config's admin socket; removed again if this test made it."""
    created = not RUN_DIR.exists()
    RUN_DIR.mkdir(mode=0o750, exist_ok=True)
    try:
        yield RUN_DIR
    finally:
        if created:
            shutil.rmtree(RUN_DIR, ignore_errors=True)


def _twistd_argv(tmp_path):
    installed = pathlib.Path(sys.executable).parent / "twistd"
    if installed.exists():
        return [str(installed)], {}
    daemon_dir = tmp_path / "plugins" / "twisted" / "plugins"
    daemon_dir.mkdir(parents=True)
    (daemon_dir / "pocketproxy_plugin.py").write_text((ROOT / "twistd-plugins" / "pocketproxy_plugin.py").read_text())
    code = "from twisted.scripts.twistd import run; run()"
    return [sys.executable, "-c", code], {"PYTHONPATH": "%s:%s" % (tmp_path / "plugins", ROOT)}


def test_shipped_config_starts_and_stops_cleanly(tmp_path):
    """The example config starts the daemon: rules installed, management retried, clean exit on SIGTERM."""
    require_root()
    argv, env = _twistd_argv(tmp_path)
    log = tmp_path / "twistd.log"
    ns = Namespace("run")
    with contextlib.ExitStack() as stack:
        stack.callback(ns.destroy)
        stack.enter_context(shipped_run_dir())
        proc = ns.popen(
            argv + ["--nodaemon", "--pidfile=", "--logfile=%s" % log, "pocketproxy", "--config", str(ROOT / "conf" / "pocketproxy.yaml")],
            env=dict(os.environ, **env),
            cwd=tmp_path,
        )
        text = lambda: log.read_text() if log.exists() else ""
        wait_for(lambda: "cannot reach OpenVPN management at unix:/run/pocketproxy/openvpn-mgmt.sock" in text() or proc.poll() is not None, 30, what="management retry")
        assert proc.poll() is None, text()
        assert "kernel base rules installed" in text()
        assert "admin socket listening on /run/pocketproxy/admin.sock" in text()
        assert "transparent proxy listening on 0.0.0.0:12345 (redirect" in text()
        assert "transparent proxy listening on :::12345 (redirect" in text()
        listening = ns.run("ss", "-Htln", "sport", "= :12345").stdout
        assert "0.0.0.0:12345" in listening and "[::]:12345" in listening
        assert ns.run("iptables", "-t", "nat", "-S", "PREROUTING").stdout.splitlines()[1] == "-A PREROUTING -i tun+ -j POCKETPROXY"
        # twistd re-raises the shutdown signal after a clean shutdown, so -SIGTERM is its clean exit.
        assert ns.stop(proc, sig=signal.SIGTERM) in (0, -signal.SIGTERM)
        assert "Received SIGTERM, shutting down." in text() and "Server Shut Down." in text()
        assert "Traceback" not in text()
        assert not (RUN_DIR / "admin.sock").exists()  # removed at stop


def test_busy_proxy_port_stops_startup_with_one_clear_line(tmp_path):
    """If the proxy port cannot be bound, twistd exits non-zero before attaching to OpenVPN."""
    require_root()
    argv, env = _twistd_argv(tmp_path)
    ns = Namespace("run")
    with contextlib.ExitStack() as stack:
        stack.callback(ns.destroy)
        stack.enter_context(shipped_run_dir())
        holder = ns.popen(
            [sys.executable, "-c", "import socket,sys; s=socket.socket(); s.bind(('0.0.0.0',12345)); s.listen(); "
             "print('bound', flush=True); sys.stdin.read()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        assert holder.stdout.readline().strip() == b"bound"
        proc = ns.popen(
            argv + ["--nodaemon", "--pidfile=", "--logfile=%s" % (tmp_path / "log"), "pocketproxy", "--config", str(ROOT / "conf" / "pocketproxy.yaml")],
            env=dict(os.environ, **env), cwd=tmp_path,
        )
        proc.communicate(timeout=30)
        log = (tmp_path / "log").read_text()
        assert proc.returncode == 1, log
        assert "pocketproxy: cannot listen on 0.0.0.0 port 12345: [Errno 98] Address already in use; exiting" in log
        assert "-A PREROUTING -i tun+ -j POCKETPROXY" not in ns.run("iptables", "-t", "nat", "-S").stdout


def test_pip_installed_twistd_lists_plugin():
    """Where pocketproxy is pip-installed (the PyPI leg), twistd --help lists it."""
    installed = pathlib.Path(sys.executable).parent / "twistd"
    if not installed.exists():
        import pytest

        pytest.skip("not a pip-installed environment (Debian leg runs from the checkout)")
    out = subprocess.run([str(installed), "--help"], capture_output=True, text=True, timeout=60).stdout
    assert any(line.split()[:1] == ["pocketproxy"] for line in out.splitlines()), out
