"""`nodeagent demo`: a 2-node lab, traffic of each kind, a summary, teardown."""

import json
import sys

from rich.console import Console
from rich.table import Table

from nodeagent.lab import lab as lab_ops
from nodeagent.lab import pods
from nodeagent.lab.plan import WORKLOAD_BY_KIND

KINDS = ("http", "h2c", "echo", "banner")
# An address outside the lab (TEST-NET-2, never routed): a pod must not reach it.
OUTSIDE = "198.51.100.1"


def _probe(lab: lab_ops.Lab, client: str, kind: str, target: str) -> dict:
    source, dest = lab.plan.pod(client), lab.plan.pod(target)
    argv = [sys.executable, "-m", "nodeagent.lab.client", kind, dest.ip, str(WORKLOAD_BY_KIND[kind].port)]
    done = pods.run(source, lab.pod_cgroup(source), argv)
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"kind": kind, "ok": False, "detail": (done.stderr or done.stdout).strip()[-200:], "ms": 0}


def _outside_blocked(lab: lab_ops.Lab, client: str) -> str:
    source = lab.plan.pod(client)
    code = ("import socket\ntry:\n socket.create_connection(('%s', 80), timeout=2)\n print('REACHED')\n"
            "except OSError as e:\n print(e.strerror)" % OUTSIDE)
    return pods.run(source, lab.pod_cgroup(source), [sys.executable, "-c", code]).stdout.strip()


def run_demo(console: Console) -> None:
    console.print("[bold]nodeagent demo[/bold]: bringing up a lab of 2 simulated nodes with 5 pods each...")
    lab_ops.down()  # a crashed earlier run must not stop this one
    lab = lab_ops.up(nodes=2, pods_per_node=5)
    try:
        console.print(f"lab up: {len(lab.plan.pods)} pods, {len(lab.plan.services)} services "
                      f"(manifests in {lab.cluster_dir})")
        table = Table(title="Traffic from pod client-n0-0 (node0)", title_justify="left")
        for column in ("PROTOCOL", "TO POD", "PATH", "RESULT", "MS", "DETAIL"):
            table.add_column(column)
        failures = 0
        for kind in KINDS:
            for target, path in ((f"{kind}-n0-0", "same node"), (f"{kind}-n1-0", "cross node")):
                result = _probe(lab, "client-n0-0", kind, target)
                failures += not result["ok"]
                table.add_row(WORKLOAD_BY_KIND[kind].protocol, target, path,
                              "[green]ok[/green]" if result["ok"] else "[red]FAILED[/red]",
                              f"{result['ms']:.1f}", result["detail"])
        console.print(table)
        console.print(f"Reaching {OUTSIDE}, outside the lab, from a pod: {_outside_blocked(lab, 'client-n0-0')} "
                      "(the lab has no way out).")
        console.print("[yellow]The mesh is not running yet:[/yellow] this traffic went pod to pod in plaintext "
                      "over the lab bridge. Later versions start one nodeagent per node here and show "
                      "meshed pods, mTLS identities, success rates and latencies.")
        if failures:
            raise lab_ops.LabError(f"{failures} probes failed")
    finally:
        lab_ops.down()
        console.print("lab down: every namespace, cgroup and process of the demo is gone.")
