"""A cellular-WAN emulator for the lab: delay ± jitter in userspace, random loss in the kernel.

The lab kernels have no ``netem`` qdisc, so a link between two namespaces is built from a
pair of tun devices joined by a small forwarder process (this file, run as a script)::

    ns A (e.g. server)                                          ns B (e.g. phone)
    192.168.255.1/24 dev ppwanA ──fd──> [ forwarder ] ──fd──> dev ppwanB 192.168.255.2/24
                                <──fd── [ heap per direction: (due, seq, packet) ] <──fd──
                                         delay U(delay-jitter, delay+jitter)
    raw PREROUTING -i ppwanA: count, statistic DROP p    raw PREROUTING -i ppwanB: count, statistic DROP p

Why a tun pair (and not tun + veth): both ends are plain L3 point-to-point links, so there is
no ARP/neighbour state to emulate or to be delayed, the forwarder sees every IP packet of both
directions on two file descriptors and needs no bridge, no raw sockets and no routing tricks
(``ip_forward`` stays 0 everywhere, so a device namespace still cannot forward). The tun
devices belong to the forwarder's file descriptors: when the process dies, both interfaces
vanish, so nothing is left behind. Interface names start with ``ppw`` and never ``tun``: the
daemon's firewall matches ``-i tun+`` and must not see the WAN as a VPN interface.

Delay and jitter (the forwarder): each packet gets ``delay + U(-jitter, +jitter)``. By default
the order per direction is preserved, like a cellular bearer (RLC in-order delivery) or netem
with a rate: a packet never leaves before the one read before it in the same direction, so its
due time is ``max(own draw, previous due)``. Consequence, documented and measured: packets
sparser than ``2*jitter`` (pings, keepalives, a handshake) see the full uniform distribution,
mean ``delay``; a dense bulk flow is paced by the slowest recent draw, so its one-way delay
tends to ``delay + jitter`` (cellular "bufferbloat"). ``reorder=True`` gives netem's default
instead (independent draws, packets overtake each other; TCP survives both, with more
spurious retransmits when reordering).

Loss: ``iptables -t raw -A PREROUTING -i <tun> -m statistic --mode random --probability p
-j DROP`` on the ingress of each end (so each direction loses ``p`` independently, a round
trip about ``1-(1-p)^2``), preceded by a rule without target that counts every packet the
WAN delivered: :meth:`WanLink.loss_counters` gives seen/dropped per side, exact numbers to
check the loss rate against. Loss in raw PREROUTING (not OUTPUT) is what a real lossy link
looks like to TCP: the sender is never told locally. The forwarder can drop as well
(``--loss``, off by default) and always counts queue-limit drops.

Bounded and observable: the forwarder exits after ``--lifetime`` seconds, on SIGTERM, or when
its parent dies (PR_SET_PDEATHSIG); it writes a JSON stats file (per direction: packets and
bytes forwarded, dropped by its own loss, dropped by the queue limit, write errors, the
maximum queue depth, and the delays it applied) on SIGUSR1 and at exit. Stdlib only, so it
runs by path on any interpreter: ``python3 wan.py --help``.

Library side: :class:`WanLink` (start, configure addresses and loss, stats, stop by PID) and
:meth:`WanLink.link`, which has the signature of :func:`tests.lab.netns.link` so a lab device
can be placed behind the WAN (``World.add_device(..., link_with=wan.link)``).
"""

import argparse
import ctypes
import fcntl
import heapq
import json
import os
import random
import re
import select
import signal
import struct
import subprocess
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
DIRECTIONS = ("a_to_b", "b_to_a")


# --------------------------------------------------------------------------- scheduling core


class DelayLine:
    """One direction of the link: packets in, packets out at their due time (pure, testable).

    :param rng: a ``random.Random``; :param loss: the forwarder's own drop probability;
    :param limit: queue limit in packets (netem's ``limit``); beyond it packets are dropped.
    """

    def __init__(self, delay, jitter, rng, loss=0.0, limit=20000, reorder=False):
        if jitter < 0 or delay < jitter:
            raise ValueError("need 0 <= jitter <= delay")
        self.delay = delay
        self.jitter = jitter
        self.rng = rng
        self.loss = loss
        self.limit = limit
        self.reorder = reorder
        self._heap = []
        self._seq = 0
        self._last_due = float("-inf")
        self.stats = {
            "packets": 0,  # forwarded (written out)
            "bytes": 0,
            "dropped_loss": 0,
            "dropped_queue": 0,
            "write_errors": 0,
            "max_queue": 0,
            "delay_sum": 0.0,  # applied (due - arrival) over forwarded packets
            "delay_min": None,
            "delay_max": None,
        }

    def __len__(self):
        return len(self._heap)

    def push(self, now, packet):
        """Queue ``packet`` read at ``now``; returns its due time, or None if dropped."""
        if self.loss and self.rng.random() < self.loss:
            self.stats["dropped_loss"] += 1
            return None
        if len(self._heap) >= self.limit:
            self.stats["dropped_queue"] += 1
            return None
        due = now + self.rng.uniform(self.delay - self.jitter, self.delay + self.jitter)
        if not self.reorder:
            due = max(due, self._last_due)
            self._last_due = due
        heapq.heappush(self._heap, (due, self._seq, now, packet))
        self._seq += 1
        if len(self._heap) > self.stats["max_queue"]:
            self.stats["max_queue"] = len(self._heap)
        return due

    def next_due(self):
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now):
        """Yield the packets due at ``now`` in due order (ties: arrival order); counted as forwarded."""
        heap = self._heap
        stats = self.stats
        while heap and heap[0][0] <= now:
            due, _, arrived, packet = heapq.heappop(heap)
            applied = due - arrived
            stats["packets"] += 1
            stats["bytes"] += len(packet)
            stats["delay_sum"] += applied
            if stats["delay_min"] is None or applied < stats["delay_min"]:
                stats["delay_min"] = applied
            if stats["delay_max"] is None or applied > stats["delay_max"]:
                stats["delay_max"] = applied
            yield packet


# --------------------------------------------------------------------------- the forwarder process


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def setns(path):
    """Move this process (thread) into the network namespace at ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if hasattr(os, "setns"):  # Python >= 3.12
            os.setns(fd, CLONE_NEWNET)
        elif _libc().setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, "setns(%s): %s" % (path, os.strerror(err)))
    finally:
        os.close(fd)


def open_tun(name):
    """Create tun device ``name`` (IFF_TUN | IFF_NO_PI: raw IP packets) in the current netns."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    except BaseException:
        os.close(fd)
        raise
    return fd


class Forwarder:
    def __init__(self, fds, lines, stats_path, lifetime, batch=256):
        self.fds = fds  # (fd_a, fd_b)
        self.lines = lines  # (DelayLine a->b, DelayLine b->a)
        self.stats_path = stats_path
        self.deadline = time.monotonic() + lifetime
        self.batch = batch
        self.running = True
        self.started = time.monotonic()
        self.snapshots = 0
        self.exit_reason = None

    def write_stats(self, final=False):
        self.snapshots += 1
        out = {
            "pid": os.getpid(),
            "seq": self.snapshots,
            "final": final,
            "exit_reason": self.exit_reason,
            "uptime": time.monotonic() - self.started,
            "queued": {name: len(line) for name, line in zip(DIRECTIONS, self.lines)},
        }
        for name, line in zip(DIRECTIONS, self.lines):
            s = dict(line.stats)
            s["delay_mean"] = s["delay_sum"] / s["packets"] if s["packets"] else None
            out[name] = s
        if not self.stats_path:
            return
        tmp = "%s.%d.tmp" % (self.stats_path, os.getpid())
        with open(tmp, "w") as f:
            json.dump(out, f)
        os.replace(tmp, self.stats_path)

    def _read(self, direction):
        fd = self.fds[direction]
        line = self.lines[direction]
        for _ in range(self.batch):
            try:
                packet = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError as e:  # EIO/EBADFD: the interface went away
                self.exit_reason = "read %s: %s" % ("ab"[direction], e)
                self.running = False
                return
            line.push(time.monotonic(), packet)

    def _flush(self, now):
        for direction in (0, 1):
            out = self.fds[1 - direction]
            line = self.lines[direction]
            for packet in line.pop_due(now):
                try:
                    os.write(out, packet)
                except OSError:  # EIO while the far interface is down, ENOBUFS…: a lost packet
                    line.stats["write_errors"] += 1

    def run(self):
        ep = select.epoll()
        for fd in self.fds:
            ep.register(fd, select.EPOLLIN)
        index = {fd: i for i, fd in enumerate(self.fds)}
        try:
            while self.running:
                now = time.monotonic()
                if now >= self.deadline:
                    self.exit_reason = "lifetime"
                    break
                self._flush(now)
                dues = [d for d in (line.next_due() for line in self.lines) if d is not None]
                timeout = min([1.0, self.deadline - now] + [d - now for d in dues])
                for fd, _ in ep.poll(max(0.0, timeout)):
                    self._read(index[fd])
        finally:
            ep.close()
        if self.exit_reason is None:
            self.exit_reason = "signal"
        self.write_stats(final=True)


def serve(args):
    if args.seed is not None:
        rng = random.Random(args.seed)
    else:
        rng = random.Random()
    try:
        _libc().prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    fd_a = open_tun(args.dev_a)
    home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(args.netns_b)
        fd_b = open_tun(args.dev_b)
    finally:
        # Back home: ``ip netns pids B`` must not list us, and the process belongs to ns A.
        if hasattr(os, "setns"):
            os.setns(home, CLONE_NEWNET)
        elif _libc().setns(home, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back failed")
        os.close(home)
    lines = tuple(
        DelayLine(args.delay, args.jitter, rng, loss=args.loss, limit=args.limit, reorder=args.reorder)
        for _ in DIRECTIONS
    )
    fwd = Forwarder((fd_a, fd_b), lines, args.stats, args.lifetime)

    def stop(signum, frame):
        fwd.running = False
        fwd.exit_reason = "signal %d" % signum

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGUSR1, lambda signum, frame: fwd.write_stats())
    fwd.write_stats()
    if args.ready:
        with open(args.ready + ".tmp", "w") as f:
            f.write("%d\n" % os.getpid())
        os.replace(args.ready + ".tmp", args.ready)
    fwd.run()
    return 0


# --------------------------------------------------------------------------- measuring helpers (CLI)

_PING_ID = None


def _csum(b):
    b += b"\0" * (len(b) % 2)
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def ping(target, count, interval, timeout):
    """ICMP echo ``count`` times, one every ``interval`` s (not waiting for replies); RTTs in s."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    sent = {}
    rtts = {}
    start = time.monotonic()
    next_send = start
    seq = 0
    end = start + (count - 1) * interval + timeout
    while True:
        now = time.monotonic()
        if seq < count and now >= next_send:
            seq += 1
            payload = struct.pack("!d", now) + b"pocketproxy-wan"
            hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
            sock.sendto(struct.pack("!BBHHH", 8, 0, _csum(hdr + payload), ident, seq) + payload, (target, 0))
            sent[seq] = now
            next_send += interval
            continue
        if now >= end or (seq == count and len(rtts) == count):
            break
        wait = min(end, next_send if seq < count else end) - now
        if not select.select([sock], [], [], max(0.0, wait))[0]:
            continue
        data, (src, _) = sock.recvfrom(65535)
        arrived = time.monotonic()
        ihl = (data[0] & 0x0F) * 4
        typ, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl : ihl + 8])
        if typ == 0 and rid == ident and src == target and rseq in sent and rseq not in rtts:
            rtts[rseq] = arrived - sent[rseq]
    sock.close()
    values = [rtts[k] for k in sorted(rtts)]
    return {"sent": count, "received": len(values), "rtts": values}


def udp_flood(target, port, count, rate):
    """Send ``count`` small UDP datagrams at about ``rate`` per second (loss counting fodder)."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    start = time.monotonic()
    for i in range(count):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sock.sendto(b"wan-loss %d" % i, (target, port))
    sock.close()
    return {"sent": count, "seconds": time.monotonic() - start}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("serve", help="run the forwarder (started inside ns A)")
    p.add_argument("--dev-a", required=True, help="tun name to create in the current netns")
    p.add_argument("--netns-b", required=True, help="path of ns B, e.g. /run/netns/NAME")
    p.add_argument("--dev-b", required=True, help="tun name to create in ns B")
    p.add_argument("--delay", type=float, default=0.3, help="one-way delay, seconds")
    p.add_argument("--jitter", type=float, default=0.1, help="uniform ± jitter, seconds")
    p.add_argument("--loss", type=float, default=0.0, help="forwarder's own drop probability per packet")
    p.add_argument("--limit", type=int, default=20000, help="queue limit per direction, packets")
    p.add_argument("--reorder", action="store_true", help="independent delays (packets may overtake)")
    p.add_argument("--seed", type=int)
    p.add_argument("--lifetime", type=float, default=900.0, help="exit after this many seconds")
    p.add_argument("--stats", help="JSON stats file (written on SIGUSR1 and at exit)")
    p.add_argument("--ready", help="file written once both tun devices exist")
    p = sub.add_parser("ping", help="ICMP echo with RTTs (JSON)")
    p.add_argument("target")
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=3.0)
    p = sub.add_parser("udpflood", help="send small UDP datagrams (JSON)")
    p.add_argument("target")
    p.add_argument("--port", type=int, default=9)
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--rate", type=float, default=2000.0)
    args = parser.parse_args(argv)
    if args.mode == "serve":
        return serve(args)
    if args.mode == "ping":
        print(json.dumps(ping(args.target, args.count, args.interval, args.timeout)))
    else:
        print(json.dumps(udp_flood(args.target, args.port, args.count, args.rate)))
    return 0


# --------------------------------------------------------------------------- library side (the lab)

HERE = os.path.abspath(__file__)


class WanLink:
    """A WAN between two lab namespaces: the forwarder process plus loss rules, stopped by PID.

    Usage: ``wan = WanLink(directory, delay=0.3, jitter=0.1, loss=0.03)``; then
    ``wan.link(ns_a, addr_a, ns_b, addr_b)`` (the :func:`tests.lab.netns.link` signature)
    builds it; :meth:`close` stops the forwarder (its tun devices disappear with it) and
    returns the final stats. The forwarder is started with ``ns_a.popen``, so destroying
    ``ns_a`` stops it as well.
    """

    def __init__(self, directory, delay=0.3, jitter=0.1, loss=0.0, forwarder_loss=0.0, reorder=False,
                 limit=20000, lifetime=900.0, seed=None, python=None):
        self.directory = str(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.delay, self.jitter, self.loss = delay, jitter, loss
        self.forwarder_loss = forwarder_loss
        self.reorder = reorder
        self.limit = limit
        self.lifetime = lifetime
        self.seed = seed
        self.python = python or sys.executable
        self.stats_path = os.path.join(self.directory, "wan-stats.json")
        self.log_path = os.path.join(self.directory, "wan.log")
        self.proc = None
        self.ns_a = self.ns_b = None
        self.dev_a = self.dev_b = None
        self.final_stats = None
        self._loss_rules = []  # (ns, dev, probability)

    def argv(self, dev_a, ns_b, dev_b, ready):
        argv = [
            self.python, HERE, "serve",
            "--dev-a", dev_a, "--netns-b", "/run/netns/%s" % ns_b.name, "--dev-b", dev_b,
            "--delay", repr(self.delay), "--jitter", repr(self.jitter), "--loss", repr(self.forwarder_loss),
            "--limit", str(self.limit), "--lifetime", repr(self.lifetime),
            "--stats", self.stats_path, "--ready", ready,
        ]
        if self.reorder:
            argv.append("--reorder")
        if self.seed is not None:
            argv += ["--seed", str(self.seed)]
        return argv

    def link(self, ns_a, addr_a, ns_b, addr_b, prefixlen=24):
        """Start the forwarder, address both tun ends, apply the loss; returns (dev_a, dev_b)."""
        from tests.lab.netns import unique_name, wait_for

        if self.proc is not None:
            raise RuntimeError("this WanLink is already started")
        self.ns_a, self.ns_b = ns_a, ns_b
        self.dev_a, self.dev_b = unique_name("wan"), unique_name("wan")
        ready = os.path.join(self.directory, "wan.ready")
        for path in (ready, self.stats_path):
            if os.path.exists(path):
                os.unlink(path)
        with open(self.log_path, "ab") as log:
            self.proc = ns_a.popen(
                self.argv(self.dev_a, ns_b, self.dev_b, ready),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )

        def up():
            if self.proc.poll() is not None:
                raise AssertionError("WAN forwarder exited (%s):\n%s" % (self.proc.returncode, self._log_tail()))
            return os.path.exists(ready)

        wait_for(up, 15, what="WAN forwarder tun devices")
        for ns, dev, addr in ((ns_a, self.dev_a, addr_a), (ns_b, self.dev_b, addr_b)):
            # IPv4 only: no IPv6 link-local chatter (RS, MLD) on the WAN, so the forwarder's
            # packet counts equal the kernel's IPv4 counters.
            ns.run("sysctl", "-qw", "net.ipv6.conf.%s.disable_ipv6=1" % dev, check=False)
            ns.run("ip", "addr", "add", "%s/%d" % (addr, prefixlen), "dev", dev)
            ns.run("ip", "link", "set", dev, "up")
        if self.loss:
            self.set_loss(self.loss)
        return self.dev_a, self.dev_b

    def _log_tail(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-3000:]
        except FileNotFoundError:
            return ""

    # -- loss in the kernel (iptables statistic), per ingress side

    def _rules(self, dev, probability):
        count = ["-i", dev, "-m", "comment", "--comment", "pp-wan-seen"]
        drop = ["-i", dev, "-m", "statistic", "--mode", "random", "--probability", "%.6f" % probability,
                "-m", "comment", "--comment", "pp-wan-loss", "-j", "DROP"]
        return [count, drop]

    def set_loss(self, probability):
        """Replace the loss rules: ``probability`` per packet and direction (0 removes them)."""
        for ns, dev, old in self._loss_rules:
            for rule in self._rules(dev, old):
                ns.run("iptables", "-w", "-t", "raw", "-D", "PREROUTING", *rule, check=False)
        self._loss_rules = []
        self.loss = probability
        if not probability:
            return
        for ns, dev in ((self.ns_a, self.dev_a), (self.ns_b, self.dev_b)):
            for rule in self._rules(dev, probability):
                ns.run("iptables", "-w", "-t", "raw", "-A", "PREROUTING", *rule)
            self._loss_rules.append((ns, dev, probability))

    def loss_counters(self):
        """``{"a": {"seen": n, "dropped": m}, "b": {...}}``: packets the WAN delivered to each
        side's ingress and how many of them the statistic rule dropped (kernel counters)."""
        out = {}
        for side, ns, dev in (("a", self.ns_a, self.dev_a), ("b", self.ns_b, self.dev_b)):
            text = ns.run("iptables-save", "-c", "-t", "raw").stdout
            counts = {"seen": 0, "dropped": 0}
            for line in text.splitlines():
                m = re.match(r"\[(\d+):(\d+)\] -A PREROUTING -i (\S+) .*--comment (\S+)", line)
                if not m or m.group(3) != dev:
                    continue
                key = {"pp-wan-seen": "seen", "pp-wan-loss": "dropped"}.get(m.group(4).strip('"'))
                if key:
                    counts[key] += int(m.group(1))
            out[side] = counts
        return out

    # -- forwarder stats and lifecycle

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def read_stats(self):
        try:
            with open(self.stats_path) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return None

    def stats(self, timeout=5):
        """A fresh stats snapshot from the running forwarder (SIGUSR1), or the final one."""
        if not self.running:
            return self.final_stats or self.read_stats()
        before = (self.read_stats() or {}).get("seq", 0)
        os.kill(self.proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            current = self.read_stats()
            if current and current.get("seq", 0) > before:
                return current
            time.sleep(0.02)
        raise AssertionError("WAN forwarder wrote no stats within %ss" % timeout)

    def close(self):
        """Remove the loss rules, stop the forwarder by PID; returns its final stats. Safe twice."""
        try:
            if self._loss_rules:
                self.set_loss(0)
        except Exception:
            pass
        if self.proc is not None and self.ns_a is not None:
            self.ns_a.stop(self.proc, timeout=5)
            stats = self.read_stats()
            if stats and stats.get("final"):
                self.final_stats = stats
        return self.final_stats

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__":
    sys.exit(main())
