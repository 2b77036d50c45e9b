"""The benchmark harness works end to end (tiny sizes, every mode and section; no speed is judged)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.privileged

FAST = {"node, on-node plaintext", "+ splice", "+ splice + skb", "+ splice + skb + loopback"}


def test_the_benchmark_harness_runs_every_mode_and_section_and_writes_its_report(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = tmp_path.iterdir()
    results = json.loads((run / "results.json").read_text())
    traffic = results["traffic"]
    assert {r["mode"] for r in traffic} == {"none", "node", "sidecar", "haproxy", "node, 1 process"} | FAST
    assert all(r.get("rps", r.get("mib_per_s", r.get("p99_ms"))) for r in traffic)
    meshed = [r for r in traffic if r["mode"] != "none"]
    # CPU per request (per MiB for bulk) for every mode with a mesh; 0 is possible where the kernel spliced
    assert all(r.get("cpu_us_per_request", r.get("cpu_ms_per_mib")) is not None and r["rss_load_mib"] > 0
               for r in meshed)
    assert {(r["mode"], r["pods"]) for r in results["cost"]} == {(m, n) for m in ("node", "sidecar") for n in (1, 3)}
    assert {r["mode"] for r in results["noisy"]} == {"quiet", "attacked", "floor"}  # floor: the attack refused in the kernel
    assert all(r["ok"] and r["agent_rss_peak_mib"] > 0 for r in results["noisy"])
    assert any(r.get("attack_short_ok") for r in results["noisy"])
    phases = [r for r in results["soak"] if r["workload"].startswith("phase")]
    assert len(phases) == 2 and all(r["requests"] and r["rss_mib"] > 0 for r in phases)
    # each soak row says what the agents hold (/debug/memory), the last after malloc_trim
    assert all(r["memory"]["heap_in_use_kib"] > 0 and r["memory"]["metric_samples"] > 0 for r in phases)
    assert results["soak"][-1]["memory"]["trim_rss_after_kib"] > 0
    # every row's report trims too (the RSS floor), and carries the agents' handshake counters
    assert all(r["memory"]["trim_rss_after_kib"] > 0 and r["refusals"] for r in phases)
    costs = [r for r in results["conncost"] if r["workload"] == "memory per connection"]
    assert {r["mode"] for r in costs} == {"idle-detecting", "idle-keepalive", "slowloris", "half-handshake"}
    bounds = [r for r in results["conncost"] if r["workload"] == "held at the default limit"]
    # the proxy's own count is the bound (the client may also see connections in the kernel's accept queue)
    assert all(r["in_proxy"] <= r["default_limit"] for r in bounds) and len(bounds) == 4
    report = (run / "results.md").read_text()
    for title in ("### Traffic", "### CPU of the mesh", "### Memory of the mesh under load", "### Kernel fast paths",
                  "### Worker processes", "### Cost as pods", "### Noisy neighbour", "### Soak",
                  "### Memory per held connection", "kept free MiB", "malloc_trim(0) in every process",
                  "RSS after, then trimmed MiB", "tls_handshakes_total"):
        assert title in report
    assert {p.name for p in run.glob("*.png")} == {"latency.png", "memory.png", "throughput.png"}
