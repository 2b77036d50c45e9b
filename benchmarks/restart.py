"""Crash recovery: after `kill -9` of a node's agent, how soon does a new agent serve again,
and does it leave any program twice?

    flock /run/nodeagent-lab.lock python -m benchmarks.restart [--runs 5] [--out FILE]

Brings up its own 2-node lab (--mesh node) and takes it down. Each run: node0's agent (and its
workers) is killed with SIGKILL; probes in pods send a GET on a new connection every 5 ms
(benchmarks/upgrade_load.py `first`): outbound, from client-n0-0 to http-n1-0, and inbound, from
client-n1-0 (node1's agent) to http-n0-0 over the mesh; then a new agent starts. Measured from
the new agent's start (Popen): its first answered request each way and its /ready. The BPF
programs named na_* on the machine (bpftool) and those attached to the node's cgroup are
counted before the kill and after the restart. Prints each run and the median, min-max.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path

from benchmarks.upgrade import load, spawn
from nodeagent.datapath import libbpf
from nodeagent.datapath.programs import CGROUP_PROGRAMS
from nodeagent.lab import lab as lab_ops
from nodeagent.lab import upgrade as lab_upgrade

PROBE_S = 30.0


def bpf_programs() -> int:
    """Programs of nodeagent's on the machine (each run's lab is the only one: the lab lock)."""
    shown = json.loads(subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True,
                                      check=True).stdout)
    return sum(1 for p in shown if p.get("name", "").startswith("na_"))


def attached(lab, node: str) -> list[int]:
    fd = os.open(lab.cgroup_root / node, os.O_RDONLY)
    try:
        return [len(libbpf.prog_query(fd, p.attach_type)) for p in CGROUP_PROGRAMS]
    finally:
        os.close(fd)


def one_run(lab) -> dict:
    node = lab.plan.nodes[0]
    before = {"programs": bpf_programs(), "attached": attached(lab, node.name)}
    for pid in lab_upgrade.agent_pids(lab, node.name):
        os.killpg(os.getpgid(pid), signal.SIGKILL)  # the agent and its workers (its own session)
        while not lab_upgrade._gone(pid):
            time.sleep(0.01)
    probes = {"outbound": spawn(lab, "client-n0-0", load("first", lab.plan.pod("http-n1-0").ip, 8080, PROBE_S)),
              "inbound": spawn(lab, "client-n1-0", load("first", lab.plan.pod("http-n0-0").ip, 8080, PROBE_S))}
    time.sleep(0.3)  # the probes are running (and refused: no agent)
    started = time.monotonic()
    agent = lab_ops.start_agent(lab, node)
    while not lab_ops.agent_ready(node):
        time.sleep(0.005)
    ready_s = time.monotonic() - started
    with open(f"/proc/{agent.pid}/maps") as maps:
        bcc_in_agent = "libbcc" in maps.read()  # the same build is adopted in-process, with no compiler
    served = {}
    for way, probe in probes.items():
        result = json.loads(probe.communicate(timeout=PROBE_S + 10)[0].strip().splitlines()[-1])
        served[way] = None if result["served_at"] is None else round(result["served_at"] - started, 3)
    after = {"programs": bpf_programs(), "attached": attached(lab, node.name)}
    return {"agent_pid": agent.pid, "ready_s": round(ready_s, 3), "served_outbound_s": served["outbound"],
            "served_inbound_s": served["inbound"], "before": before, "after": after, "bcc_in_agent": bcc_in_agent,
            "duplicates": after != before}


def spread(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None


def run(runs: int) -> dict:
    lab_ops.down()
    lab = lab_ops.up(nodes=2, pods_per_node=5, mesh="node")
    try:
        results = [one_run(lab) for _ in range(runs)]
    finally:
        lab_ops.down()
    return {"runs": results, "summary": {
        "runs": runs, "ready_s": spread([r["ready_s"] for r in results]),
        "served_outbound_s": spread([r["served_outbound_s"] for r in results]),
        "served_inbound_s": spread([r["served_inbound_s"] for r in results]),
        "never_served": sum(r["served_outbound_s"] is None or r["served_inbound_s"] is None for r in results),
        "runs_with_duplicate_programs": sum(r["duplicates"] for r in results)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = json.dumps(run(args.runs), indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
