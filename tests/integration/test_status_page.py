"""The status page (issue 20) in a real browser: headless Chromium (Debian's ``chromium``) loads
``http://127.0.0.1:9105/status`` in the server namespace of a lab with real OpenVPN, two customers
on two tinyproxy phones and the daemon at its defaults (the page is on by default, on the
metrics listener). The screenshot is saved under the test's temp dir; the rendered DOM must list
both users, their devices and non-zero byte counts, never a device password; after one customer
disconnects, the next load lists one."""

import json
import os
import shutil
import sys
from html.parser import HTMLParser

import pytest

from tests.lab.daemon import Daemon
from tests.lab.netns import require_root, require_tools, wait_for
from tests.lab.openvpn import OPENVPN, Lab
from tests.lab.probes import NETCLIENT, run_json
from tests.lab.world import ORIGIN_IP, TINYPROXY, World

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
URL = "http://127.0.0.1:9105/status"
_JSON = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen('%s.json', timeout=10).read().decode())" % URL


class Tables(HTMLParser):
    """``{table class: [[cell text, ...], ...]}`` of the rendered DOM."""

    def __init__(self):
        super().__init__()
        self.tables, self._table, self._row, self._cell = {}, None, None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._table = self.tables.setdefault(dict(attrs).get("class"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row:
                self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def chromium(ns, tmp_path, *args):
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    out = ns.run(CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--user-data-dir=%s" % profile, *args, check=False, timeout=90)
    assert out.returncode == 0, "chromium failed (%s): %s" % (out.returncode, out.stderr[-2000:])
    return out.stdout


@pytest.fixture
def env(tmp_path):
    require_root()
    require_tools(OPENVPN, TINYPROXY, CHROMIUM)
    with Lab(tmp_path / "lab") as lab, World(lab.server_ns, tmp_path / "world", lab.internet) as world:
        phone1 = world.add_device("phone1", username="dev", password="devpw")
        phone2 = world.add_device("phone2")
        users = {"alice": {"password": "alice-pw", "device": "phone1"}, "bob": {"password": "bob-pw", "device": "phone2"}}
        daemon = Daemon(lab.server_ns, tmp_path / "daemon", lab.server.mgmt_socket, users,
                        devices={"phone1": phone1.url, "phone2": phone2.url}).start()
        try:
            daemon.wait_log(r"metrics at .* \(GET /metrics /status /status\.json\)", timeout=30)
            daemon.wait_log(r"reconciled with OpenVPN", timeout=30)
            yield lab, world, daemon
        except BaseException:
            print("==== pocketproxy ====\n%s" % daemon.tail(60))
            raise
        finally:
            daemon.stop()


def status_json(lab):
    return json.loads(lab.server_ns.run(sys.executable, "-c", _JSON, timeout=30).stdout)


def test_the_status_page_in_a_real_browser_shows_both_customers_then_one(env, tmp_path):
    lab, world, daemon = env
    clients = {}
    for name in ("alice", "bob"):
        clients[name] = lab.add_client(name, username=name, password="%s-pw" % name)
        clients[name].wait_connected(timeout=30)
    for name, client in clients.items():
        got = run_json(client.ns, sys.executable, NETCLIENT, "--timeout", "10", "fetch", "http://%s/blob/200000" % ORIGIN_IP)
        assert got.get("status") == 200, got

    def bytes_counted():
        rows = status_json(lab)["clients"]
        return len(rows) == 2 and all((r["proxied_bytes_down"] or 0) > 0 for r in rows)

    wait_for(bytes_counted, 20, interval=0.5, what="both customers' proxied bytes on /status.json")
    shot = tmp_path / "status.png"
    chromium(lab.server_ns, tmp_path, "--window-size=1400,1000", "--screenshot=%s" % shot, URL)
    assert shot.exists() and shot.stat().st_size > 10_000, shot
    dom = chromium(lab.server_ns, tmp_path, "--dump-dom", URL)
    assert "devpw" not in dom and "<title>pocketproxy status</title>" in dom
    tables = Tables()
    tables.feed(dom)
    rows = {row[0]: row for row in tables.tables["clients"]}
    assert set(rows) == {"alice", "bob"}, tables.tables["clients"]
    assert rows["alice"][2] == "phone1" and rows["bob"][2] == "phone2"
    for row in rows.values():
        proxied_down = row[9]
        assert proxied_down not in ("-", "0 B") and float(proxied_down.split()[0]) > 0, row
    devices = {row[0]: row for row in tables.tables["devices"]}
    assert "alice@" in devices["phone1"][6] and "bob@" in devices["phone2"][6] and "***" in devices["phone1"][7]
    admitted = [row for row in tables.tables["admissions"] if row[4] == "admitted"]
    assert {row[1] for row in admitted} == {"alice", "bob"}
    print("\nstatus page screenshot: %s (%d bytes)" % (shot, shot.stat().st_size))

    clients["bob"].stop()
    wait_for(lambda: [r["user"] for r in status_json(lab)["clients"]] == ["alice"], 30, interval=0.5, what="bob gone")
    tables = Tables()
    tables.feed(chromium(lab.server_ns, tmp_path, "--dump-dom", URL))
    assert [row[0] for row in tables.tables["clients"]] == ["alice"], tables.tables["clients"]
    assert os.path.exists(shot)
