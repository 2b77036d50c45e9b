"""The soak: does anything in the agents grow with traffic served? Bounded in time.

One lab in node mode (2 nodes, 5 pods each). The agents' RSS is read idle, then through
`soak_phases` phases of `soak_seconds` of mixed traffic at constant rates, all at once:
HTTP/1.1 keep-alive (`openloop.py`, same node), a new HTTP/1.1 connection per request and
short opaque TCP connections (`attack.py`, cross node: each one an mTLS tunnel), and HTTP/2
(h2load at a fixed rate, cross node). After each phase (and a short settle) the RSS again,
then after an idle pause, and last after asking each process to give glibc's free memory back
(malloc_trim, through /debug/memory?trim=1; every row's report trims too, and says each
process's RSS after it). A leak shows as RSS after each phase rising phase
over phase; the first phase is the warm-up (pools, caches and allocator arenas reach their
working size). With each RSS, each agent's /debug/memory (agent/memory.py): glibc's heap
(in use, kept free), Python's objects by type, the proxy's tables (pools, connections, metric
series, TLS sessions, ...), so the report says which of them grew. Phases and their length:
BENCH_SOAK_PHASES, BENCH_SOAK_SECONDS. With each row also the agents' refusal and failure
counters from /metrics (`REFUSALS`: which limit refused, which handshakes failed and why), so
an error of the load generators can be traced to the agent's reason.
"""

import json
import re
import sys
import threading
import time
import urllib.request
from collections import Counter

from benchmarks import haproxy, inlab

SETTLE_S = 2.0
IDLE_S = 10.0
H2_CLIENTS = 2
MEMORY_TIMEOUT_S = 30  # a report walks every Python object of every process
# The proxy's tables summed over the agents' processes, as the report's columns.
TABLES = ("connections_open", "outbound_http1_idle", "inbound_app_http1_idle", "outbound_http2_connections",
          "inbound_app_http2_connections", "tls_sessions", "metric_samples", "metric_series_per_pod",
          "problem_buckets", "access_log_queued")


def _mixed(lab, sizes) -> dict:
    """One phase: every stream at once, each bounded by the phase's length."""
    seconds, same, cross = sizes.soak_seconds, lab.plan.pod("http-n0-0").ip, lab.plan.pod("http-n1-0").ip
    echo = lab.plan.pod("echo-n1-0").ip
    out: dict[str, dict] = {}
    streams = {
        "http1_keepalive": lambda: inlab.openloop(lab, same, haproxy.APP_PORTS["http"], sizes.soak_rate, seconds),
        "http1_close": lambda: _attack(lab, cross, haproxy.APP_PORTS["http"], "http", sizes.soak_short_rate, seconds),
        "opaque_short": lambda: _attack(lab, echo, 9000, "echo", sizes.soak_short_rate, seconds),
        "http2": lambda: _h2(lab, cross, sizes.soak_h2_rate, seconds),
    }

    def one(name, run):
        try:
            out[name] = run()
        except Exception as e:  # reported in the row, the other streams go on
            out[name] = {"failed": str(e)[-300:]}

    threads = [threading.Thread(target=one, args=item) for item in streams.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    row = {}
    for name, result in out.items():
        row[f"{name}_ok"] = result.get("ok", 0)
        row[f"{name}_errors"] = result.get("errors", result.get("failed", 0))  # a count, or why it failed
    row["requests"] = sum(result.get("ok", 0) for result in out.values())
    return row


def _attack(lab, host, port, kind, rate, seconds) -> dict:
    out = inlab.in_pod(lab, inlab.CLIENT, [sys.executable, "-m", "benchmarks.attack", host, "--seconds", str(seconds),
                                           "--short-port", str(port), "--short-kind", kind, "--short-rate", str(rate)],
                       timeout_s=seconds + 60)
    result = json.loads(out)
    return {"ok": result["short_ok"], "failed": result["short_failed"] + result["short_skipped"]}


def _h2(lab, host, rate_per_client, seconds) -> dict:
    out = inlab.in_pod(lab, inlab.CLIENT, ["h2load", "-c", str(H2_CLIENTS), "-m", "10", "--rps", str(rate_per_client),
                                           "-D", str(int(seconds)), f"http://{host}:{haproxy.APP_PORTS['h2']}/"],
                       timeout_s=seconds + 60)
    match = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", out)
    return {"ok": int(match[2]), "failed": int(match[3])}


def memory(lab, trim: bool = False) -> dict:
    """Both agents' /debug/memory, summed over their processes: the heap, Python's objects, the
    tables; each process's whole report under "processes"."""
    processes = []
    for node in lab.plan.nodes:
        url = f"http://127.0.0.1:{node.admin_port}/debug/memory" + ("?trim=1" if trim else "")
        with urllib.request.urlopen(url, timeout=MEMORY_TIMEOUT_S) as response:
            processes += json.load(response)["processes"]
    out: Counter = Counter()
    types: Counter = Counter()
    for p in processes:
        out.update({f"process_{k}": v for k, v in p["process"].items()})
        out.update({f"heap_{k}": v for k, v in (p["allocator"] or {}).items() if k.endswith("_kib")})
        out.update({"heap_arenas": len((p["allocator"] or {}).get("arenas", ()))})
        out.update({"python_blocks": p["python"]["allocated_blocks"], "gc_tracked": p["python"]["gc_tracked"]})
        out.update({k: v for k, v in p["tables"].items() if k in TABLES and v is not None})
        types.update(p["python"]["types"])
        if p.get("trim"):
            out.update({"trim_rss_before_kib": p["trim"]["rss_before_kib"],
                        "trim_rss_after_kib": p["trim"]["rss_after_kib"]})
            out["trim_ms_max"] = max(out.get("trim_ms_max", 0), p["trim"].get("duration_ms", 0))
        if p.get("trims"):  # the periodic trim (agent/heap.py): how often, how long, what it gave back
            out.update({"trims": p["trims"]["count"], "trims_total_ms": p["trims"]["total_ms"],
                        "trims_released_kib": p["trims"]["released_kib"]})
            out["trims_max_ms"] = max(out.get("trims_max_ms", 0), p["trims"]["max_ms"])
    return {**out, "types": dict(types), "processes": processes}


# Counters that say why a connection failed: summed over both agents, per series (its labels).
REFUSALS = ("limit_exceeded_total", "kernel_over_limit_refused_total", "kernel_connect_failures_total",
            "kernel_inbound_refused_total", "tcp_errors_total",
            "http_errors_total", "tls_handshake_failures_total", "tls_handshakes_total", "http2_flood_total")
_SAMPLE = re.compile(r'^(\w+)(?:\{(.*)\})? ([0-9.eE+-]+)$')


def refusals(lab) -> dict[str, float]:
    """Both agents' REFUSALS counters, "name{labels}" -> value (nonzero ones only)."""
    out: Counter = Counter()
    for node in lab.plan.nodes:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.admin_port}/metrics", timeout=MEMORY_TIMEOUT_S) as r:
            for line in r.read().decode().splitlines():
                match = _SAMPLE.match(line)
                if match and match[1] in REFUSALS and float(match[3]):
                    out[f"{match[1]}{{{match[2] or ''}}}"] += float(match[3])
    return dict(out)


def _row(lab, workload: str, after_trim: bool = False, **fields) -> dict:
    # The RSS before the report: a report walks every Python object and parses glibc's XML, and
    # what that allocates stays resident until the next periodic trim (a run on 253e05c read its
    # RSS after the reports: 4-9 MiB above what each process read at the start of its own).
    # Every report also trims (each process's RSS after it: the floor the periodic trim brings it
    # back to, whatever the moment of the reading within the trim period); with `after_trim` the
    # row's RSS is the one read after that trim.
    rss = inlab.rss_mib(inlab.mesh_pids(lab))
    held = memory(lab, trim=True)
    if after_trim:
        rss = inlab.rss_mib(inlab.mesh_pids(lab))
    row = {"mode": "soak", "workload": workload, "round": 0, **fields, "rss_mib": rss, "rss_after_trim": after_trim,
           "memory": held, "refusals": refusals(lab)}
    print(f"  soak {workload}: rss {row['rss_mib']} MiB, "
          f"{ {k: v for k, v in held.items() if k not in ('types', 'processes')} }; refusals {row['refusals']}",
          flush=True)
    return row


def section(sizes, choice) -> list[dict]:
    if "node" not in choice.modes:
        return []
    with inlab.serving_lab("node") as lab:
        time.sleep(SETTLE_S)
        rows = [_row(lab, "idle, before")]
        for phase in range(sizes.soak_phases):
            cpu = inlab.cpu_seconds(inlab.mesh_pids(lab))
            with inlab.PeakRss(lambda: inlab.mesh_pids(lab)) as peak:
                mixed = _mixed(lab, sizes)
            cpu = round(inlab.cpu_seconds(inlab.mesh_pids(lab)) - cpu, 1)  # the mesh's, both cores' worth
            time.sleep(SETTLE_S)
            rows.append(_row(lab, f"phase {phase + 1}", **mixed, rss_peak_mib=peak.peak, cpu_s=cpu))
        time.sleep(IDLE_S)
        rows.append(_row(lab, f"idle, {IDLE_S:g} s after"))
        rows.append(_row(lab, "idle, after malloc_trim", after_trim=True))
    return rows
