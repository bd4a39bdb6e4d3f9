"""The benchmarks still run: tiny sizes, so a change that breaks them fails the suite, not the next bench day.

Numbers are not asserted here (benchmarks report, tests assert behaviour);
only that each benchmark completes, checks its own results ("correct: yes")
and leaves no namespace behind.
"""

import subprocess
import sys

from tests.lab.daemon import ROOT
from tests.lab.netns import require_root, require_tools


def _run(tmp_path, module, *args):
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=str(ROOT), capture_output=True, text=True, timeout=240
    )
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "correct: yes" in proc.stdout, proc.stdout[-3000:]
    # Only namespaces that were not there before count: other suites on a shared machine
    # create and delete their own while a benchmark runs.
    names = lambda text: {line.split()[0] for line in text.splitlines() if line.strip()}
    assert names(after) <= names(before), names(after) - names(before)
    return proc.stdout


def test_bench_admission_smoke(tmp_path):
    """bench-admission with a few clients completes and verifies itself."""
    require_root()
    require_tools("ipset", "iptables")
    _run(tmp_path, "tests.bench.admission", "--samples", "5", "--warmup", "2", "--storm", "20", "--population", "50",
         "--json", str(tmp_path / "admission.json"))


def test_bench_proxy_smoke(tmp_path):
    """bench-proxy --quick against pocketproxy and redsocks completes and verifies itself."""
    require_root()
    require_tools("redsocks", "iptables")
    _run(tmp_path, "tests.bench.proxy", "--quick", "--relays", "pocketproxy,redsocks")


def test_bench_scale_smoke(tmp_path):
    """bench-scale with 50 clients and 200 connections over 10 addresses, then 20 phones probed at the
    default health interval, completes and verifies itself."""
    require_root()
    require_tools("ipset", "iptables", "redsocks")
    _run(tmp_path, "tests.bench.scale", "--clients", "50", "--connections", "200", "--sources", "10", "--devices", "2",
         "--setup-count", "100", "--subprocess-samples", "5", "--health-devices", "20", "--health-window", "3",
         "--json", str(tmp_path / "scale.json"))


def test_bench_dns_smoke(tmp_path):
    """bench-dns --quick (pocketproxy over TCP and over DoH via a tinyproxy phone, dnsmasq, the origin)
    completes and verifies itself."""
    require_root()
    require_tools("dnsmasq", "tinyproxy")
    _run(tmp_path, "tests.bench.dns", "--quick", "--json", str(tmp_path / "dns.json"))


def test_bench_path_smoke(tmp_path):
    """bench-path with a 2 MiB download of the shipped variant completes and verifies itself (the
    download hashes right, the origin saw only the phone, the internet counted no leak)."""
    require_root()
    require_tools("openvpn", "danted")
    out = _run(tmp_path, "tests.bench.path", "--mib", "2", "--rounds", "1", "--requests", "2",
               "--passes", "1", "--variants", "shipped", "--json", str(tmp_path / "path.json"))
    assert "\nshipped " in out
