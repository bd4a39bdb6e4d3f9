"""Fixtures several integration modules share. A module that defines a fixture of the same name
uses its own. Plain helpers are in ``tests/integration/helpers.py`` and ``tests/lab/``."""

import os
import shutil
import tempfile

import pytest

from tests.lab.netns import NETNS_ETC, require_root
from tests.lab.openvpn import Lab

DNS_IP = "10.9.0.1"  # the server's tunnel address: pocketproxy's DNS service


@pytest.fixture
def lab(tmp_path):
    """A :class:`tests.lab.openvpn.Lab` (OpenVPN server, no clients yet), torn down after the test."""
    require_root()
    with Lab(tmp_path / "lab") as lab:
        yield lab


@pytest.fixture
def admin_path():
    """A path for the daemon's admin socket in a fresh short directory (unix socket paths must
    stay short), removed afterwards."""
    directory = tempfile.mkdtemp(prefix="ppadm-")
    yield os.path.join(directory, "admin.sock")
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def resolv_conf(env):
    """``nameserver 10.9.0.1`` as alice's /etc/resolv.conf (``ip netns exec`` bind-mounts
    /etc/netns/NAME/resolv.conf); removed again afterwards. Needs the module's ``env`` fixture to
    have an ``alice`` client (``test_dns.py``, ``test_dns_doh.py``)."""
    directory = os.path.join(NETNS_ETC, env.alice.ns.name)
    created = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "resolv.conf")
    try:
        with open(path, "w") as f:
            f.write("nameserver %s\noptions timeout:3 attempts:1\n" % DNS_IP)
        yield path
    finally:
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        elif os.path.exists(path):
            os.unlink(path)
