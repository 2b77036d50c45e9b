"""What the lab benchmarks share: processes in pods, the servers under test, the HAProxy
reference chain, the load generators, and the meters of the mesh's CPU and memory."""

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from nodeagent import cgroups
from nodeagent.identity import ca, naming
from nodeagent.lab import lab as lab_ops
from nodeagent.lab import pods

from benchmarks import haproxy

CLK_TCK = os.sysconf("SC_CLK_TCK")
PATHS = {"same-node": "http-n0-0", "cross-node": "http-n1-0"}
CLIENT = "client-n0-0"
RSS_SAMPLE_S = 0.1


# --- processes in pods ---

def in_pod(lab, pod_name: str, argv: list[str], timeout_s: float = 300) -> str:
    pod = lab.plan.pod(pod_name)
    done = pods.run(pod, lab.pod_cgroup(pod), argv, timeout_s=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} in {pod_name} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


def start_in_pod(lab, pod_name: str, argv: list[str], log: str) -> subprocess.Popen:
    pod = lab.plan.pod(pod_name)
    return pods.start(pod, lab.pod_cgroup(pod), argv, lab_ops.STATE_DIR / "logs" / log)


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


# --- meters ---

def mesh_pids(lab, extra: list[int] = (), node: str | None = None) -> list[int]:
    """The mesh's processes: every agent, sidecar and worker (or one node's agent), plus `extra`."""
    agents = lab.cgroup_root / "agents" / (node or "")
    return (cgroups.pids_in(agents) if agents.exists() else []) + list(extra)


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


class PeakRss:
    """The largest summed RSS of some processes while the block runs (sampled every 0.1 s)."""

    def __init__(self, pids):
        self.pids = pids  # a list, or a callable giving one (processes may come and go)
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            pids = self.pids() if callable(self.pids) else self.pids
            self.peak = max(self.peak, rss_mib(pids))
            if self._stop.wait(RSS_SAMPLE_S):
                return

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measured(lab, mode: str, path: str, workload: str, run, extra: list[int]) -> dict:
    """One run of a workload with what the mesh's processes spent on it: CPU (and CPU per
    request or per MiB) and peak resident memory while it ran."""
    pids = mesh_pids(lab, extra)
    cpu_before, wall = cpu_seconds(pids), time.monotonic()
    with PeakRss(lambda: mesh_pids(lab, extra)) as peak:
        result = run()
    row = {"mode": mode, "path": path, "workload": workload, **result, "wall_s": round(time.monotonic() - wall, 3)}
    if pids:
        cpu = cpu_seconds(mesh_pids(lab, extra)) - cpu_before
        row.update(mesh_cpu_s=round(cpu, 3), rss_load_mib=peak.peak)
        if result.get("requests"):
            row["cpu_us_per_request"] = round(cpu * 1e6 / result["requests"], 1)
        elif result.get("mib"):
            row["cpu_ms_per_mib"] = round(cpu * 1e3 / result["mib"], 2)
    print(f"  {mode:26} {path:10} {workload}: {_brief(row)}", flush=True)
    return row


def _brief(row: dict) -> str:
    keys = ("rps", "mib_per_s", "p99_ms", "cpu_us_per_request", "cpu_ms_per_mib", "rss_load_mib", "errors")
    return ", ".join(f"{k}={row[k]}" for k in keys if row.get(k) is not None)


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
    """nginx (HTTP/1.1 and h2c), a discard sink and a download server in each path's server pod."""
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


@contextlib.contextmanager
def serving_lab(mesh: str, pods_per_node: int = 5, agent_args=()):
    """A fresh lab of 2 nodes with the servers under test; removed afterwards, whatever happens."""
    lab_ops.down()
    saved, lab_ops.AGENT_EXTRA_ARGS = lab_ops.AGENT_EXTRA_ARGS, list(agent_args)
    try:
        lab = lab_ops.up(nodes=2, pods_per_node=pods_per_node, mesh=mesh)
        start_servers(lab)
        yield lab
    finally:
        lab_ops.AGENT_EXTRA_ARGS = saved
        lab_ops.down()


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


def targets(lab, haproxy_offsets: dict | None, path: str) -> dict[str, tuple[str, int]]:
    """Where the client aims each kind of traffic: the server itself (captured by the mesh, if
    any), or the client pod's local HAProxy for that path."""
    if haproxy_offsets is not None:
        return {name: ("127.0.0.1", port + haproxy_offsets[path]) for name, port in haproxy.LOCAL_PORTS.items()}
    ip = lab.plan.pod(PATHS[path]).ip
    return {name: (ip, port) for name, port in haproxy.APP_PORTS.items()}


# --- load generators (run in the client pod) ---

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    number, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()
    return round(float(number) * _UNITS[unit], 3)


def wrk(lab, host, port, seconds, connections, close=False, client=CLIENT) -> dict:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", f"http://{host}:{port}/"]
    if close:
        argv[1:1] = ["-H", "Connection: close"]
    out = in_pod(lab, client, argv, timeout_s=seconds + 60)
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1]),
              "requests": int(re.search(r"(\d+) requests in", out)[1])}
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
    return {"rps": float(finished[3]), "requests": requests}


def openloop(lab, host, port, rate, seconds, client=CLIENT, http2=False) -> dict:
    # Warmed up: this row is steady keep-alive traffic; connection set-up has its own row.
    argv = [sys.executable, "-m", "benchmarks.openloop", host, str(port), "--rate", str(rate), "--seconds", str(seconds),
            "--warmup"] + (["--http2", "--connections", "4"] if http2 else [])
    out = in_pod(lab, client, argv, timeout_s=seconds + 60)
    result = json.loads(out)
    return {**result, "requests": result["ok"]}


def bulk(lab, host, port, mib, direction="upload") -> dict:
    return json.loads(in_pod(lab, CLIENT, [sys.executable, "-m", "benchmarks.bulk", direction, host, str(port),
                                           "--mib", str(mib)]))
