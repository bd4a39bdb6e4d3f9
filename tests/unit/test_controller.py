"""Controller: the admission transaction, rollback, teardown by (epoch, CID), reconciliation.

Driven through a real ManagementProtocol on a scripted peer (exact lines),
with an in-memory ipset and Clock; no sockets, no root.
"""

from ovpnmgr.directory import Directory
from ovpnmgr.ipset import IPSetError
from ovpnmgr.pool import AddressPool
from ovpnmgr.session import State
from ovpnmgr.testing import connect_env
from tests.unit.controller_world import IP, SUBNET, USERS, World, auth_block


def test_attach_enables_state_and_reconciles():
    """A new management connection: state on, then status 3, then ready."""
    w = World()
    assert w.script.sent_commands()[:2] == ["state on", "status 3"]
    assert w.attached and w.attached[0] is w.script.protocol


def test_admission_order_member_mapping_then_client_auth():
    """CONNECT → ipset member and mapping exist when client-auth is written, with ifconfig-push."""
    w = World()
    seen = {}
    original = w.script.protocol.client_auth

    def spy(cid, kid, lines):
        seen["members"] = w.members()
        seen["mapped"] = w.mappings.lookup("10.9.0.2")
        return original(cid, kid, lines)

    w.script.protocol.client_auth = spy
    w.connect(0, kid=1)
    assert seen["members"] == {IP("10.9.0.2")}
    assert seen["mapped"] == w.directory.devices["p1"].upstream
    assert w.commands("client-auth")[-1] == auth_block(0, 1, "10.9.0.2")
    assert w.controller.sessions[(w.controller.epoch, 0)].state is State.AUTHORIZED


def test_push_options_are_appended_to_the_block():
    """Configured push options go into the client-auth block, quoted, after the full tunnel."""
    w = World(push=("dhcp-option DNS 10.9.0.1", "route 192.0.2.0 255.255.255.0"))
    w.connect(0)
    extra = 'push "dhcp-option DNS 10.9.0.1"\npush "route 192.0.2.0 255.255.255.0"\n'
    assert w.commands("client-auth")[-1] == auth_block(0, 1, "10.9.0.2", extra)


def test_full_tunnel_follows_the_clients_platform_and_version():
    """Windows gets block-outside-dns (only when a DNS server is pushed); OpenVPN 3 clients do not get
    the OpenVPN 2 route syntax for the home router; the full tunnel itself goes to everyone."""
    w = World(push=("dhcp-option DNS 10.9.0.1",))
    w.connect(0, IV_PLAT="win", IV_VER="2.6.12")
    w.connect(1, user="bob", IV_PLAT="mac", IV_VER="3.10.1")
    windows, connect3 = (block.split("\n") for block in w.commands("client-auth"))
    assert windows[2:] == [
        'push "redirect-gateway def1 ipv6"', 'push "block-ipv6"', 'push "route net_gateway 255.255.255.255 vpn_gateway"',
        'push "dhcp-option DNS 10.9.0.1"', 'push "block-outside-dns"', "END",
    ]
    assert connect3[2:] == ['push "redirect-gateway def1 ipv6"', 'push "block-ipv6"', 'push "dhcp-option DNS 10.9.0.1"', "END"]
    nodns = World()
    nodns.connect(0, IV_PLAT="win")
    assert 'push "block-outside-dns"' not in nodns.commands("client-auth")[0]


def test_split_tunnel_is_an_opt_in_globally_or_per_user():
    """openvpn.tunnel: split pushes no redirect; a user's own tunnel: wins over the daemon's default."""
    users = USERS.replace("bob: {", "bob: {tunnel: full, ").replace("alice: {", "alice: {tunnel: split, ")
    w = World(users=users, push=("dhcp-option DNS 10.9.0.1",), tunnel="split")
    w.connect(0, IV_PLAT="win")  # alice: split (her own and the default)
    w.connect(1, user="bob")  # bob: full despite the default
    w.connect(2, user="carol")  # carol: the default, split
    alice, bob, carol = w.commands("client-auth")
    assert alice == 'client-auth 0 1\nifconfig-push 10.9.0.2 255.255.255.0\npush "dhcp-option DNS 10.9.0.1"\nEND'
    assert bob == auth_block(1, 1, "10.9.0.3", 'push "dhcp-option DNS 10.9.0.1"\n')
    assert carol == 'client-auth 2 1\nifconfig-push 10.9.0.77 255.255.255.0\npush "dhcp-option DNS 10.9.0.1"\nEND'


def test_split_tunnels_are_logged_loudly_at_start_and_reload():
    """Every split tunnel in force is one warning: the global default, or the users who opted in."""
    from twisted.logger import globalLogPublisher

    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        w = World(users=USERS.replace("alice: {", "alice: {tunnel: split, "))
        w.controller.warn_split_tunnels()
        w.ops.reload(Directory.parse(USERS, "users.yaml", SUBNET, IP("10.9.0.1")))
        g = World(tunnel="split")
        g.controller.warn_split_tunnels()
    finally:
        globalLogPublisher.removeObserver(seen.append)
    warnings = [e["warning"] for e in seen if e.get("event") == "split-tunnel"]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("SPLIT TUNNEL for 1 user(s) (tunnel: split in the users file): alice;")
    assert warnings[1].startswith("SPLIT TUNNEL for every customer (openvpn.tunnel: split)")
    assert all(e["log_level"].name == "warn" for e in seen if e.get("event") == "split-tunnel")


def test_reload_kicks_a_user_whose_tunnel_changed():
    """Pushed options only apply at connect: a user moved to a split (or back to a full) tunnel is kicked."""
    w = World()
    w.connect(0)
    w.connect(1, user="bob")
    summary = w.ops.reload(Directory.parse(USERS.replace("alice: {", "alice: {tunnel: split, "), "users.yaml", SUBNET, IP("10.9.0.1")))
    assert summary["kicked"] == 1 and summary["changed"] == 1
    assert w.commands("client-kill") == ["client-kill 0"]
    same = w.ops.reload(Directory.parse(USERS.replace("bob: {", "bob: {tunnel: full, "), "users.yaml", SUBNET, IP("10.9.0.1")))
    assert same["kicked"] == 0, "tunnel: full is the default already: nothing to reconnect for"


def test_wrong_password_is_a_plain_deny_and_leaves_nothing():
    """Bad credentials: client-deny without TEMP; no member, mapping or address held."""
    w = World()
    w.connect(3, kid=2, password="wrong")
    deny = w.commands("client-deny")
    assert deny == ['client-deny 3 2 "wrong password for user alice" "authentication failed"']
    assert not w.commands("client-auth") and w.members() == set() and len(w.mappings) == 0
    assert w.pool.in_use() == {}


def test_ipset_failure_rolls_back_and_denies_temporarily():
    """The kernel refuses the member: address released, no mapping, TEMP deny with backoff."""
    w = World()
    w.ipset.fail_next_add = IPSetError("add", "pocketproxy-clients", "10.9.0.2", 28, "set is full")
    w.connect(0)
    deny = w.commands("client-deny")[-1]
    assert deny.startswith("client-deny 0 1 ") and deny.endswith('"TEMP[backoff 7,advance no]: temporary failure, retrying"')
    assert "full" in deny
    assert w.members() == set() and len(w.mappings) == 0 and w.pool.in_use() == {}
    assert not w.commands("client-auth")
    w.connect(1)
    assert w.members() == {IP("10.9.0.3")}


def test_mapping_failure_rolls_back_member():
    """A failure after the member was added removes the member again."""
    w = World()

    def boom(*a, **k):
        raise RuntimeError("mapping table broken")

    w.mappings.transfer = boom
    w.connect(0)
    assert w.commands("client-deny") and w.members() == set() and w.pool.in_use() == {}


def test_client_auth_error_rolls_back():
    """OpenVPN answers ERROR (the client left): everything is released."""
    w = World()
    w.script.set_reply("client-auth", ["ERROR: client-auth command failed"])
    w.connect(0)
    assert w.members() == set() and len(w.mappings) == 0 and w.controller.sessions == {}


def test_pool_exhaustion_is_temporary():
    """No free address → TEMP deny."""
    w = World()
    w.pool = w.controller.ledger.pool = AddressPool("10.9.0.0/30", "10.9.0.1")
    w.connect(0)
    w.connect(1, user="bob")
    assert "TEMP[" in w.commands("client-deny")[-1]


def test_certificate_only_user_admitted_by_cn():
    """No password: the certificate CN identifies the user."""
    w = World()
    w.connect(0, user="", password="", common_name="certy-cn")
    assert w.commands("client-auth")[-1].startswith("client-auth 0 1\nifconfig-push 10.9.0.2 ")
    assert w.mappings.lookup("10.9.0.2") == w.directory.devices["p2"].upstream


def test_static_address_and_duplicate_cn_ordering():
    """Same user reconnects: the new CID takes the static address; the old CID's late DISCONNECT keeps it."""
    w = World()
    w.connect(0, user="carol")
    assert w.members() == {IP("10.9.0.77")}
    w.connect(1, user="carol")
    assert w.commands("client-auth")[-1].startswith("client-auth 1 1\nifconfig-push 10.9.0.77 ")
    w.script.notify_disconnect(0, {"common_name": "carol"})
    assert w.members() == {IP("10.9.0.77")}
    assert w.mappings.owner("10.9.0.77") is w.controller.sessions[(w.controller.epoch, 1)]
    w.script.notify_disconnect(1, {})
    assert w.members() == set() and len(w.mappings) == 0


def test_disconnect_releases_by_cid_only():
    """DISCONNECT removes exactly that CID's member, mapping and address."""
    w = World()
    w.connect(0)
    w.connect(1, user="bob")
    w.script.notify_address(0, "10.9.0.2")
    w.script.notify_established(0, {"ifconfig_pool_remote_ip": "10.9.0.2"})
    w.script.notify_disconnect(0, {"bytes_sent": "5"})
    assert w.members() == {IP("10.9.0.3")}
    assert w.mappings.addresses() == {IP("10.9.0.3")}
    w.script.notify_disconnect(7, {})  # unknown CID: ignored
    assert w.members() == {IP("10.9.0.3")}


def test_address_mismatch_is_killed():
    """OpenVPN reports a different address than pushed: client-kill."""
    w = World()
    w.connect(0)
    w.script.notify_address(0, "10.9.0.200")
    assert w.commands("client-kill") == ["client-kill 0"]
    w.script.notify_address(0, "10.9.0.2")
    assert w.commands("client-kill") == ["client-kill 0"]


def test_an_ipv6_primary_address_is_not_a_mismatch():
    """With an operator's IPv6 pool OpenVPN reports the client's IPv6 address as primary: not ours
    to confirm (IPv6 is not carried; the ip6tables chains reject it), so the client stays."""
    w = World()
    w.connect(0)
    w.script.notify_address(0, "fd00:9::1000")
    assert w.commands("client-kill") == []
    w.script.notify_established(0, {"ifconfig_pool_remote_ip": "10.9.0.2"})
    assert w.commands("client-kill") == [] and w.members() == {IP("10.9.0.2")}


def test_reauth_fast_path_and_removed_user():
    """REAUTH of a known user → client-auth-nt; of a user whose credentials fail → client-deny."""
    w = World()
    w.connect(0)
    w.script.notify_reauth(0, 3, connect_env(username="alice", password="pw"))
    assert w.commands("client-auth-nt") == ["client-auth-nt 0 3"]
    w.script.notify_reauth(0, 4, connect_env(username="alice", password="changed"))
    assert w.commands("client-deny")[-1].startswith("client-deny 0 4 ")
    w.script.notify_reauth(9, 1, connect_env(username="alice", password="pw"))
    assert w.commands("client-deny")[-1].startswith('client-deny 9 1 "unknown session"')


def test_hold_is_released():
    """Every >HOLD gets a hold release."""
    w = World()
    w.script.notify_hold()
    assert w.commands("hold release") == ["hold release"]


def test_openvpn_restart_starts_new_epoch_and_flushes():
    """>STATE RECONNECTING: all sessions dropped, CID 0 of the new epoch is a new client."""
    w = World()
    w.connect(0)
    w.connect(1, user="bob")
    old_epoch = w.controller.epoch
    w.script.notify_state("RECONNECTING", "SIGHUP")
    assert w.controller.epoch == old_epoch + 1
    assert w.members() == set() and len(w.mappings) == 0 and w.controller.sessions == {}
    w.connect(0, user="bob")
    assert (w.controller.epoch, 0) in w.controller.sessions
    assert w.members() == {IP("10.9.0.4")}  # .2 and .3 were released to the back of the queue


def test_daemon_start_time_change_starts_new_epoch():
    """A CONNECT from a different OpenVPN process (new daemon_start_time) flushes old sessions."""
    w = World()
    w.connect(0)
    w.connect(1, user="bob", daemon_start_time="123")
    assert set(w.controller.sessions) == {(w.controller.epoch, 1)}
    assert len(w.members()) == 1


def test_draining_denies_temporarily():
    """While draining, new CONNECTs get a TEMP deny."""
    w = World()
    w.controller.draining = True
    w.connect(0)
    assert "TEMP[backoff 7" in w.commands("client-deny")[-1]
    assert w.members() == set()


def test_reconcile_after_own_restart_rebuilds_and_evicts():
    """Attach with established clients in status 3: rebuild mapping and member, evict stale, kill unknowns."""
    w = World()
    w.ipset.content = {IP("10.9.0.99"), IP("10.9.0.77")}  # left from the previous incarnation; .50 was lost
    w.attach(
        status_clients=[
            {"cid": 4, "virtual_address": "10.9.0.50", "username": "alice", "common_name": "alice"},
            {"cid": 5, "virtual_address": "10.9.0.77", "username": "carol", "common_name": "carol"},
            {"cid": 6, "virtual_address": "10.9.0.60", "username": "mallory", "common_name": "mallory"},
            {"cid": 7, "pending": True, "username": "UNDEF"},
        ]
    )
    assert w.members() == {IP("10.9.0.50"), IP("10.9.0.77")}
    assert w.mappings.lookup("10.9.0.50") == w.directory.devices["p1"].upstream
    assert sorted(w.commands("client-kill")) == ["client-kill 6", "client-kill 7"]
    assert w.pool.owner("10.9.0.50") is w.controller.sessions[(w.controller.epoch, 4)]
    # The rebuilt sessions work as usual afterwards.
    w.script.notify_disconnect(4, {})
    assert w.members() == {IP("10.9.0.77")}


def test_reconcile_reads_the_kernel_set_once():
    """Reconcile of many established clients dumps the ipset once, not once per client (was quadratic)."""
    w = World()
    rows = [{"cid": i, "virtual_address": "10.9.0.%d" % (i + 10), "username": "alice"} for i in range(50)]
    w.ipset.calls.clear()
    w.attach(status_clients=rows)
    assert [c for c in w.ipset.calls if c[0] == "members"] == [("members", None)]
    assert len(w.members()) == 50


def test_reconcile_with_unreadable_set_re_adds_every_member():
    """If the set cannot be listed, reconcile still (idempotently) adds every established member and evicts nothing."""
    w = World()
    w.ipset.content = {IP("10.9.0.99")}
    w.ipset.fail_next_members = True
    w.attach(status_clients=[{"cid": 1, "virtual_address": "10.9.0.20", "username": "alice"}])
    assert w.members() == {IP("10.9.0.20"), IP("10.9.0.99")}


def test_reconnect_mid_admission_reapproves_known_pending_client():
    """Management socket lost after client-auth was sent: on reattach the pending client is approved again."""
    w = World()
    w.script.set_reply("client-auth", None)  # the reply never comes
    w.connect(2, kid=1)
    w.script.disconnect()
    assert w.members() == {IP("10.9.0.2")}
    w.attach(status_clients=[{"cid": 2, "pending": True, "real_address": "198.51.100.7:40002"}])
    assert w.commands("client-auth") == [auth_block(2, 1, "10.9.0.2")]
    assert w.members() == {IP("10.9.0.2")}
    assert not w.commands("client-kill")


def test_reconnect_drops_sessions_absent_from_status():
    """A client that left while we were detached is released on reattach."""
    w = World()
    w.connect(0)
    w.script.disconnect()
    w.attach(status_clients=[])
    assert w.members() == set() and len(w.mappings) == 0 and w.pool.in_use() == {}


def test_attach_through_clientservice_routes_notifications_and_reattaches():
    """Under a real ClientService (which hands prepareConnection a proxy) CONNECTs reach us, also after a reconnect."""
    from twisted.application.internet import ClientService
    from twisted.internet.protocol import Factory

    from ovpnmgr.protocol import ManagementProtocol
    from ovpnmgr.testing import ScriptedEndpoint

    w = World()
    endpoint = ScriptedEndpoint(w.clock, auto_reply=True)
    factory = Factory.forProtocol(lambda: ManagementProtocol(w.clock))
    service = ClientService(endpoint, factory, clock=w.clock, prepareConnection=w.controller.attach)
    service.startService()
    w.clock.advance(0)
    w.script = endpoint.scripts[0]
    w.connect(0)
    assert w.commands("client-auth") and w.members() == {IP("10.9.0.2")}
    w.script.disconnect()
    w.clock.advance(60)
    w.clock.advance(0)
    w.script = endpoint.scripts[1]
    assert w.script.sent_commands()[:2] == ["state on", "status 3"]
    assert w.members() == set()  # cid 0 is absent from the new status 3: released
    w.connect(1, user="bob")
    assert w.members() == {IP("10.9.0.3")}
    service.stopService()


def test_no_timers_left_behind():
    """After a normal life cycle no DelayedCalls remain on the clock except protocol timeouts answered."""
    w = World()
    w.connect(0)
    w.script.notify_disconnect(0, {})
    assert w.clock.getDelayedCalls() == []
