"""The loopback HTTP/2 proxy benchmark (benchmarks/h2proxy.py) runs end to end (no speed is judged)."""

import re
import subprocess
import sys


def test_the_loopback_http2_proxy_benchmark_runs():
    done = subprocess.run([sys.executable, "-m", "benchmarks.h2proxy", "--requests", "300", "--runs", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    measured = re.search(r"this checkout\s+(\d+) req/s.*proxy CPU\s+([\d.]+) us per request", done.stdout)
    assert measured and int(measured[1]) > 0 and float(measured[2]) > 0, done.stdout
