"""The status page (issue 20) on fakes: the same data as the admin socket's --json, every value
escaped, no secret on it, optional HTTP Basic authentication; rendered by the real twisted.web
Site (a headless browser loads it against a real lab in tests/integration/test_status_page.py)."""

import json

from twisted.web.test.requesthelper import DummyRequest

from ovpnmgr.statuspage import StatusJSON, StatusPage, render_html, snapshot
from tests.unit.admin_world import Admin, admit, world


def get(resource, password=None):
    request = DummyRequest([b""])
    request.getPassword = lambda: password  # what twisted.web's Request parses from Basic auth
    body = resource.render_GET(request)
    return request, body


def test_the_page_shows_clients_devices_admissions_firewall_and_vitals():
    w = world()
    admit(w, 0, "alice")
    w.connect(1, user="mallory", password="wrong")  # a denial, kept among the recent admissions
    html = render_html(snapshot(w.ops))
    assert '<meta http-equiv="refresh" content="10">' in html and "<script" not in html
    for text in ("<td>alice</td>", "<td>p1</td>", "<td>alice@10.9.0.2</td>", "<td>admitted</td>", "denied_final", "not checked yet", "<td>pid</td>"):
        assert text in html, text
    # No secret: the page is built from ovpnmgr.views, whose device upstreams hide the password
    # (the lab's phone with credentials: tests/integration/test_status_page.py).


def test_status_json_is_what_pocketproxyctl_json_shows():
    w = world()
    admit(w, 0, "alice")
    _, body = get(StatusJSON(w.ops))
    data = json.loads(body)
    admin = Admin(w.factory)
    clients = json.loads(admin.send("pp clients --json").split(b"\r\n")[0])["clients"]
    devices = json.loads(admin.send("pp devices --json").split(b"\r\n")[0])["devices"]
    assert data["clients"] == clients and data["devices"] == devices
    assert data["recent_admissions"][0]["user"] == "alice" and data["recent_admissions"][0]["result"] == "admitted"


def test_hostile_names_are_escaped():
    w = world()
    w.connect(3, user="<script>alert(1)</script>", password="x")
    request, body = get(StatusPage(w.ops))
    text = body.decode()
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]


def test_a_password_is_asked_when_configured():
    w = world()
    request, body = get(StatusPage(w.ops, password=b"s3cret"))
    assert request.responseCode == 401 and request.responseHeaders.getRawHeaders(b"www-authenticate")
    assert b"alice" not in body
    request, body = get(StatusPage(w.ops, password=b"s3cret"), password=b"wrong")
    assert request.responseCode == 401
    request, body = get(StatusJSON(w.ops, password=b"s3cret"), password=b"s3cret")
    assert "clients" in json.loads(body)
