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
    assert after == before
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
