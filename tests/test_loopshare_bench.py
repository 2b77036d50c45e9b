"""The loop-share benchmark (benchmarks/loopshare.py) runs end to end: one short run of each
variant, each serving connections and measuring the proxy's CPU and loop lag (no speed is judged)."""

import os
import subprocess
import sys

import pytest


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network namespaces")
def test_the_loop_share_benchmark_runs():
    done = subprocess.run([sys.executable, "-m", "benchmarks.loopshare", "--runs", "1", "--seconds", "1",
                           "--rate", "100"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ") and "variant" not in line]
    assert len(rows) == 8 and rows[0][0].strip() == "quiet (no attack)" and float(rows[0][1]) == 0
    for name, served, cores, p50, p99 in rows[1:]:
        assert float(served) > 0 and float(cores) > 0 and float(p99) >= float(p50) >= 0, name
