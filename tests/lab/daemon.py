"""Run the real pocketproxy daemon under twistd inside a lab namespace.

The daemon runs from the checkout: a private ``twisted/plugins`` directory
holding a copy of the dropin goes on PYTHONPATH (editable installs do not
register twistd plugins), so the same code runs on Debian's Python and in the
PyPI venv (``sys.executable``).
"""

import os
import pathlib
import signal
import sys

import yaml

from ovpnmgr.directory import hash_password
from tests.lab.netns import read_log, wait_log

ROOT = pathlib.Path(__file__).resolve().parents[2]
FAST_HASH = dict(n=1024, r=8, p=1)  # lab users: quick to verify, same code path


# The lab's first device (tests.lab.world: device 0 runs tinyproxy with ``BasicAuth dev devpw``).
DEFAULT_DEVICES = {"phone": "http://dev:devpw@192.168.255.2:8080"}


def users_yaml(users, devices=None):
    """users: {name: {"password": pw | None, "cn": cn | None, "device": name, "address": ip,
    "private_networks": "allow", "tunnel": "split"}} (the last two optional);
    devices: {name: upstream URL, or the device's whole entry such as {"upstream": url, "dns": "host"}}
    (default :data:`DEFAULT_DEVICES`)."""
    devices = devices or DEFAULT_DEVICES
    entries = {name: dict(spec) if isinstance(spec, dict) else {"upstream": spec} for name, spec in devices.items()}
    out = {"devices": entries, "users": {}}
    for name, spec in users.items():
        entry = {"device": spec.get("device", next(iter(devices)))}
        if spec.get("password"):
            entry["password"] = hash_password(spec["password"], **FAST_HASH)
        if spec.get("cn"):
            entry["common_name"] = spec["cn"]
        if spec.get("address"):
            entry["address"] = spec["address"]
        for key in ("private_networks", "tunnel"):
            if spec.get(key):
                entry[key] = spec[key]
        out["users"][name] = entry
    return yaml.safe_dump(out)


class Daemon:
    """One ``twistd -n pocketproxy`` process in namespace ``ns`` with its own config and log."""

    def __init__(
        self, ns, workdir, mgmt_socket, users, subnet="10.9.0.0/24", server_address="10.9.0.1", devices=None, **sections
    ):
        """``sections`` are merged into the YAML config's sections (e.g. ``openvpn={"push": [...]}``,
        ``proxy={"sniff_budget": 2.0}``); ``devices`` as for :func:`users_yaml`."""
        self.ns = ns
        self.dir = pathlib.Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "pocketproxy.log"
        self.config_path = self.dir / "pocketproxy.yaml"
        self.users_path = self.dir / "users.yaml"
        self.proc = None
        plugins = self.dir / "plugins" / "twisted" / "plugins"
        plugins.mkdir(parents=True, exist_ok=True)
        (plugins / "pocketproxy_plugin.py").write_text((ROOT / "twistd-plugins" / "pocketproxy_plugin.py").read_text())
        self.users_path.write_text(users_yaml(users, devices))
        config = {
            "openvpn": {
                "management": "unix:%s" % mgmt_socket,
                "subnet": subnet,
                "server_address": server_address,
                "reconnect_initial": 0.2,
                "reconnect_max": 2,
            },
            "directory": {"file": str(self.users_path)},
        }
        for name, values in sections.items():
            config.setdefault(name, {}).update(values)
        self.config_path.write_text(yaml.safe_dump(config))

    def argv(self):
        return [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon",
            "--pidfile=",
            "--logfile=%s" % self.log_path,
            "pocketproxy",
            "--config",
            str(self.config_path),
        ]

    def start(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = "%s:%s" % (self.dir / "plugins", ROOT)
        with open(self.dir / "stdout.txt", "ab") as out, open(self.dir / "stderr.txt", "ab") as err:
            self.proc = self.ns.popen(self.argv(), env=env, stdout=out, stderr=err)
        return self

    def kill(self):
        """SIGKILL: no cleanup runs, like a crash."""
        self.ns.stop(self.proc, sig=signal.SIGKILL)

    def stop(self):
        return self.ns.stop(self.proc)

    def log_text(self):
        return read_log(self.log_path)

    def log_mark(self):
        return len(self.log_text())

    def wait_log(self, regex, timeout=20, since=0):
        """Wait for ``regex`` in the daemon log after offset ``since``; returns the match."""

        def exited():
            if self.proc is not None and self.proc.poll() is not None:
                return "daemon exited (%s)" % self.proc.returncode
            return None

        return wait_log(self.log_path, regex, timeout, since, exited, self.tail)

    def tail(self, lines=40):
        text = self.log_text().splitlines()[-lines:]
        try:
            text += (self.dir / "stderr.txt").read_text(errors="replace").splitlines()[-10:]
        except FileNotFoundError:
            pass
        return "\n".join(text)
