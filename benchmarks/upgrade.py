"""Upgrade under load: each lab node's agent handed over to a new one (`nodeagent lab upgrade`),
one node after the other, while traffic of every kind runs; how many requests failed, how many
connections were reset, and how long each agent took.

    flock /run/nodeagent-lab.lock python -m benchmarks.upgrade [--seconds 30] [--rounds 3] [--out FILE]

Brings up its own 2-node lab (--mesh node) and takes it down. Traffic, from client pods
(benchmarks/upgrade_load.py, each a well-behaved client): HTTP/1.1 keep-alive, a new connection
per request, HTTP/2 with 8 streams at once (h2load opens no new connection after a GOAWAY, so it
is not used here) and one long-lived opaque echo stream, byte-checked, across both agents.
Each round: traffic starts; after 2 s node0's agent is upgraded, then node1's; traffic stops;
each old agent exits once its last connection has ended (the echo stream ends with the traffic;
--drain-timeout is the traffic's length + 15 s). Prints JSON per round and a summary:
failed requests and resets (target 0 and 0), the new agents' time to ready and the old agents'
time from SIGTERM to exit (median, min-max).
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from nodeagent.lab import lab as lab_ops
from nodeagent.lab import upgrade as lab_upgrade

ROOT = Path(__file__).resolve().parents[1]
WARMUP_S = 2.0
DRAIN_WAIT_S = 3.0  # between one node's upgrade and the next: the old agent's HTTP clients move on
# The agents' --drain-timeout: past the traffic's end, so every connection of the traffic (the
# echo stream lasts as long as the traffic) ends within it, and no old agent waits 10 minutes for
# something the traffic left behind.
DRAIN_PAST_TRAFFIC_S = 15.0


def drain_timeout_args(seconds: float) -> list[str]:
    return ["--drain-timeout", f"{int(seconds + DRAIN_PAST_TRAFFIC_S)}s"]


def spawn(lab, pod_name: str, argv: list[str]) -> subprocess.Popen:
    pod = lab.plan.pod(pod_name)
    return subprocess.Popen(["ip", "netns", "exec", pod.netns, *argv], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: (lab.pod_cgroup(pod) / "cgroup.procs").write_text("0"))


def load(kind: str, host: str, port: int, seconds: float) -> list[str]:
    return [sys.executable, "-m", "benchmarks.upgrade_load", kind, host, str(port), str(seconds)]


def under_load(lab, seconds: float, during) -> tuple[dict, object]:
    """Run every kind of traffic for `seconds`, `during(lab)` after WARMUP_S; (the traffic's counts
    by kind, what `during` returned)."""
    echo_ip = lab.plan.pod("echo-n1-0").ip
    generators = {
        "http1 keep-alive": spawn(lab, "client-n0-0", load("keepalive", "10.96.0.10", 80, seconds)),
        "http1 new connection per request": spawn(lab, "client-n1-0", load("fresh", "10.96.0.10", 80, seconds)),
        "opaque echo stream": spawn(lab, "client-n0-0", load("echo", echo_ip, 9000, seconds)),
        "http2": spawn(lab, "client-n1-0", load("h2", "10.96.0.11", 80, seconds)),
    }
    try:
        time.sleep(WARMUP_S)
        outcome = during(lab)
        traffic = {}
        for name, process in generators.items():
            output, _ = process.communicate(timeout=seconds + 60)
            traffic[name] = json.loads(output.strip().splitlines()[-1])
    finally:
        for process in generators.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return traffic, outcome


def totals(traffic: dict) -> dict:
    return {"failed": sum(t["failed"] for t in traffic.values()),
            "resets": sum(t["resets"] for t in traffic.values()),
            "requests": sum(t.get("requests", 0) for t in traffic.values()),
            "echo_exact": traffic["opaque echo stream"]["exact"]}


def upgrade_each_node(lab) -> list[dict]:
    agents = []
    for node in lab.plan.nodes:
        done = lab_upgrade.upgrade(lab, node, wait_s=DRAIN_WAIT_S)
        agents.append({"node": node.name, "ready_s": done.ready_s, "sigterm_at": done.sigterm_at,
                       "old_pid": done.old_pid})
    return agents


def one_round(lab, seconds: float) -> dict:
    traffic, agents = under_load(lab, seconds, upgrade_each_node)
    for agent in agents:
        deadline = agent["sigterm_at"] + seconds + DRAIN_PAST_TRAFFIC_S + 10
        while not lab_upgrade._gone(agent["old_pid"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        agent["old_exited"] = lab_upgrade._gone(agent["old_pid"])
        agent["drain_s"] = round(time.monotonic() - agent.pop("sigterm_at"), 2) if agent["old_exited"] else None
    return {"traffic": traffic, "agents": agents, **totals(traffic)}


def summary(rounds: list[dict]) -> dict:
    def spread(values):
        values = [v for v in values if v is not None]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None

    agents = [a for r in rounds for a in r["agents"]]
    return {"rounds": len(rounds), "failed": sum(r["failed"] for r in rounds),
            "resets": sum(r["resets"] for r in rounds), "requests": sum(r["requests"] for r in rounds),
            "echo_exact": all(r["echo_exact"] for r in rounds),
            "new_agent_ready_s": spread([a["ready_s"] for a in agents]),
            "old_agent_drained_s": spread([a["drain_s"] for a in agents])}


def run(seconds: float, rounds: int, logs: Path | None = None) -> dict:
    lab_ops.down()
    saved = lab_ops.AGENT_EXTRA_ARGS
    lab_ops.AGENT_EXTRA_ARGS = [*saved, *drain_timeout_args(seconds)]
    try:
        lab = lab_ops.up(nodes=2, pods_per_node=5, mesh="node")
        results = [one_round(lab, seconds) for _ in range(rounds)]
    finally:
        lab_ops.AGENT_EXTRA_ARGS = saved
        if logs is not None:  # the agents' logs (what each drain left and cut) outlive the lab
            logs.mkdir(parents=True, exist_ok=True)
            for log in (lab_ops.STATE_DIR / "logs").glob("agent-*.log"):
                shutil.copy(log, logs / log.name)
        lab_ops.down()
    return {"rounds": results, "summary": summary(results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="traffic per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    parser.add_argument("--logs", type=Path, help="copy the agents' logs into this directory")
    args = parser.parse_args()
    result = run(args.seconds, args.rounds, args.logs)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
