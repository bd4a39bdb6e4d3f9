"""Device health at its DEFAULT settings over a cellular-like link for 10 minutes (issue 16).

A competitor shipped 15 s probe timeouts that killed healthy WAN links; this is the test that
would have caught it. The phone sits behind :class:`tests.lab.wan.WanLink` (300 ± 100 ms one
way, 3 % loss per direction, ``iptables -m statistic``, BBR on both ends as in ``test_wan.py``);
the daemon runs with the health section exactly as shipped (on, target ``http://api.ipify.org/``,
which the lab's internet stands in for: the phone's /etc/hosts sends it to the origin). For
:data:`DURATION` seconds alice downloads a 1 MiB blob every :data:`EVERY` seconds through the
phone. Then:

- zero ``down`` transitions (``device_state_changes_total{state="down"}`` and the log), while
  the probes did run (at least one per interval, and they crossed the WAN: RTT ≥ 0.6 s);
- every download arrived intact.

Marked ``long``: ``make test`` runs it once (``make test-long``, Debian's libraries), not in
both legs.
"""

import sys
import time

import pytest

from tests.integration.helpers import pp_json, sample, scrape
from tests.lab.daemon import Daemon
from tests.lab.netns import require_root, require_tools
from tests.lab.openvpn import OPENVPN, Lab
from tests.lab.origin_server import blob_sha256
from tests.lab.probes import NETCLIENT, run_json
from tests.lab.wan import WanLink
from tests.lab.world import ORIGIN_IP, TINYPROXY, World

pytestmark = pytest.mark.long

DURATION = 600.0  # seconds of probing at the defaults
EVERY = 20.0  # a download this often
BLOB = 1024 * 1024
INTERVAL = 30.0  # the default health.interval, written out because the test counts probes against it


def test_ten_minutes_of_default_probing_over_a_lossy_cellular_link_never_marks_the_phone_down(tmp_path):
    require_root()
    require_tools(OPENVPN, "ipset", "iptables", TINYPROXY)
    admin_path = str(tmp_path / "admin.sock")
    with Lab(tmp_path / "lab") as lab, World(lab.server_ns, tmp_path / "world", lab.internet) as world:
        wan = WanLink(tmp_path / "wan", delay=0.3, jitter=0.1, loss=0.03, lifetime=DURATION + 300)
        try:
            phone = world.add_device("phone", username="dev", password="devpw", link_with=wan.link)
            for ns in (lab.server_ns, phone.ns):
                ns.run("sysctl", "-qw", "net.ipv4.tcp_congestion_control=bbr")
            daemon = Daemon(
                lab.server_ns,
                tmp_path / "daemon",
                lab.server.mgmt_socket,
                {"alice": {"password": "alice-pw", "device": "phone"}},
                devices={"phone": phone.url},
                admin={"socket": admin_path},
            ).start()
            try:
                daemon.wait_log(r"reconciled with OpenVPN", timeout=30)
                alice = lab.add_client("alice", username="alice", password="alice-pw")
                alice.wait_connected(timeout=60)
                started = time.monotonic()
                want = blob_sha256(BLOB)
                downloads, slowest = 0, 0.0
                while time.monotonic() - started < DURATION:
                    tick = time.monotonic()
                    got = run_json(alice.ns, sys.executable, NETCLIENT, "--timeout", "60", "fetch",
                                   "http://%s/blob/%d" % (ORIGIN_IP, BLOB), timeout=90)
                    assert got.get("status") == 200 and got.get("sha256") == want, (got, daemon.tail(30))
                    downloads += 1
                    slowest = max(slowest, got["seconds"])
                    time.sleep(max(0.0, EVERY - (time.monotonic() - tick)))
                elapsed = time.monotonic() - started
                health = {d["device"]: d["health"] for d in pp_json(admin_path, "devices")["devices"]}["phone"]
                families = scrape(lab)
                downs = sample(families, "pocketproxy_device_state_changes_total", state="down")
                degraded = sample(families, "pocketproxy_device_state_changes_total", state="degraded")
                ok = sample(families, "pocketproxy_device_probes_total", device="phone", result="ok")
                print("\n%d downloads of 1 MiB over %.0f s (slowest %.1f s); probes ok %d, degraded %d times, "
                      "down %d times; last probe RTT %s ms, success ratio %s"
                      % (downloads, elapsed, slowest, ok, degraded, downs, health["rtt_ms"], health["success_ratio"]))
                assert downs == 0, daemon.tail(40)
                assert "device phone is down" not in daemon.log_text()
                assert health["state"] in ("up", "degraded") and health["exit_address"] == phone.origin_ip, health
                assert ok >= elapsed / (INTERVAL * 1.1) - 1, ok  # the probes ran at the default interval ...
                assert health["rtt_ms"] >= 300, health  # ... and crossed the WAN (a round trip there is 0.4-0.8 s)
                assert downloads >= DURATION / EVERY - 2
            finally:
                daemon.stop()
        finally:
            wan.close()
