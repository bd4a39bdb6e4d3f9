# -*- test-case-name: tests.unit.test_fairshare -*-
"""Customers sharing one phone share its proxy's client limit fairly.

A phone proxy takes a fixed number of connections at once (tinyproxy's
``MaxClients``, 3proxy's ``maxconn``); beyond it, new connections wait in its
listen queue until they time out. Without a rule, one customer with a quarter of
her own connection cap fills the phone and her co-tenants' fetches hang.

With the device's limit ``L`` known (``ClientPolicy.device_limit``) and ``n``
clients mapped to the device, each client is guaranteed ``share = L // n``
connections: a new connection is admitted while the client is under its share,
or while the device keeps every co-tenant's unused share free (so the remainder
of the division is used, and nobody ever takes a slot a co-tenant is owed).
Shares are reserved for clients who are mapped but idle: they are admitted, and
their first fetch must not wait behind someone else's download. Connections a
client already holds when a co-tenant arrives are not cut; the newcomer's share
frees up as they finish.
"""

import ipaddress


def refusal(mappings, client_ip, upstream, limit):
    """Why ``client_ip`` may not open one more connection through ``upstream`` whose proxy
    takes ``limit`` connections, or None. ``mappings`` is the :class:`~proxy.mappings.MappingTable`."""
    if not limit:
        return None
    client_ip = ipaddress.ip_address(client_ip)
    tenants = mappings.co_tenants(upstream) | {client_ip}
    share = max(1, limit // len(tenants))
    mine = mappings.live_count(client_ip)
    if mine < share:
        return None
    held = mine
    owed = 0
    for ip in tenants:
        if ip != client_ip:
            live = mappings.live_count(ip)
            held += live
            owed += max(0, share - live)
    if held + owed < limit:
        return None
    return "fair share %d of the device's %d connections reached (%d clients share it)" % (share, limit, len(tenants))
