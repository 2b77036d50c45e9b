"""One command, every mode, one run: `make bench` (or `python -m benchmarks.run`).

Modes: none (the physical limit: pod to pod directly), node (one nodeagent per
simulated node), sidecar (one nodeagent proxy per pod: the same code), haproxy
(a sidecar chain of HAProxy with mutual TLS, a production C proxy). For each,
same-node and cross-node paths: HTTP/1.1 keep-alive throughput (wrk), open-loop
latency at a fixed rate, HTTP/2 (h2load), a new connection per request, opaque
TCP bulk; the CPU the mesh's processes used for it; then the cost side: resident
memory and start-up time as pods per node grow, and the time to enrol a pod.
Writes results/<stamp>/results.json, results.md and PNG plots.
`--smoke` is the CI run: tiny durations and sizes, it checks the harness only.
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from nodeagent import cgroups
from nodeagent.identity import ca, naming
from nodeagent.lab import lab as lab_ops
from nodeagent.lab import pods

from benchmarks import haproxy, report

ROOT = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
MODES = ("none", "node", "sidecar", "haproxy")
# The kernel fast path section: node mode with each setting (same lab layout, same workloads).
FAST_VARIANTS = {
    "none": None,
    "node": [],
    "node, on-node plaintext": ["--on-node-plaintext", "true"],
    "+ splice": ["--on-node-plaintext", "true", "--fast-path", "splice"],
    "+ splice + skb": ["--on-node-plaintext", "true", "--fast-path", "splice,skb"],
    "+ splice + skb + loopback": ["--on-node-plaintext", "true", "--fast-path", "splice,skb,loopback"],
}
# Worker processes: the agent alone, and the default (one per core). Repeated: on a 2-core VM
# shared with the load generator and the server, one run of a row moves by up to ~15%.
WORKER_VARIANTS = {"node, 1 process": ["--workers", "1"], "node, 1 per core": []}
WORKER_REPEATS = 3
PATHS = {"same-node": "http-n0-0", "cross-node": "http-n1-0"}
CLIENT = "client-n0-0"


@dataclass(frozen=True)
class Sizes:
    seconds: float
    rate: int
    mib: int
    h2_requests: int
    pods: tuple[int, ...]

    @classmethod
    def of(cls, smoke: bool) -> "Sizes":
        return cls(1.0, 200, 16, 2000, (1, 3)) if smoke else cls(5.0, 1000, 256, 50000, (1, 10, 50, 100))


# --- processes and measurements ---

def in_pod(lab, pod_name: str, argv: list[str], timeout_s: float = 300) -> str:
    pod = lab.plan.pod(pod_name)
    done = pods.run(pod, lab.pod_cgroup(pod), argv, timeout_s=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} in {pod_name} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


def start_in_pod(lab, pod_name: str, argv: list[str], log: str) -> subprocess.Popen:
    pod = lab.plan.pod(pod_name)
    return pods.start(pod, lab.pod_cgroup(pod), argv, lab_ops.STATE_DIR / "logs" / log)


def mesh_pids(lab, extra: list[int]) -> list[int]:
    agents = lab.cgroup_root / "agents"
    return (cgroups.pids_in(agents) if agents.exists() else []) + extra


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError):
            continue
    return total / CLK_TCK


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return round(total / 1024, 1)


def wait_http(url: str, timeout_s: float = 60) -> float:
    """Seconds until `url` answers 200."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            with urllib.request.urlopen(url, timeout=0.5) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{url} not ready after {timeout_s} s")


def write_identity() -> None:
    anchor = ca.Authority.new_anchor(naming.DEFAULT_TRUST_DOMAIN)
    ca.write_identity_files(lab_ops.identity_dir(), anchor, anchor.new_issuer(naming.DEFAULT_TRUST_DOMAIN))


# --- the servers under test ---

NGINX = """worker_processes 1;
pid {dir}/nginx-{pod}.pid;
error_log {dir}/nginx-{pod}.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 10000000;  # nginx would end HTTP/2 connections after 1000 requests
    server {{ listen {http}; location / {{ return 200 "ok\\n"; }} }}
    server {{ listen {h2} http2; location / {{ return 200 "ok\\n"; }} }}
}}
"""


def start_servers(lab) -> None:
    work = lab_ops.STATE_DIR / "bench"
    work.mkdir(exist_ok=True)
    for server in PATHS.values():
        conf = work / f"nginx-{server}.conf"
        conf.write_text(NGINX.format(dir=work, pod=server, http=haproxy.APP_PORTS["http"],
                                     h2=haproxy.APP_PORTS["h2"]))
        start_in_pod(lab, server, ["nginx", "-c", str(conf), "-g", "daemon off;"], f"nginx-{server}.log")
        start_in_pod(lab, server, ["socat", "-u", f"TCP-LISTEN:{haproxy.APP_PORTS['bulk']},reuseaddr,fork",
                                   "OPEN:/dev/null"], f"sink-{server}.log")
        start_in_pod(lab, server, [sys.executable, "-m", "benchmarks.bulk", "serve", str(haproxy.APP_PORTS["download"])],
                     f"download-{server}.log")
    for server in PATHS.values():
        ip = lab.plan.pod(server).ip
        code = (f"import socket, time\nfor port in {list(haproxy.APP_PORTS.values())}:\n"
                f"    for _ in range(200):\n        try: socket.create_connection(({ip!r}, port), 1).close(); break\n"
                f"        except OSError: time.sleep(0.05)")
        in_pod(lab, CLIENT, [sys.executable, "-c", code])


def start_haproxy_chain(lab) -> tuple[dict[str, int], list[int]]:
    """One client-side HAProxy per path (the client pod's sidecar toward that server), one per server."""
    work = lab_ops.STATE_DIR / "bench"
    bundle, client_pem, server_pem = haproxy.write_certificates(work / "haproxy-tls")
    processes, offsets = [], {}
    for index, (path, server) in enumerate(PATHS.items()):
        ip = lab.plan.pod(server).ip
        (work / f"haproxy-server-{server}.cfg").write_text(haproxy.server_config(ip, bundle, server_pem))
        processes.append(start_in_pod(lab, server, ["haproxy", "-db", "-f", str(work / f"haproxy-server-{server}.cfg")],
                                      f"haproxy-server-{server}.log"))
        client_cfg = haproxy.client_config(ip, bundle, client_pem)
        offsets[path] = 100 * index  # each path's client-side proxy listens on its own ports
        for port in haproxy.LOCAL_PORTS.values():
            client_cfg = client_cfg.replace(f"127.0.0.1:{port}", f"127.0.0.1:{port + offsets[path]}")
        (work / f"haproxy-client-{path}.cfg").write_text(client_cfg)
        processes.append(start_in_pod(lab, CLIENT, ["haproxy", "-db", "-f", str(work / f"haproxy-client-{path}.cfg")],
                                      f"haproxy-client-{path}.log"))
    time.sleep(0.5)
    return offsets, [p.pid for p in processes]


def targets(lab, mode: str, path: str, offsets: dict) -> dict[str, tuple[str, int]]:
    if mode == "haproxy":
        return {name: ("127.0.0.1", port + offsets[path]) for name, port in haproxy.LOCAL_PORTS.items()}
    ip = lab.plan.pod(PATHS[path]).ip
    return {name: (ip, port) for name, port in haproxy.APP_PORTS.items()}


# --- workloads ---

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    number, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()
    return round(float(number) * _UNITS[unit], 3)


def wrk(lab, host, port, seconds, connections, close=False) -> dict:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", f"http://{host}:{port}/"]
    if close:
        argv[1:1] = ["-H", "Connection: close"]
    out = in_pod(lab, CLIENT, argv, timeout_s=seconds + 60)
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])}
    for pct in ("50", "90", "99"):
        match = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        result[f"p{pct}_ms"] = _ms(match[1]) if match else None
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    result["errors"] = errors[0] if errors else None
    return result


def h2load(lab, host, port, requests) -> dict:
    out = in_pod(lab, CLIENT, ["h2load", "-n", str(requests), "-c", "4", "-m", "10", f"http://{host}:{port}/"])
    finished = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    succeeded = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", out)
    if int(succeeded[1]) != requests:
        raise RuntimeError(f"h2load: only {succeeded[1]} of {requests} requests succeeded:\n{out[-1500:]}")
    return {"rps": float(finished[3]), "succeeded": int(succeeded[1]), "requests": requests}


def openloop(lab, host, port, rate, seconds) -> dict:
    # Warmed up: this row is steady keep-alive traffic; connection set-up has its own row.
    out = in_pod(lab, CLIENT, [sys.executable, "-m", "benchmarks.openloop", host, str(port), "--rate", str(rate),
                               "--seconds", str(seconds), "--warmup"], timeout_s=seconds + 60)
    return json.loads(out)


def bulk(lab, host, port, mib, direction="upload") -> dict:
    return json.loads(in_pod(lab, CLIENT, [sys.executable, "-m", "benchmarks.bulk", direction, host, str(port),
                                           "--mib", str(mib)]))


def measured(lab, mode: str, path: str, workload: str, run, extra: list[int]) -> dict:
    """One workload's result with the CPU the mesh's processes spent on it."""
    pids = mesh_pids(lab, extra)
    cpu_before, wall = cpu_seconds(pids), time.monotonic()
    result = run()
    print(f"  {mode:8} {path:10} {workload}: {result}", flush=True)
    return {"mode": mode, "path": path, "workload": workload, **result,
            "mesh_cpu_s": round(cpu_seconds(mesh_pids(lab, extra)) - cpu_before, 3),
            "wall_s": round(time.monotonic() - wall, 3)}


def traffic(mode: str, sizes: Sizes) -> list[dict]:
    lab_ops.down()
    lab = lab_ops.up(nodes=2, pods_per_node=5, mesh="none" if mode == "haproxy" else mode)
    try:
        start_servers(lab)
        offsets, extra = start_haproxy_chain(lab) if mode == "haproxy" else ({}, [])
        results = []
        for path in PATHS:
            t = targets(lab, mode, path, offsets)
            runs = {
                "http1 keep-alive (wrk, 16 conns)": lambda: wrk(lab, *t["http"], sizes.seconds, 16),
                f"http1 open-loop {sizes.rate}/s": lambda: openloop(lab, *t["http"], sizes.rate, sizes.seconds),
                "http2 (h2load, 4 conns x 10 streams)": lambda: h2load(lab, *t["h2"], sizes.h2_requests),
                "http1 new connection per request (wrk)": lambda: wrk(lab, *t["http"], sizes.seconds, 8, close=True),
                f"opaque tcp bulk {sizes.mib} MiB": lambda: bulk(lab, *t["bulk"], sizes.mib),
                f"opaque tcp download {sizes.mib} MiB": lambda: bulk(lab, *t["download"], sizes.mib, "download"),
            }
            results += [measured(lab, mode, path, workload, run, extra) for workload, run in runs.items()]
        return results
    finally:
        lab_ops.down()


def fast_paths(sizes: Sizes) -> list[dict]:
    """Opaque bulk both ways and HTTP, in node mode with each fast-path setting, beside no mesh."""
    results = []
    saved = lab_ops.AGENT_EXTRA_ARGS
    try:
        for variant, agent_args in FAST_VARIANTS.items():
            lab_ops.down()
            lab_ops.AGENT_EXTRA_ARGS = agent_args or []
            lab = lab_ops.up(nodes=2, pods_per_node=5, mesh="none" if agent_args is None else "node")
            try:
                start_servers(lab)
                for path in PATHS:
                    t = targets(lab, "node", path, {})
                    runs = {
                        f"opaque tcp bulk {sizes.mib} MiB": lambda: bulk(lab, *t["bulk"], sizes.mib),
                        f"opaque tcp download {sizes.mib} MiB":
                            lambda: bulk(lab, *t["download"], sizes.mib, "download"),
                        "http1 keep-alive (wrk, 16 conns)": lambda: wrk(lab, *t["http"], sizes.seconds, 16),
                        f"http1 open-loop {sizes.rate}/s":
                            lambda: openloop(lab, *t["http"], sizes.rate, sizes.seconds),
                    }
                    for workload, run in runs.items():
                        before = spliced_bytes(lab) if agent_args is not None else 0
                        row = measured(lab, variant, path, workload, run, [])
                        if agent_args is not None:
                            time.sleep(0.3)  # a connection is counted once the proxy has closed its ends
                            row["spliced_mib"] = round((spliced_bytes(lab) - before) / 2 ** 20, 1)
                        results.append(row)
            finally:
                lab_ops.down()
    finally:
        lab_ops.AGENT_EXTRA_ARGS = saved
    return results


def workers(sizes: Sizes) -> list[dict]:
    """HTTP keep-alive throughput and open-loop latency with and without worker processes;
    each row is the median of WORKER_REPEATS runs (all runs kept in `runs`)."""
    results = []
    saved = lab_ops.AGENT_EXTRA_ARGS
    try:
        for variant, agent_args in WORKER_VARIANTS.items():
            lab_ops.down()
            lab_ops.AGENT_EXTRA_ARGS = agent_args
            lab = lab_ops.up(nodes=2, pods_per_node=5, mesh="node")
            try:
                start_servers(lab)
                for path in PATHS:
                    t = targets(lab, "node", path, {})
                    runs = {
                        "http1 keep-alive (wrk, 16 conns)": (lambda: wrk(lab, *t["http"], sizes.seconds, 16), "rps"),
                        "http1 keep-alive (wrk, 64 conns)": (lambda: wrk(lab, *t["http"], sizes.seconds, 64), "rps"),
                        f"http1 open-loop {sizes.rate}/s":
                            (lambda: openloop(lab, *t["http"], sizes.rate, sizes.seconds), "p99_ms"),
                    }
                    for workload, (run, key) in runs.items():
                        rows = [measured(lab, variant, path, workload, run, []) for _ in range(WORKER_REPEATS)]
                        rows.sort(key=lambda r: r[key])
                        results.append({**rows[len(rows) // 2], "runs": [r[key] for r in rows]})
            finally:
                lab_ops.down()
    finally:
        lab_ops.AGENT_EXTRA_ARGS = saved
    return results


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

def cost(mode: str, pod_count: int) -> dict:
    """Memory and start-up of the mesh for one node with `pod_count` pods; time to enrol one more."""
    lab_ops.down()
    lab = lab_ops.up(nodes=1, pods_per_node=pod_count, mesh="none")
    try:
        write_identity()
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
            wait_http(f"http://127.0.0.1:{port}/ready", timeout_s=600)
        startup = time.monotonic() - start
        time.sleep(1.0)  # settle: the loader processes have exited, pools are idle
        rss = rss_mib(mesh_pids(lab, []))
        enrol_ms = enrol_time_ms(lab) if mode == "node" else None
        return {"mode": mode, "pods": pod_count, "processes": len(mesh_pids(lab, [])), "rss_mib": rss,
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

    lab_ops.label(pod.name, "nodeagent.io/mesh=disabled")
    while served():
        time.sleep(0.01)
    start = time.monotonic()
    lab_ops.label(pod.name, "nodeagent.io/mesh=enabled")
    while not served():
        time.sleep(0.005)
    return round((time.monotonic() - start) * 1000, 1)


def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    return {"kernel": platform.release(), "cpu": cpu, "cores": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1),
            "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that the harness works")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--no-fast-paths", action="store_true", help="skip the kernel fast path section")
    parser.add_argument("--no-workers", action="store_true", help="skip the worker processes section")
    args = parser.parse_args()
    sizes = Sizes.of(args.smoke)
    modes = args.modes.split(",")
    out = args.out / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    results = {"machine": machine(), "smoke": args.smoke, "sizes": sizes.__dict__, "traffic": [], "cost": [],
               "fast_paths": [], "workers": []}
    started = time.monotonic()

    def keep() -> None:  # after each part: a run cut short still leaves what it measured
        (out / "results.json").write_text(json.dumps(results, indent=1))

    try:
        for mode in modes:
            print(f"traffic: {mode}", flush=True)
            results["traffic"] += traffic(mode, sizes)
            keep()
        if "node" in modes and not args.no_fast_paths:
            print("fast paths", flush=True)
            results["fast_paths"] = fast_paths(sizes)
            keep()
        if "node" in modes and not args.no_workers:
            print("workers", flush=True)
            results["workers"] = workers(sizes)
            keep()
        for mode in [m for m in modes if m in ("node", "sidecar")]:
            for count in sizes.pods:
                print(f"cost: {mode} with {count} pods", flush=True)
                results["cost"].append(cost(mode, count))
    finally:
        lab_ops.down()
    results["duration_s"] = round(time.monotonic() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(report.markdown(results))
    report.plots(results, out)
    print(f"results in {out}")


if __name__ == "__main__":
    main()
