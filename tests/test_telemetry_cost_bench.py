"""The telemetry cost benchmark (benchmarks/telemetry_cost.py) runs end to end: every configuration
measured, its lines and spans where they should be (no speed is judged)."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network namespaces")
def test_the_telemetry_cost_benchmark_runs(tmp_path):
    out = tmp_path / "cost.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.telemetry_cost", "--seconds", "1", "--runs", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    rows = {row["config"]: row for row in json.loads(out.read_text())["summary"]}
    assert all(row["cpu_us_per_request"] > 0 and row["rps"] > 0 for row in rows.values())
    assert rows["off"]["lines_per_request"] == 0 and rows["off"]["spans_per_request"] == 0
    assert rows["access log only"]["lines_per_request"] >= 1.9  # a line per hop, two hops
    assert rows["tracing only, 100%"]["spans_per_request"] >= 1.9
    assert rows["tracing only, 1%"]["spans_per_request"] < 0.5
    assert "| on, 100% sampled |" in done.stdout
