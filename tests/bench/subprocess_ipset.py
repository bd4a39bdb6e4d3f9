"""The comparison peer: an ipset adapter that forks ``ipset`` once per change.

This is what the common script-based setup does: OpenVPN's
``client-connect``/``client-disconnect`` script runs ``ipset add NAME IP
-exist`` (``del`` on disconnect) and OpenVPN waits for it. Here the same
command runs through a blocking ``subprocess.run`` from pocketproxy's
controller, so everything else on the path is identical. It is a lower bound
for a real script: no shell, no interpreter start-up, the binary is exec'd
directly.

Same interface as :class:`ovpnmgr.ipset.NetlinkIPSet` (``ensure``/``add``/
``delete``/``members``/``flush``/``close``). With ``fast`` set to a
``NetlinkIPSet`` and :attr:`use_fast` true, ``add``/``delete`` go over
netlink instead; the benchmark uses that only to pre-admit a population
without paying thousands of forks, never for a measured admission.
"""

import errno
import ipaddress
import shutil
import subprocess

from ovpnmgr.ipset import IPSetError


class SubprocessIPSet:
    def __init__(self, name, maxelem=65536, fast=None, ipset="ipset"):
        self.name = name
        self.maxelem = maxelem
        self.fast = fast
        self.use_fast = False
        self.forks = 0
        self._ipset = shutil.which(ipset, path="/usr/sbin:/sbin:/usr/bin:/bin") or ipset

    def _run(self, operation, ip, *args):
        self.forks += 1
        try:
            proc = subprocess.run(
                [self._ipset, *args], capture_output=True, timeout=10, env={"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin"}
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise IPSetError(operation, self.name, ip, getattr(e, "errno", 0) or errno.EIO, str(e)) from e
        if proc.returncode != 0:
            message = proc.stderr.decode("utf-8", "replace").strip() or "exit %d" % proc.returncode
            code = errno.ENOENT if "does not exist" in message else errno.EIO
            raise IPSetError(operation, self.name, ip, code, message)
        return proc.stdout.decode("utf-8", "replace")

    def ensure(self):
        self._run("create", None, "create", self.name, "hash:ip", "family", "inet", "maxelem", str(self.maxelem), "-exist")

    def add(self, ip):
        ip = ipaddress.IPv4Address(ip)
        if self.use_fast:
            return self.fast.add(ip)
        self._run("add", ip, "add", self.name, str(ip), "-exist")

    def delete(self, ip):
        ip = ipaddress.IPv4Address(ip)
        if self.use_fast:
            return self.fast.delete(ip)
        self._run("delete", ip, "del", self.name, str(ip), "-exist")

    def members(self):
        return parse_members(self._run("list", None, "list", self.name, "-output", "plain"))

    def flush(self):
        self._run("flush", None, "flush", self.name)

    def close(self):
        if self.fast is not None:
            self.fast.close()


def parse_members(text):
    """Members of ``ipset list NAME`` output as a set of IPv4Address."""
    _, found, rest = text.partition("Members:")
    if not found:
        return set()
    return {ipaddress.IPv4Address(line.split()[0]) for line in rest.splitlines() if line.strip()}


def kernel_members(name):
    """The set's members read with the ``ipset`` tool (independent of any adapter)."""
    out = subprocess.run(["ipset", "list", name, "-output", "plain"], capture_output=True, text=True, timeout=30, check=True)
    return parse_members(out.stdout)
