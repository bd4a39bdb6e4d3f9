# -*- test-case-name: tests.unit.test_tunnel -*-
"""What an admitted client is told: its address, the full tunnel, DNS, the operator's extras.

pocketproxy owns this, not the operator's ``server.conf`` (DESIGN decision 11): the product's
promise is that every byte a customer sends leaves through their phone or not at all, and a
customer's machine has its own internet connection, so unless the ``client-auth`` block itself
carries the routes, everything but the VPN subnet would leave through the customer's ISP.

Full tunnel (the default; ``openvpn.tunnel``, or a user's own ``tunnel:`` in the users file):

- ``redirect-gateway def1 ipv6``: IPv4 ``0/1`` + ``128/1`` and IPv6 ``2000::/4``, ``3000::/4``,
  ``fc00::/7`` into the tunnel, more specific than the customer's own default routes; OpenVPN
  keeps a host route to the VPN server through the customer's old gateway.
- ``block-ipv6``: the client's own OpenVPN answers every IPv6 packet routed into the tunnel
  with ICMPv6 "no route" (observed with 2.6.14: ``connect()`` fails with ENETUNREACH in under a
  millisecond; without it, 5 s and more of silence). No IPv6 packet of a customer leaves their
  machine, and Happy Eyeballs falls back to IPv4 at once. (The server could not carry it anyway:
  OpenVPN drops tunnel packets from a source address it did not assign, and it assigns none.)
- ``route net_gateway 255.255.255.255 vpn_gateway`` (OpenVPN 2.x clients): the customer's own
  router, i.e. the default gateway found before the tunnel came up, is routed into the tunnel
  too. On Linux a plain ``openvpn`` applies no pushed DNS server, so ``/etc/resolv.conf`` keeps
  asking the home router, which would forward every name to the ISP; through the tunnel those
  queries are intercepted and answered through the phone (``ovpnmgr.firewall``). The route
  syntax with ``net_gateway`` as the destination is OpenVPN 2's; other clients (OpenVPN 3 /
  Connect, which apply pushed DNS themselves) do not get it.
- ``block-outside-dns`` (Windows clients, when a DNS server is pushed): Windows otherwise asks
  every adapter's resolvers in parallel. Other platforms do not know the option (2.6.14 on
  Linux logs "Options error: Unrecognized option"), so it goes only where ``IV_PLAT`` is
  ``win`` (or unknown).

Split tunnel is an explicit opt-in: only the operator's ``openvpn.push`` routes and the DNS
option are pushed, everything else leaves through the customer's own connection. The daemon
says so loudly at start and on every reload (:func:`split_tunnel_warnings`).
"""

from dataclasses import dataclass

FULL = "full"
SPLIT = "split"
MODES = (FULL, SPLIT)

REDIRECT_GATEWAY = "redirect-gateway def1 ipv6"
BLOCK_IPV6 = "block-ipv6"
ROUTER_INTO_TUNNEL = "route net_gateway 255.255.255.255 vpn_gateway"
BLOCK_OUTSIDE_DNS = "block-outside-dns"

#: Options only pocketproxy pushes; ``openvpn.push`` may not carry them (config refuses).
RESERVED_OPTIONS = (
    "redirect-gateway",
    "redirect-private",
    "block-ipv6",
    "block-outside-dns",
    "ifconfig",
    "ifconfig-ipv6",
    "route-gateway",
)


@dataclass(frozen=True)
class Peer:
    """What the client said about itself in the CONNECT environment (``IV_VER``, ``IV_PLAT``)."""

    version: str = ""
    platform: str = ""

    @classmethod
    def from_env(cls, env):
        return cls(env.get("IV_VER", ""), env.get("IV_PLAT", ""))

    @property
    def openvpn2(self):
        """An OpenVPN 2.x client (or one that did not say): it knows ``route net_gateway``."""
        return self.version == "" or self.version.startswith("2.")

    @property
    def windows(self):
        """A Windows client, or one that did not say which platform it runs on."""
        return self.platform in ("", "win")


def pushes_dns(options):
    """True if ``options`` (push option texts) name a DNS server for the client."""
    return any(option.split()[:2] == ["dhcp-option", "DNS"] for option in options)


def effective_mode(default, user_mode):
    """The tunnel a user gets: their own ``tunnel:`` if set, else the daemon's ``openvpn.tunnel``."""
    return user_mode or default


def pushed_options(mode, extra, peer):
    """The options pushed to one client, in order.

    :param mode: :data:`FULL` or :data:`SPLIT` (see :func:`effective_mode`).
    :param extra: ``openvpn.push`` (with the DNS service's ``dhcp-option DNS``), verbatim.
    :param peer: the client's :class:`Peer`.
    """
    if mode not in MODES:
        raise ValueError("tunnel mode must be one of %s, got %r" % (", ".join(MODES), mode))
    options = []
    if mode == FULL:
        options += [REDIRECT_GATEWAY, BLOCK_IPV6]
        if peer.openvpn2:
            options.append(ROUTER_INTO_TUNNEL)
    options += list(extra)
    if mode == FULL and peer.windows and pushes_dns(extra):
        options.append(BLOCK_OUTSIDE_DNS)
    return options


def client_auth_lines(address, netmask, options):
    """The ``client-auth`` config block (without the header and ``END``) for ``options``."""
    return ["ifconfig-push %s %s" % (address, netmask)] + ['push "%s"' % option for option in options]


def split_tunnel_warnings(default, users):
    """Log-ready lines for every split tunnel in force (empty when everyone has the full tunnel).

    :param default: ``openvpn.tunnel``.
    :param users: the users file's users (``.name``, ``.tunnel``).
    """
    lines = []
    if default == SPLIT:
        full = sorted(u.name for u in users if u.tunnel == FULL)
        lines.append(
            "SPLIT TUNNEL for every customer (openvpn.tunnel: split): only the routes in openvpn.push go"
            " through the phones; everything else leaves through the customer's own internet connection"
            + (" (full tunnel only for: %s)" % ", ".join(full) if full else "")
        )
    else:
        split = sorted(u.name for u in users if u.tunnel == SPLIT)
        if split:
            lines.append(
                "SPLIT TUNNEL for %d user(s) (tunnel: split in the users file): %s; their traffic outside"
                " openvpn.push routes leaves through their own internet connection, not their phone"
                % (len(split), ", ".join(split))
            )
    return lines
