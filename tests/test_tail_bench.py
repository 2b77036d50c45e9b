"""The latency-tail benchmark (benchmarks/tail.py) runs end to end in both variants (no speed is
judged): the collector's pauses are recorded, and the tuned variant froze start-up's objects.
Needs root (it makes two network namespaces), not the lab."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
def test_the_tail_benchmark_records_the_collections_of_both_variants():
    done = subprocess.run([sys.executable, "-m", "benchmarks.tail", "--runs", "1", "--seconds", "1", "--rate", "200",
                           "--force-full-collection", "--json"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = json.loads(done.stdout)
    default, tuned = runs["default"][0], runs["tuned"][0]
    for run in (default, tuned):
        assert run["ok"] == 200 and run["errors"] == 0
        assert run["collections"][2] >= 1  # the forced full collection, timed
        assert run["malloc_trim_ms"] is None or run["malloc_trim_ms"] >= 0
    assert default["frozen_objects"] == 0 and tuned["frozen_objects"] > 10_000
    assert default["frozen_garbage_objects"] is None and tuned["frozen_garbage_objects"] >= 0
