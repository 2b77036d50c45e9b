"""The benchmark harness works end to end (tiny sizes, every mode; no speed is judged)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.privileged


def test_the_benchmark_harness_runs_every_mode_and_writes_its_report(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = tmp_path.iterdir()
    results = json.loads((run / "results.json").read_text())
    modes = {r["mode"] for r in results["traffic"]}
    assert modes == {"none", "node", "sidecar", "haproxy"}
    assert all(r.get("rps", r.get("mib_per_s", r.get("p99_ms"))) for r in results["traffic"])
    assert {(r["mode"], r["pods"]) for r in results["cost"]} == {(m, n) for m in ("node", "sidecar") for n in (1, 3)}
    report = (run / "results.md").read_text()
    assert "| workload | path |" in report and "### Kernel fast paths" in report
    variants = {r["mode"] for r in results["fast_paths"]}
    assert variants == {"none", "node", "node, on-node plaintext", "+ splice", "+ splice + skb",
                        "+ splice + skb + loopback"}
    assert all(r.get("mib_per_s", r.get("rps", r.get("p99_ms"))) for r in results["fast_paths"])
    assert {r["mode"] for r in results["workers"]} == {"node, 1 process", "node, 1 per core"}
    assert all(len(r["runs"]) == 3 for r in results["workers"]) and "### Worker processes" in report
    assert {p.name for p in run.glob("*.png")} == {"latency.png", "memory.png", "throughput.png"}
