"""`nodeagent demo`: a 2-node lab with one agent per node, traffic of each
kind through the mesh, a summary, and teardown (also on Ctrl-C)."""

import json
import statistics
import sys
import time
import urllib.request

from rich.console import Console
from rich.table import Table

from nodeagent.lab import lab as lab_ops
from nodeagent.lab import pods
from nodeagent.lab.plan import WORKLOAD_BY_KIND
from nodeagent.observe import admin_client, aggregate, views

KINDS = ("http", "h2c", "echo", "banner")
# An address outside the lab (TEST-NET-2, never routed): a pod must not reach it.
OUTSIDE = "198.51.100.1"
BALANCED_REQUESTS = 200

LATENCIES = """
import http.client, json, time, collections
conn = http.client.HTTPConnection({vip!r}, 80, timeout=10)
latencies, served, ok = [], collections.Counter(), 0
for _ in range({n}):
    start = time.perf_counter()
    conn.request("GET", "/")
    response = conn.getresponse(); response.read()
    latencies.append((time.perf_counter() - start) * 1000)
    served[response.getheader("x-pod")] += 1
    ok += response.status == 200
print(json.dumps({{"latencies": latencies, "served": served, "ok": ok}}))
"""


def _run_python(lab: lab_ops.Lab, pod_name: str, argv: list[str]) -> str:
    pod = lab.plan.pod(pod_name)
    return pods.run(pod, lab.pod_cgroup(pod), [sys.executable, *argv], timeout_s=60).stdout


def _probe(lab: lab_ops.Lab, client: str, kind: str, host: str, port: int) -> dict:
    out = _run_python(lab, client, ["-m", "nodeagent.lab.client", kind, host, str(port)])
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        return {"kind": kind, "ok": False, "detail": out.strip()[-200:] or "no output", "ms": 0}


OUTSIDE_GET = """
import http.client
try:
    conn = http.client.HTTPConnection({host!r}, 80, timeout=5)
    conn.request("GET", "/")
    response = conn.getresponse()
    print(f"HTTP {{response.status}} from the pod's proxy: {{response.getheader('nodeagent-proxy-error')}}")
except OSError as e:
    print(f"{{type(e).__name__}}: {{e.strerror or e}}")
"""


def _outside_blocked(lab: lab_ops.Lab, client: str) -> str:
    """An HTTP GET from a meshed pod to an address outside the lab. The pod's
    connect succeeds (to its proxy, in the pod); the proxy's own connect, made
    inside the pod's namespace, finds no route, so nothing leaves."""
    return _run_python(lab, client, ["-c", OUTSIDE_GET.format(host=OUTSIDE)]).strip()


def _scrape(admins: list[str]) -> dict:
    return aggregate.totals_by_destination([s for admin in admins for s in admin_client.scrape(admin)])


def _agent_status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as response:
        return json.load(response)


def _traffic_table(lab: lab_ops.Lab) -> tuple[Table, int]:
    table = Table(title="Traffic from pod client-n0-0 (node0), through the mesh", title_justify="left")
    for column in ("PROTOCOL", "TO", "PATH", "RESULT", "MS", "DETAIL"):
        table.add_column(column, overflow="fold")
    failures = 0
    services = {s.name: s for s in lab.plan.services}
    for kind in KINDS:
        workload = WORKLOAD_BY_KIND[kind]
        service = services[kind]
        targets = [(f"svc/{kind} {service.cluster_ip}", service.cluster_ip, service.port, "balanced")]
        for node, path in (("n0", "same node"), ("n1", "cross node")):
            pod = lab.plan.pod(f"{kind}-{node}-0")
            targets.append((pod.name, pod.ip, workload.port, path))
        for label, host, port, path in targets:
            result = _probe(lab, "client-n0-0", kind, host, port)
            failures += not result["ok"]
            table.add_row(workload.protocol, label, path, "[green]ok[/green]" if result["ok"] else "[red]FAILED[/red]",
                          f"{result['ms']:.1f}", result["detail"])
    return table, failures


# What the demo does not show, and where to find it: every command and flag named here exists.
MORE = ("More: `nodeagent stat`, `nodeagent top`, `nodeagent tap` and /metrics on each agent's admin port while a "
        "lab runs; HTTP/2 and gRPC are balanced per request like HTTP/1; `nodeagent run --workers N` spreads a "
        "node's pods over N processes, `--fast-path splice` lets the kernel carry opaque bytes past the proxy "
        "(README, Kernel fast paths).")


def run_demo(console: Console) -> None:
    console.print("[bold]nodeagent demo[/bold]: a lab of 2 simulated nodes, 5 pods each, one agent per node...")
    lab_ops.down()  # a crashed earlier run must not stop this one
    lab = lab_ops.up(nodes=2, pods_per_node=5, mesh="node")
    try:
        agents = [_agent_status(n.admin_port) for n in lab.plan.nodes]
        for node, status in zip(lab.plan.nodes, agents):
            console.print(f"agent {node.name}: ready on 127.0.0.1:{node.admin_port}, "
                          f"{len(status['pods'])} meshed pods, BPF compiled and loaded in "
                          f"{status['datapath']['compile_and_load_ms']:.0f} ms")
        table, failures = _traffic_table(lab)
        console.print(table)

        admins = [f"127.0.0.1:{n.admin_port}" for n in lab.plan.nodes]
        before, started = _scrape(admins), time.monotonic()
        result = json.loads(_run_python(lab, "client-n1-0", ["-c", LATENCIES.format(vip="10.96.0.10",
                                                                                   n=BALANCED_REQUESTS)]))
        window = time.monotonic() - started
        cuts = statistics.quantiles(result["latencies"], n=100)
        console.print(f"{BALANCED_REQUESTS} HTTP requests from client-n1-0 to svc/http on one connection: "
                      f"{result['ok']}/{BALANCED_REQUESTS} succeeded, p50 {cuts[49]:.2f} ms, p99 {cuts[98]:.2f} ms; "
                      f"balanced per request: {dict(result['served'])}")
        rows = [r for r in aggregate.stat_rows(before, _scrape(admins), window) if r.rps > 0]
        console.print(views.stat_table(rows, window, {}))

        kernel = Table(title="Kernel counters per meshed pod (read from BPF maps)", title_justify="left")
        for column in ("NODE", "POD", "REDIRECTED", "OPENED", "FAILED", "DENIED", "INBOUND STEERED"):
            kernel.add_column(column, overflow="fold")
        for node in lab.plan.nodes:
            for pod in _agent_status(node.admin_port)["pods"]:
                k = pod["kernel"]
                kernel.add_row(node.name, pod["pod"], str(k["redirected"]), str(k["opened"]), str(k["failed"]),
                               str(k["denied"]), str(k["inbound_steered"]))
        console.print(kernel)
        final = [_agent_status(n.admin_port) for n in lab.plan.nodes]
        identities = Table(title="Workload identities (mTLS between proxies)", title_justify="left")
        for column in ("NODE", "IDENTITIES HELD (24 h certificates)", "INBOUND mTLS ALLOWED", "HANDSHAKE FAILURES"):
            identities.add_column(column, overflow="fold")
        for node, status in zip(lab.plan.nodes, final):
            counters = status["counters"]
            mtls = sum(c["value"] for c in counters if c["name"] == "inbound_authorization_total"
                       and c["labels"].get("tls") == "true" and c["labels"].get("decision") == "allow")
            failures = sum(c["value"] for c in counters if c["name"] == "tls_handshake_failures_total")
            identities.add_row(node.name, "\n".join(sorted(status["identities"])), f"{mtls:.0f}", f"{failures:.0f}")
        console.print(identities)
        outside = _outside_blocked(lab, "client-n0-0")
        console.print(f"GET http://{OUTSIDE}/ (outside the lab) from client-n0-0: {outside} "
                      "(the lab has no way out).")
        console.print(MORE)
        if failures or result["ok"] != BALANCED_REQUESTS or "connect failed" not in outside:
            raise lab_ops.LabError(f"{failures} probes failed, or a pod reached outside the lab: {outside}")
    finally:
        lab_ops.down()
        console.print("lab down: every namespace, cgroup, process and BPF program of the demo is gone.")
