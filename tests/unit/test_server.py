"""ProxyFactory/ProxyConnection: guards, limits, sniff policy, parallel dial, failures, timeouts.

The accepted side is a StringTransport; the device side is a scripted
HandshakeClient stand-in; time is a MemoryReactorClock (``tests/unit/proxy_world.py``).
The real Relay joins the two, so the bytes that reach each transport are the real ones.
"""

import ipaddress

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from proxy.localaddr import LocalAddresses
from proxy.mappings import Route
from proxy.server import SniffSkipList
from proxy.upstreamerrors import Forbidden
from tests.unit.proxy_world import CLIENT, DEVICE, Transport, World


@pytest.fixture
def logs():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def text(events):
    from twisted.logger import formatEvent

    return "\n".join(formatEvent(e) for e in events)


def test_unmapped_source_is_reset_and_counted(logs):
    """A source without a mapping never gets a dial: RST, counter, one log line."""
    w = World()
    _, t = w.accept(source="10.9.0.77")
    assert t.aborted and w.dials == []
    assert w.factory.stats.refused == {"unmapped": 1}
    assert "refused connection from 10.9.0.77 to 93.184.216.34:443: source has no device mapping" in text(logs)


def test_connection_to_the_proxy_itself_is_a_loop():
    """Original destination == the accepted address (not redirected) → refused as a loop."""
    w = World()
    w.destination = (ipaddress.ip_address("10.9.0.1"), 12345)
    proto = w.factory.buildProtocol(None)
    t = Transport(hostAddress=IPv4Address("TCP", "10.9.0.1", 12345), peerAddress=IPv4Address("TCP", CLIENT, 1))
    proto.makeConnection(t)
    assert t.aborted and w.dials == []
    assert w.factory.stats.refused == {"loop": 1}


def test_local_destinations_are_loops():
    """Any address of this host is refused, whatever the port."""
    w = World()
    w.destination = (ipaddress.ip_address("192.0.2.1"), 80)
    t = w.accept(port=80)[1]
    assert t.aborted and w.factory.stats.refused == {"loop": 1}


def test_loopback_is_always_local():
    """127.0.0.0/8 needs no cache entry to be refused."""
    w = World()
    w.destination = (ipaddress.ip_address("127.0.0.53"), 53)
    assert w.accept(port=53)[1].aborted


def test_per_client_limit():
    """The (N+1)th live connection of one client is reset; other clients are unaffected."""
    w = World(max_connections_per_client=2)
    w.mappings.add("10.9.0.6", DEVICE, owner="s2")
    assert not w.accept()[1].aborted
    assert not w.accept()[1].aborted
    assert w.accept()[1].aborted
    assert not w.accept(source="10.9.0.6")[1].aborted
    assert w.factory.stats.refused == {"client-limit": 1}


def test_global_limit():
    """The global cap counts every client's live connections."""
    w = World(max_connections=1)
    w.mappings.add("10.9.0.6", DEVICE, owner="s2")
    assert not w.accept()[1].aborted
    assert w.accept(source="10.9.0.6")[1].aborted
    assert w.factory.stats.refused == {"limit": 1}


def test_a_derived_cap_leaves_room_for_the_sockets_health_probes_and_dns_hold():
    """With max_connections derived from RLIMIT_NOFILE, sockets held elsewhere in the process
    (kept probe tunnels, DNS tunnels) shrink the cap: at the cap, a probe still gets its fd."""
    w = World()
    w.mappings.add("10.9.0.6", DEVICE, owner="s2")
    derived = w.factory.max_connections
    held = [0]
    w.factory.sockets_elsewhere = lambda: held[0]
    assert w.factory.connection_limit() == derived
    held[0] = 2 * (derived - 16) - 1  # two sockets per proxied connection, rounded up: 16 slots left
    assert w.factory.connection_limit() == 16
    assert not any(w.accept()[1].aborted for _ in range(16))
    assert w.accept(source="10.9.0.6")[1].aborted
    assert w.factory.stats.refused == {"limit": 1}
    held[0] = 0
    assert not w.accept(source="10.9.0.6")[1].aborted


def test_an_explicit_cap_is_the_operators_and_stays():
    w = World(max_connections=5)
    w.factory.sockets_elsewhere = lambda: 1000
    assert w.factory.connection_limit() == 5


def test_server_first_port_connects_to_ip_at_once():
    """On a non-sniffed port the client is paused and the CONNECT names the IP as soon as the device answers."""
    w = World()
    proto, t = w.accept(port=22)
    assert t.producerState == "paused"
    assert [u for u, _ in w.dials] == [DEVICE]
    device = w.connect_device()
    assert device.handshakes == [("93.184.216.34", 22)]
    assert w.factory.stats.sniffed == {"skipped": 1}


def test_sniff_port_dials_in_parallel_and_uses_the_sni():
    """The device is dialled before any client byte; the sniffed name goes into CONNECT; bytes are forwarded."""
    import ssl

    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="Example.ORG")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()

    w = World()
    proto, t = w.accept(port=443)
    assert len(w.dials) == 1 and t.producerState == "producing"
    device = w.connect_device()
    assert device.handshakes == []  # still sniffing
    proto.dataReceived(hello[:100])
    assert device.handshakes == []  # need more bytes
    proto.dataReceived(hello[100:])
    assert device.handshakes == [("example.org", 443)]
    device.pending.callback(b"server bytes")
    assert device.transport.value() == hello
    assert t.value() == b"server bytes"
    assert device.leg is proto.relay.upstream_leg
    assert w.factory.stats.sniffed == {"sni": 1}


def test_http_host_used_when_device_answers_later():
    """Sniff finishing first waits for the dial; the Host name (port stripped) is used."""
    w = World()
    proto, t = w.accept(port=80)
    proto.dataReceived(b"GET / HTTP/1.1\r\nHost: www.example.com:80\r\n\r\n")
    assert t.producerState == "paused"
    device = w.connect_device()
    assert device.handshakes == [("www.example.com", 80)]


def test_invalid_sniffed_name_falls_back_to_ip():
    """A Host that is not a valid hostname never reaches a CONNECT line."""
    w = World()
    proto, _ = w.accept(port=80)
    device = w.connect_device()
    proto.dataReceived(b"GET / HTTP/1.1\r\nHost: evil.com\tx\r\n\r\n")
    assert device.handshakes == [("93.184.216.34", 80)]
    assert w.factory.stats.sniffed in ({"invalid": 1}, {"none": 1})


def test_sniff_budget_expires_then_ip_is_used():
    """A silent client on a sniff port costs exactly the budget, then the IP is used."""
    w = World(sniff_budget=0.2)
    proto, t = w.accept(port=443)
    device = w.connect_device()
    w.reactor.advance(0.19)
    assert device.handshakes == []
    w.reactor.advance(0.02)
    assert device.handshakes == [("93.184.216.34", 443)]
    assert w.factory.stats.sniffed == {"timeout": 1}


def test_silent_destinations_are_learned_and_skipped():
    """After 5 silent budgets for one destination, later connections skip the sniff."""
    w = World(sniff_budget=0.2)
    for _ in range(5):
        w.accept(port=8443)
        w.reactor.advance(0.3)
    proto, t = w.accept(port=8443)
    assert t.producerState == "paused"
    assert w.factory.stats.sniffed == {"timeout": 5, "learned": 1}


def test_skiplist_forgets_after_ttl_and_when_the_client_speaks():
    """Learned entries expire, and a client that speaks clears the count."""
    clock = MemoryReactorClock()
    skip = SniffSkipList(clock, threshold=2, ttl=10)
    skip.silent("k")
    skip.silent("k")
    assert skip.skip("k")
    clock.advance(11)
    assert not skip.skip("k")
    skip.silent("k")
    skip.spoke("k")
    skip.silent("k")
    assert not skip.skip("k")


def test_upstream_failure_resets_client_and_logs_once_without_secrets(logs):
    """A device refusal → client RST, counter by kind, one log line naming client/device/destination."""
    w = World()
    proto, t = w.accept(port=22)
    device = w.connect_device()
    device.pending.errback(Forbidden("device proxy 192.0.2.10:8080 answered 403 Forbidden"))
    assert t.aborted and device.aborted
    assert w.factory.stats.upstream_errors == {"forbidden": 1}
    out = text(logs)
    assert out.count("upstream failed for 10.9.0.5 via http://dev:***@192.0.2.10:8080 to 93.184.216.34:22") == 1
    assert "s3cret" not in out
    assert w.mappings.live_count(CLIENT) == 1  # until the transport reports the RST done
    proto.connectionLost(Failure(Exception("aborted")))
    assert w.mappings.live_count(CLIENT) == 0 and w.factory.stats.active == 0


def test_upstream_failure_event_carries_structured_fields(logs):
    """The failure event has dest, reason, kind and the mapping owner's fields (user, cid, vpn_ip, device)
    as keys of its own; the device's password is in none of them."""

    w = World()
    fields = {"user": "alice", "cid": 4, "vpn_ip": CLIENT, "device": "phone"}
    w.mappings.transfer(CLIENT, Route(DEVICE, device="phone", log_fields=fields), "session")
    w.accept(port=22)
    w.connect_device().pending.errback(Forbidden("device proxy 192.0.2.10:8080 answered 403 Forbidden"))
    [event] = [e for e in logs if e.get("event") == "upstream-failed"]
    assert {k: event[k] for k in ("user", "cid", "vpn_ip", "device", "dest", "kind")} == {
        "user": "alice",
        "cid": 4,
        "vpn_ip": CLIENT,
        "device": "phone",
        "dest": "93.184.216.34:22",
        "kind": "forbidden",
    }
    assert event["reason"] == "device proxy 192.0.2.10:8080 answered 403 Forbidden"
    assert "s3cret" not in repr(event)


def test_relayed_bytes_count_per_client_live_and_finished():
    """pp clients' proxied bytes and the daemon's totals read the relay's one counter: a live
    relay's bytes are visible at once, then kept (not doubled) when it finishes."""
    w = World()
    proto, t = w.accept(port=22)
    device = w.connect_device()
    device.pending.callback(b"")
    proto.dataReceived(b"hello")
    device.leg.dataReceived(b"world!!")
    totals = lambda: (w.factory.stats.snapshot()["bytes_up"], w.factory.stats.snapshot()["bytes_down"])  # noqa: E731
    assert w.mappings.client_bytes(CLIENT) == (5, 7) == totals()
    proto.connectionLost(Failure(Exception("aborted")))
    device.leg.connectionLost(Failure(Exception("aborted")))
    assert w.factory.stats.completed == 1 and w.mappings.live_count(CLIENT) == 0
    assert w.mappings.client_bytes(CLIENT) == (5, 7) == totals()


def test_dial_failure_resets_client():
    """The device unreachable → RST for the client."""
    from proxy.upstreamerrors import Unreachable

    w = World()
    _, t = w.accept(port=22)
    w.dials[0][1].errback(Unreachable("device proxy 192.0.2.10:8080: connection refused"))
    assert t.aborted and w.factory.stats.upstream_errors == {"unreachable": 1}


def test_client_leaving_during_dial_cancels_it():
    """A client gone before the device answers: the dial is cancelled, nothing leaks."""
    w = World()
    proto, t = w.accept(port=22)
    d = w.dials[0][1]
    proto.connectionLost(Failure(Exception("gone")))
    assert d.called  # cancelled
    assert w.mappings.live_count(CLIENT) == 0 and w.factory.stats.active == 0
    assert w.factory.stats.upstream_errors == {}


def test_client_eof_during_sniff_is_replayed_to_the_relay():
    """Request then FIN before the device answers: the request and the FIN both reach the device."""
    w = World()
    proto, t = w.accept(port=80)
    proto.dataReceived(b"GET / HTTP/1.0\r\nHost: a.example\r\n\r\n")
    proto.readConnectionLost()
    device = w.connect_device()
    assert device.handshakes == [("a.example", 80)]
    device.pending.callback(b"")
    assert device.transport.value() == b"GET / HTTP/1.0\r\nHost: a.example\r\n\r\n"
    assert device.transport.disconnecting  # loseWriteConnection after the buffered bytes


def test_mapping_removal_resets_live_connections():
    """Removing the client's mapping RSTs its connections, in setup or relaying."""
    w = World()
    p1, t1 = w.accept(port=22)
    d1 = w.connect_device()
    d1.pending.callback(b"")
    p2, t2 = w.accept(port=22)
    w.mappings.remove(CLIENT)
    assert t1.aborted and d1.transport.aborted
    assert t2.aborted


def test_idle_relays_are_closed_by_the_sweeper():
    """A relay silent for idle_timeout is aborted by the sweep and counted."""
    w = World(idle_timeout=60, sweep_interval=5)
    proto, t = w.accept(port=22)
    device = w.connect_device()
    device.pending.callback(b"")
    w.reactor.advance(30)
    w.factory.sweep()
    assert not t.aborted
    w.reactor.advance(31)
    w.factory.sweep()
    assert t.aborted and w.factory.stats.closed == {"idle": 1}
    proto.connectionLost(Failure(Exception("aborted")))
    device.leg.connectionLost(Failure(Exception("aborted")))
    assert w.factory.stats.active == 0 and w.factory.stats.completed == 1


def test_bug_in_setup_is_logged_and_releases_the_slot(logs):
    """An exception inside our own callbacks RSTs both sides, is logged, and frees the connection's slot."""
    w = World()
    proto, t = w.accept(port=22)
    device = w.connect_device()

    def broken(leg):
        raise RuntimeError("boom")

    device.attach = broken
    device.pending.callback(b"")
    assert t.aborted and device.transport.aborted
    proto.connectionLost(Failure(Exception("aborted")))
    assert w.factory.stats.active == 0 and w.mappings.live_count(CLIENT) == 0
    assert w.factory.stats.upstream_errors == {"internal": 1}
    assert "failed internally" in text(logs)


def test_sweeper_aborts_connections_stuck_in_setup():
    """A connection with no relay long past every setup timeout is aborted by the sweep."""
    w = World(connect_timeout=10, handshake_timeout=10, sweep_interval=5)
    proto, t = w.accept(port=22)
    w.reactor.advance(20)
    w.factory.sweep()
    assert not t.aborted
    w.reactor.advance(11)
    w.factory.sweep()
    assert t.aborted and w.factory.stats.closed == {"setup-stuck": 1}


def test_refusal_log_throttle_survives_sweeps(logs):
    """One unmapped connection per second for 20 s gives one refusal line per 10 s, sweeps or not."""
    w = World(sweep_interval=5)
    for second in range(20):
        w.accept(source="10.9.0.77")
        if second % 5 == 4:
            w.factory.sweep()
        w.reactor.advance(1)
    assert w.factory.stats.refused == {"unmapped": 20}
    assert text(logs).count("refused connection from 10.9.0.77") == 2


def test_tproxy_loop_guard_rereads_local_addresses_for_our_port():
    """Under TPROXY a direct connection to our port on a brand-new local address is still a loop."""
    addresses = {ipaddress.ip_address("192.0.2.1")}
    local = LocalAddresses(read=lambda: set(addresses))
    w = World()
    w.factory.transparent = True
    w.factory.local = local
    w.factory.listening = {(ipaddress.ip_address("0.0.0.0"), 12345)}
    w.factory.listening_ports = {12345}
    addresses.add(ipaddress.ip_address("10.9.0.1"))  # tun came up after the last refresh
    w.destination = (ipaddress.ip_address("10.9.0.1"), 12345)
    assert w.accept(port=12345, host=("10.9.0.1", 12345))[1].aborted
    assert w.factory.stats.refused == {"loop": 1}


def test_listen_reports_a_missing_address_family_as_cannot_listen(monkeypatch):
    """No IPv6 in the kernel (EAFNOSUPPORT at socket()) is a CannotListenError naming the address."""
    import errno
    import socket as socketmod

    from twisted.internet.error import CannotListenError

    from proxy import server

    real = socketmod.socket

    def no_v6(family=socketmod.AF_INET, *a, **k):
        if family == socketmod.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real(family, *a, **k)

    monkeypatch.setattr(server.socket, "socket", no_v6)
    w = World()
    with pytest.raises(CannotListenError) as info:
        server.listen(MemoryReactorClock(), w.factory, 0, ("::",))
    assert info.value.interface == "::" and server.is_unavailable_family(info.value)


def test_local_addresses_unmap_v4_mapped():
    """::ffff:10.9.0.1 is the local 10.9.0.1."""
    local = LocalAddresses(read=lambda: {ipaddress.ip_address("10.9.0.1")})
    assert "::ffff:10.9.0.1" in local and "10.9.0.2" not in local


# --- issue 14: destinations, fair share, per-client sniff learning, throttled failures ---------


def test_private_and_special_destinations_are_refused_before_any_dial(logs):
    """A customer's connection to a private, loopback or link-local address never reaches a phone."""
    w = World()
    for address in ("192.168.255.2", "10.0.0.1", "169.254.169.254", "127.0.0.1", "100.64.0.1"):
        w.destination = (ipaddress.ip_address(address), 22)
        t = w.accept(port=22)[1]
        assert t.aborted
    assert w.dials == []
    assert w.factory.stats.refused in ({"destination": 5}, {"destination": 4, "loop": 1})
    assert "192.168.255.2 is a private address" in text(logs)


def test_a_client_allowed_private_networks_reaches_them_but_never_a_device():
    from proxy.destinations import ClientPolicy

    w = World()
    w.mappings.remove(CLIENT)
    w.mappings.add(CLIENT, Route(DEVICE, policy=ClientPolicy(allow_private=True)), owner="s1")
    w.factory.destinations.set_networks(devices=["192.168.255.0/24"])
    w.destination = (ipaddress.ip_address("10.20.0.1"), 22)
    assert not w.accept(port=22)[1].aborted and len(w.dials) == 1
    w.destination = (ipaddress.ip_address("192.168.255.2"), 22)
    assert w.accept(port=22)[1].aborted and len(w.dials) == 1
    assert w.factory.stats.refused == {"destination": 1}


@pytest.mark.parametrize("host", ["localhost", "ip6-localhost", "printer.local", "localhost.localdomain"])
def test_special_use_sniffed_names_reset_the_connection_and_cancel_the_dial(host):
    w = World()
    proto, t = w.accept(port=80)
    proto.dataReceived(b"GET / HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n")
    assert t.aborted and w.dials[0][1].called  # cancelled
    assert w.factory.stats.refused == {"destination-name": 1}
    proto.connectionLost(None)
    assert w.factory.stats.active == 0 and w.mappings.live_count(CLIENT) == 0


def test_device_fair_share_refuses_the_greedy_co_tenant():
    from proxy.destinations import ClientPolicy

    w = World()
    w.mappings.remove(CLIENT)
    w.mappings.add(CLIENT, Route(DEVICE, policy=ClientPolicy(device_limit=4)), owner="s1")
    w.mappings.add("10.9.0.6", Route(DEVICE, policy=ClientPolicy(device_limit=4)), owner="s2")
    held = [w.accept(port=22)[1] for _ in range(3)]
    assert [t.aborted for t in held] == [False, False, True]
    assert w.factory.stats.refused == {"device-share": 1}
    assert not any(w.accept(source="10.9.0.6", port=22)[1].aborted for _ in range(2))


def test_silence_learned_for_one_client_does_not_change_another_clients_sniffing():
    w = World(sniff_budget=0.2)
    w.mappings.add("10.9.0.6", DEVICE, owner="s2")
    for _ in range(6):
        w.accept(port=8443)
        w.reactor.advance(0.3)
    assert w.factory.stats.sniffed == {"timeout": 5, "learned": 1}
    _, t = w.accept(source="10.9.0.6", port=8443)
    assert t.producerState == "producing"  # still sniffing for the other client
    assert w.factory.stats.sniffed == {"timeout": 5, "learned": 1}


def test_upstream_failure_lines_are_throttled_with_a_count_of_what_was_held_back(logs):
    w = World()
    for _ in range(50):
        w.accept(port=22)
        w.dials[-1][1].errback(Failure(Forbidden("403 Forbidden")))
    assert w.factory.stats.upstream_errors == {"forbidden": 50}
    assert text(logs).count("upstream failed for 10.9.0.5") == 1
    w.reactor.advance(10)
    w.accept(port=22)
    w.dials[-1][1].errback(Failure(Forbidden("403 Forbidden")))
    assert "(49 similar lines held back)" in text(logs)
    assert [e.get("suppressed") for e in logs if e.get("event") == "upstream-failed"] == [0, 49]
