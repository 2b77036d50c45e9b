"""One command, every mode, interleaved rounds: `make bench` (or `python -m benchmarks.run`).

Modes: none (the physical limit: pod to pod directly), node (one nodeagent per simulated
node), sidecar (one nodeagent proxy per pod: the same code), haproxy (a sidecar chain of
HAProxy with mutual TLS, a production C proxy), and node mode's variants (kernel fast paths,
one proxy process). For each, same-node and cross-node paths: HTTP/1.1 keep-alive throughput
(wrk), open-loop latency at a fixed rate, HTTP/2 (h2load), a new connection per request,
opaque TCP bulk; per run the CPU the mesh's processes used (per request, per MiB) and their
peak RSS. Every lab variant runs once per round, rounds repeat (A B C A B C ...), and each
report row is the median of its runs with min-max (rounds.py). Then the cost side (memory and
start-up as pods per node grow, the time to enrol a pod), the noisy neighbour (noisy.py), the
soak (soak.py) and memory per held connection (conncost.py).

Sizes: `--smoke` (the CI run: it checks the harness, it measures nothing), else the full
sizes; any size can be set with an environment variable `BENCH_<NAME>` (e.g. BENCH_ROUNDS=3
BENCH_SECONDS=2). Writes results/<stamp>/results.json (every run), results.md and PNG plots.
"""

import argparse
import json
import os
import platform
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from nodeagent.lab import lab as lab_ops

from benchmarks import conncost, inlab, noisy, report, soak
from benchmarks.inlab import bulk, h2load, measured, openloop, wrk
from benchmarks.rounds import schedule

ROOT = Path(__file__).resolve().parent
ENROL_TIMEOUT_S = 60
MODES = ("none", "node", "sidecar", "haproxy")


@dataclass(frozen=True)
class Sizes:
    rounds: int
    seconds: float
    rate: int
    mib: int
    h2_requests: int
    pods: tuple[int, ...]
    noisy_seconds: float
    noisy_rate: int  # the victim's requests per second, per protocol and path
    attack_rate: int  # the attacker's new connections per second
    attack_idle: int
    attack_slowloris: int
    soak_phases: int
    soak_seconds: float
    soak_rate: int  # HTTP/1.1 keep-alive requests per second
    soak_short_rate: int  # new HTTP/1.1 connections per second, and as many opaque ones
    soak_h2_rate: int  # HTTP/2 requests per second per client (2 clients)
    conn_count: int  # held connections per memory measurement

    @classmethod
    def of(cls, smoke: bool, env=os.environ) -> "Sizes":
        sizes = SMOKE if smoke else FULL
        changes = {}
        for f in fields(cls):
            text = env.get(f"BENCH_{f.name.upper()}")
            if text is not None:
                kind = {int: int, float: float}.get(f.type)
                changes[f.name] = tuple(int(n) for n in text.split(",")) if kind is None else kind(text)
        return cls(**{**sizes.__dict__, **changes})


FULL = Sizes(rounds=3, seconds=4.0, rate=1000, mib=256, h2_requests=20000, pods=(1, 10, 50),
             noisy_seconds=8.0, noisy_rate=100, attack_rate=355, attack_idle=400, attack_slowloris=400,
             soak_phases=15, soak_seconds=75.0, soak_rate=1400, soak_short_rate=40, soak_h2_rate=150,
             conn_count=500)
SMOKE = Sizes(rounds=1, seconds=1.0, rate=200, mib=16, h2_requests=2000, pods=(1, 3),
              noisy_seconds=2.0, noisy_rate=100, attack_rate=50, attack_idle=20, attack_slowloris=20,
              soak_phases=2, soak_seconds=3.0, soak_rate=200, soak_short_rate=20, soak_h2_rate=20,
              conn_count=50)


# --- the lab variants of the traffic section ---

def workloads(sizes: Sizes) -> dict[str, tuple[str, Callable]]:
    """id -> (the row's name, run(lab, targets) -> result)."""
    s = sizes
    return {
        "ka16": ("http1 keep-alive (wrk, 16 conns)", lambda lab, t: wrk(lab, *t["http"], s.seconds, 16)),
        "ka64": ("http1 keep-alive (wrk, 64 conns)", lambda lab, t: wrk(lab, *t["http"], s.seconds, 64)),
        "openloop": (f"http1 open-loop {s.rate}/s", lambda lab, t: openloop(lab, *t["http"], s.rate, s.seconds)),
        "h2": ("http2 (h2load, 4 conns x 10 streams)", lambda lab, t: h2load(lab, *t["h2"], s.h2_requests)),
        "close": ("http1 new connection per request (wrk)",
                  lambda lab, t: wrk(lab, *t["http"], s.seconds, 8, close=True)),
        "bulk": (f"opaque tcp bulk {s.mib} MiB", lambda lab, t: bulk(lab, *t["bulk"], s.mib)),
        "download": (f"opaque tcp download {s.mib} MiB", lambda lab, t: bulk(lab, *t["download"], s.mib, "download")),
    }


TRAFFIC = ("ka16", "openloop", "h2", "close", "bulk", "download")


@dataclass(frozen=True)
class LabVariant:
    name: str  # the report's column
    mesh: str  # the lab's mesh mode; "haproxy" is no mesh plus the HAProxy chain
    agent_args: tuple[str, ...] = ()
    workloads: tuple[str, ...] = TRAFFIC
    spliced: bool = False  # count what the kernel carried past the proxies


BASE_VARIANTS = {
    "none": LabVariant("none", "none"),
    "node": LabVariant("node", "node", workloads=TRAFFIC + ("ka64",)),  # also the default of both sections below
    "sidecar": LabVariant("sidecar", "sidecar"),
    "haproxy": LabVariant("haproxy", "haproxy"),
}
# The kernel fast paths: opaque TCP only (HTTP is handled per request in the proxy and its rows
# did not move with them); `none` and `node` come from the same rounds.
FAST = ("bulk", "download")
FAST_VARIANTS = [
    LabVariant("node, on-node plaintext", "node", ("--on-node-plaintext", "true"), FAST, True),
    LabVariant("+ splice", "node", ("--on-node-plaintext", "true", "--fast-path", "splice"), FAST, True),
    LabVariant("+ splice + skb", "node", ("--on-node-plaintext", "true", "--fast-path", "splice,skb"), FAST, True),
    LabVariant("+ splice + skb + loopback", "node",
               ("--on-node-plaintext", "true", "--fast-path", "splice,skb,loopback"), FAST, True),
]
# Worker processes: the agent alone against the default (one per core: `node`).
WORKER_VARIANTS = [LabVariant("node, 1 process", "node", ("--workers", "1"), ("ka16", "ka64", "openloop"))]


@dataclass(frozen=True)
class Choice:
    """What to run: the modes, and whether node mode's variants come along."""

    modes: tuple[str, ...] = MODES
    fast_paths: bool = True
    workers: bool = True


def lab_variants(choice: Choice) -> list[LabVariant]:
    variants = [BASE_VARIANTS[m] for m in choice.modes]
    if "node" in choice.modes:
        variants += (FAST_VARIANTS if choice.fast_paths else []) + (WORKER_VARIANTS if choice.workers else [])
    return variants


def run_variant(variant: LabVariant, sizes: Sizes, round_: int) -> list[dict]:
    """One lab, every workload of the variant on both paths, then the lab is gone."""
    mesh = "none" if variant.mesh == "haproxy" else variant.mesh
    with inlab.serving_lab(mesh, agent_args=variant.agent_args) as lab:
        offsets, extra = inlab.start_haproxy_chain(lab) if variant.mesh == "haproxy" else (None, [])
        catalog, rows = workloads(sizes), []
        for path in inlab.PATHS:
            t = inlab.targets(lab, offsets, path)
            for key in variant.workloads:
                name, run = catalog[key]
                before = spliced_bytes(lab) if variant.spliced else 0
                row = measured(lab, variant.name, path, name, lambda: run(lab, t), extra)
                if variant.spliced:
                    time.sleep(0.3)  # a connection is counted once the proxy has closed its ends
                    row["spliced_mib"] = round((spliced_bytes(lab) - before) / 2 ** 20, 1)
                rows.append({**row, "round": round_})
        return rows


def traffic(sizes: Sizes, choice: Choice) -> list[dict]:
    rows = []
    for round_, variant in schedule(lab_variants(choice), sizes.rounds):
        print(f"traffic, round {round_ + 1}/{sizes.rounds}: {variant.name}", flush=True)
        rows += run_variant(variant, sizes, round_)
    return rows


def spliced_bytes(lab) -> int:
    """What the kernel carried past the proxies in this variant (from the agents' metrics)."""
    total = 0
    for node in lab.plan.nodes:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.admin_port}/stats", timeout=5) as response:
            # outbound series only: an on-node hop counts the same bytes for the destination's inbound too
            total += sum(c["value"] for c in json.load(response)["counters"]
                         if c["name"] == "tcp_spliced_bytes_total" and c["labels"].get("direction") == "outbound")
    return int(total)


# --- cost ---

def cost_section(sizes: Sizes, choice: Choice) -> list[dict]:
    variants = [(mode, count) for count in sizes.pods for mode in choice.modes if mode in ("node", "sidecar")]
    rows = []
    for round_, (mode, count) in schedule(variants, sizes.rounds):
        print(f"cost, round {round_ + 1}/{sizes.rounds}: {mode} with {count} pods", flush=True)
        rows.append({**cost(mode, count), "round": round_})
    return rows


def cost(mode: str, pod_count: int) -> dict:
    """Memory and start-up of the mesh for one node with `pod_count` pods; time to enrol one more."""
    lab_ops.down()
    lab = lab_ops.up(nodes=1, pods_per_node=pod_count, mesh="none")
    try:
        inlab.write_identity()
        start = time.monotonic()
        if mode == "node":
            lab_ops.start_agent(lab, lab.plan.nodes[0])
            ports = [lab.plan.nodes[0].admin_port]
        else:
            meshed = lab_ops.meshed_pods(lab)
            for pod in meshed:
                lab_ops.start_sidecar(lab, pod)
            ports = [lab_ops.sidecar_admin_port(lab, pod) for pod in meshed]
        for port in ports:
            inlab.wait_http(f"http://127.0.0.1:{port}/ready", timeout_s=600)
        startup = time.monotonic() - start
        time.sleep(1.0)  # settle: the loader processes have exited, pools are idle
        rss = inlab.rss_mib(inlab.mesh_pids(lab))
        enrol_ms = enrol_time_ms(lab) if mode == "node" else None
        return {"mode": mode, "pods": pod_count, "processes": len(inlab.mesh_pids(lab)), "rss_mib": rss,
                "startup_s": round(startup, 2), "enrol_ms": enrol_ms}
    finally:
        lab_ops.down()


def enrol_time_ms(lab) -> float:
    """From a pod's opt-in label changing to the agent serving it."""
    pod = lab.plan.pods[0]
    port = lab.plan.nodes[0].admin_port

    def served() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as response:
            return any(p["pod"] == f"{pod.namespace}/{pod.name}" for p in json.load(response)["pods"])

    def wait(until: bool, step_s: float) -> None:
        deadline = time.monotonic() + ENROL_TIMEOUT_S
        while served() != until:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{pod.name}: still {'not ' if until else ''}served after {ENROL_TIMEOUT_S} s")
            time.sleep(step_s)

    lab_ops.label(pod.name, "nodeagent.io/mesh=disabled")
    wait(False, 0.01)
    start = time.monotonic()
    lab_ops.label(pod.name, "nodeagent.io/mesh=enabled")
    wait(True, 0.005)
    return round((time.monotonic() - start) * 1000, 1)


def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    return {"kernel": platform.release(), "cpu": cpu, "cores": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1),
            "python": platform.python_version()}


# Sections in the order they run; each is (sizes, choice) -> runs (each run a flat dict with a
# "round"). A new section (e.g. an upgrade under load) is one entry here; report.py shows a
# section it has no table for generically.
SECTIONS = {
    "traffic": traffic,
    "cost": cost_section,
    "noisy": noisy.section,
    "soak": soak.section,
    "conncost": conncost.section,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that the harness works")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"any of {', '.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--no-fast-paths", action="store_true", help="skip the kernel fast path variants")
    parser.add_argument("--no-workers", action="store_true", help="skip the worker processes variant")
    args = parser.parse_args()
    sizes = Sizes.of(args.smoke)
    choice = Choice(tuple(args.modes.split(",")), not args.no_fast_paths, not args.no_workers)
    sections = args.sections.split(",")
    if unknown := [s for s in sections if s not in SECTIONS] + [m for m in choice.modes if m not in MODES]:
        parser.error(f"unknown section or mode: {', '.join(unknown)}")
    out = args.out / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    results = {"machine": machine(), "smoke": args.smoke, "sizes": sizes.__dict__, "modes": list(choice.modes),
               **{name: [] for name in SECTIONS}}
    started = time.monotonic()

    def keep() -> None:  # after each part: a run cut short still leaves what it measured
        (out / "results.json").write_text(json.dumps(results, indent=1))

    try:
        for name in sections:
            print(f"== {name}", flush=True)
            part = time.monotonic()
            results[name] = SECTIONS[name](sizes, choice)
            results.setdefault("section_s", {})[name] = round(time.monotonic() - part, 1)
            keep()
    finally:
        lab_ops.down()
    results["duration_s"] = round(time.monotonic() - started, 1)
    keep()
    (out / "results.md").write_text(report.markdown(results))
    report.plots(results, out)
    print(f"results in {out} ({results['duration_s']} s)")


if __name__ == "__main__":
    main()
