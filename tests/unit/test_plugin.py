"""The twistd dropin: discoverable, lazy, and building a service from a config."""

import importlib.util
import pathlib
import subprocess
import sys

from twisted.application.service import IService, IServiceMaker
from twisted.plugin import IPlugin

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load_dropin():
    spec = importlib.util.spec_from_file_location("pocketproxy_plugin", ROOT / "twistd-plugins" / "pocketproxy_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.pocketproxy


def test_dropin_provides_service_maker():
    """The dropin is an IPlugin/IServiceMaker named pocketproxy."""
    maker = _load_dropin()
    assert IPlugin.providedBy(maker) and IServiceMaker.providedBy(maker)
    assert maker.tapname == "pocketproxy"


def test_make_service_from_shipped_config():
    """Options load conf/pocketproxy.yaml and makeService returns an unstarted IService."""
    maker = _load_dropin()
    options = maker.options()
    options.parseOptions(["--config", str(ROOT / "conf" / "pocketproxy.yaml")])
    svc = maker.makeService(options)
    assert IService.providedBy(svc)
    assert not svc.running


def test_bad_config_exits_nonzero_with_one_clear_line(tmp_path):
    """twistd refuses a bad config with a message naming file, key and problem, exit code 2."""
    bad = tmp_path / "bad.yaml"
    (tmp_path / "users.yaml").write_text("devices: {}\nusers: {}\n")
    bad.write_text(
        "openvpn:\n  management: unix:/x.sock\n  subnet: 10.9.0.0/33\n  server_address: 10.9.0.1\n"
        "directory:\n  file: users.yaml\n"
    )
    code = (
        "import sys; sys.argv=['twistd','-n','--pidfile=','pocketproxy','--config',%r];"
        "from twisted.scripts.twistd import run; run()" % str(bad)
    )
    devpath = tmp_path / "dev" / "twisted" / "plugins"
    devpath.mkdir(parents=True)
    (devpath / "pocketproxy_plugin.py").write_text((ROOT / "twistd-plugins" / "pocketproxy_plugin.py").read_text())
    env = {"PYTHONPATH": "%s:%s" % (tmp_path / "dev", ROOT), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert "%s: openvpn.subnet: not an IPv4 network" % bad in proc.stderr


def test_ctl_hash_password(tmp_path):
    """pocketproxyctl hash-password prints a hash that verifies."""
    from ovpnmgr.directory import verify_password

    proc = subprocess.run(
        [sys.executable, "-m", "ovpnmgr.ctl", "hash-password", "--stdin"],
        input="hunter2\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert verify_password("hunter2", proc.stdout.strip())
