"""What the kernel shows for pocketproxy's rules (iptables -S listings, the golden restore text)
and a Firewall over fakes: shared by test_firewall, test_admin and test_verify."""

from ipaddress import IPv4Address, IPv4Network

from ovpnmgr.config import FirewallConfig
from ovpnmgr.firewall import Firewall
from ovpnmgr.ipset import FakeIPSet
from ovpnmgr.process import FakeRunner

CONFIG = FirewallConfig()  # ipset pocketproxy-clients, chain POCKETPROXY, interface tun+
PORT = 12345
SUBNET = IPv4Network("10.9.0.0/24")
A = IPv4Address("10.9.0.5")
B = IPv4Address("10.9.0.6")
C = IPv4Address("10.9.0.7")

NAT_S = ["iptables", "-w", "-t", "nat", "-S"]
FILTER_S = ["iptables", "-w", "-t", "filter", "-S"]
RESTORE = ["iptables-restore", "-w", "--noflush"]
FILTER6_S = ["ip6tables", "-w", "-t", "filter", "-S"]
RESTORE6 = ["ip6tables-restore", "-w", "--noflush"]

GOLDEN = b"""\
*filter
:POCKETPROXY - [0:0]
:POCKETPROXY-IN - [0:0]
:POCKETPROXY-UL - [0:0]
-A POCKETPROXY -p tcp -j REJECT --reject-with tcp-reset
-A POCKETPROXY -p udp -j REJECT --reject-with icmp-port-unreachable
-A POCKETPROXY -j REJECT --reject-with icmp-admin-prohibited
-A POCKETPROXY-IN -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A POCKETPROXY-IN -p tcp -m tcp --dport 12345 -m conntrack --ctstate DNAT -j ACCEPT
-A POCKETPROXY-IN -p icmp -m icmp --icmp-type 8 -j ACCEPT
-A POCKETPROXY-IN -p tcp -j REJECT --reject-with tcp-reset
-A POCKETPROXY-IN -p udp -j REJECT --reject-with icmp-port-unreachable
-A POCKETPROXY-IN -j REJECT --reject-with icmp-admin-prohibited
-A POCKETPROXY-UL -i lo -j RETURN
-A POCKETPROXY-UL -s 10.9.0.0/24 -j DROP
-A POCKETPROXY-UL -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
-I FORWARD 1 -i tun+ -j POCKETPROXY
-I INPUT 1 -i tun+ -j POCKETPROXY-IN
-I FORWARD 2 ! -i tun+ -j POCKETPROXY-UL
-I INPUT 2 ! -i tun+ -j POCKETPROXY-UL
COMMIT
*nat
:POCKETPROXY - [0:0]
-A POCKETPROXY -m addrtype --dst-type LOCAL -j RETURN
-A POCKETPROXY -p tcp -m set --match-set pocketproxy-clients src -j REDIRECT --to-ports 12345
-I PREROUTING 1 -i tun+ -j POCKETPROXY
COMMIT
"""

# IPv6: the same fail-closed shape, nothing redirected (pocketproxy carries no IPv6).
RULES6 = """\
-A POCKETPROXY -p tcp -j REJECT --reject-with tcp-reset
-A POCKETPROXY -p udp -j REJECT --reject-with icmp6-port-unreachable
-A POCKETPROXY -j REJECT --reject-with icmp6-adm-prohibited
-A POCKETPROXY-IN -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A POCKETPROXY-IN -p ipv6-icmp -m icmp6 --icmpv6-type 128 -j ACCEPT
-A POCKETPROXY-IN -p tcp -j REJECT --reject-with tcp-reset
-A POCKETPROXY-IN -p udp -j REJECT --reject-with icmp6-port-unreachable
-A POCKETPROXY-IN -j REJECT --reject-with icmp6-adm-prohibited
-A POCKETPROXY-UL -i lo -j RETURN
-A POCKETPROXY-UL -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
-A POCKETPROXY-UL -p ipv6-icmp -m icmp6 --icmpv6-type 135 -j RETURN
-A POCKETPROXY-UL -p ipv6-icmp -m icmp6 --icmpv6-type 136 -j RETURN
"""
GOLDEN6 = (
    "*filter\n:POCKETPROXY - [0:0]\n:POCKETPROXY-IN - [0:0]\n:POCKETPROXY-UL - [0:0]\n"
    + RULES6
    + "-I FORWARD 1 -i tun+ -j POCKETPROXY\n"
    "-I INPUT 1 -i tun+ -j POCKETPROXY-IN\n"
    "-I FORWARD 2 ! -i tun+ -j POCKETPROXY-UL\n"
    "-I INPUT 2 ! -i tun+ -j POCKETPROXY-UL\n"
    "COMMIT\n"
).encode()

EMPTY_FILTER = "-P INPUT ACCEPT\n-P FORWARD ACCEPT\n-P OUTPUT ACCEPT\n"
EMPTY_NAT = "-P PREROUTING ACCEPT\n-P INPUT ACCEPT\n-P OUTPUT ACCEPT\n-P POSTROUTING ACCEPT\n"
DNAT = "-A PREROUTING -p tcp -m tcp --dport 8080 -j DNAT --to-destination 192.168.255.2:8080"

# What `iptables -S` prints after a correct install (as observed on iptables 1.8.9).
INPUT_RULES = """\
-A POCKETPROXY-IN -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A POCKETPROXY-IN -p tcp -m tcp --dport 12345 -m conntrack --ctstate DNAT -j ACCEPT
-A POCKETPROXY-IN -p icmp -m icmp --icmp-type 8 -j ACCEPT
-A POCKETPROXY-IN -p tcp -j REJECT --reject-with tcp-reset
-A POCKETPROXY-IN -p udp -j REJECT --reject-with icmp-port-unreachable
-A POCKETPROXY-IN -j REJECT --reject-with icmp-admin-prohibited
"""
UNDERLAY_RULES = """\
-A POCKETPROXY-UL -i lo -j RETURN
-A POCKETPROXY-UL -s 10.9.0.0/24 -j DROP
-A POCKETPROXY-UL -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
"""
HEALTHY_FILTER = EMPTY_FILTER + (
    "-N POCKETPROXY\n"
    "-N POCKETPROXY-IN\n"
    "-N POCKETPROXY-UL\n"
    "-A INPUT -i tun+ -j POCKETPROXY-IN\n"
    "-A INPUT ! -i tun+ -j POCKETPROXY-UL\n"
    "-A FORWARD -i tun+ -j POCKETPROXY\n"
    "-A FORWARD ! -i tun+ -j POCKETPROXY-UL\n"
    "-A POCKETPROXY -p tcp -j REJECT --reject-with tcp-reset\n"
    "-A POCKETPROXY -p udp -j REJECT --reject-with icmp-port-unreachable\n"
    "-A POCKETPROXY -j REJECT --reject-with icmp-admin-prohibited\n"
) + INPUT_RULES + UNDERLAY_RULES
# What `ip6tables -S` prints after a correct install (as observed on ip6tables 1.8.9).
HEALTHY_FILTER6 = (
    EMPTY_FILTER
    + "-N POCKETPROXY\n-N POCKETPROXY-IN\n-N POCKETPROXY-UL\n"
    "-A INPUT -i tun+ -j POCKETPROXY-IN\n"
    "-A INPUT ! -i tun+ -j POCKETPROXY-UL\n"
    "-A FORWARD -i tun+ -j POCKETPROXY\n"
    "-A FORWARD ! -i tun+ -j POCKETPROXY-UL\n"
    + RULES6
)
HEALTHY_NAT = EMPTY_NAT + (
    "-N POCKETPROXY\n"
    "-A PREROUTING -i tun+ -j POCKETPROXY\n" + DNAT + "\n"
    "-A POCKETPROXY -m addrtype --dst-type LOCAL -j RETURN\n"
    "-A POCKETPROXY -p tcp -m set --match-set pocketproxy-clients src -j REDIRECT --to-ports 12345\n"
)


def healthy_runner():
    """A FakeRunner whose iptables and ip6tables listings show a correct install."""
    runner = FakeRunner()
    for argv, listing in ((FILTER_S, HEALTHY_FILTER), (NAT_S, HEALTHY_NAT), (FILTER6_S, HEALTHY_FILTER6)):
        runner.on(argv, stdout=listing.encode())
    return runner


def make(filter_s=EMPTY_FILTER, nat_s=EMPTY_NAT, ipset=None, config=CONFIG, filter6_s=HEALTHY_FILTER6, **kwargs):
    runner = FakeRunner()
    runner.on(FILTER_S, stdout=filter_s.encode())
    runner.on(NAT_S, stdout=nat_s.encode())
    runner.on(FILTER6_S, stdout=filter6_s.encode())
    ipset = FakeIPSet() if ipset is None else ipset
    kwargs.setdefault("ipv6", True)
    return Firewall(config, PORT, SUBNET, ipset, runner, **kwargs), runner, ipset


def restored(runner, argv=RESTORE):
    """The stdin of the last ``argv`` (iptables-restore by default) the runner saw."""
    return [stdin for call, stdin in runner.calls if call == argv][-1]
