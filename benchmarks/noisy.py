"""The noisy neighbour: does one pod's abuse of its node's proxy reach another pod?

One lab in node mode (2 nodes, 10 pods each). The victim, `client-n0-0`, sends fixed-rate
HTTP/1.1 and HTTP/2 (`openloop.py`) to nginx on the same node and on the other node; the attacker,
`client-n0-1` on the same node, runs `attack.py` at the same time: short opaque connections at
a fixed rate (355/s by default) to `echo-n0-0`, plus idle and slowloris connections to
`http-n0-1`. A third variant, `floor`, runs the same attack with every connect of the attacker
refused in the kernel for the whole run (its pod flagged in the data path's `refusing` map, as
the agent flags a pod over its limits for a moment: proxy/refusal.py): the agent never sees the
attack, so what is left of the victim's slowdown is the attacker's own processes on the shared
cores. Quiet, attacked and floor runs alternate. Each row: the victim's latency and success,
node0's agent peak RSS during the run (against the DaemonSet's memory limit), the CPU node0's
agent and the attacker's pod used (in cores, over the victim's run), and in attacked runs what
the attack got.

An extra variant, only with `BENCH_NOISY_ATTACKER_CPU=<cores>`: `attacked, attacker at N cores`,
the same attack with the attacker's process under a CPU limit (CFS quota, as a Kubernetes pod's
CPU limit sets: cpu.max on cgroup v2, or cpu.cfs_quota_us in the v1 cpu hierarchy of a hybrid
node such as the test VM's), reported as its own row, never in place of `attacked`.
"""

import contextlib
import json
import os
import sys
import threading
import time

from pathlib import Path

from nodeagent import netns
from nodeagent.datapath.control import Datapath
from nodeagent.datapath.pins import PinLayout
from nodeagent.lab import lab as lab_ops

from benchmarks import haproxy, inlab
from benchmarks.rounds import schedule

VICTIM, ATTACKER = inlab.CLIENT, "client-n0-1"
SHORT_TARGET, HOLD_TARGET = "echo-n0-0", "http-n0-1"
RAMP_S = 2.0  # the held connections are open before the victim starts
ATTACKER_CPU = float(os.environ.get("BENCH_NOISY_ATTACKER_CPU") or 0)  # cores; 0: no such variant
LIMITED = f"attacked, attacker at {ATTACKER_CPU:g} cores"
VARIANTS = ("quiet", "attacked", "floor") + ((LIMITED,) if ATTACKER_CPU else ())
CFS_PERIOD_US = 100_000
REASSERT_S = 0.05  # the floor's refusal, written again this often
CPU_V1 = Path("/sys/fs/cgroup/cpu")


VICTIM_STREAMS = {"http1": ("http", False), "http2": ("h2", True)}  # app port name, h2c


def _victims(lab, sizes) -> dict[tuple[str, str], dict]:
    """HTTP/1.1 and HTTP/2 on both paths, all at once, each at the victim rate, in the victim pod."""
    results: dict[tuple[str, str], dict] = {}

    def one(path: str, proto: str) -> None:
        ip = lab.plan.pod(inlab.PATHS[path]).ip
        port_name, http2 = VICTIM_STREAMS[proto]
        try:
            results[(path, proto)] = inlab.openloop(lab, ip, haproxy.APP_PORTS[port_name], sizes.noisy_rate,
                                                    sizes.noisy_seconds, client=VICTIM, http2=http2)
        except Exception as e:  # a victim that failed outright is a result too
            results[(path, proto)] = {"failed": str(e)[-300:]}

    threads = [threading.Thread(target=one, args=(path, proto)) for path in inlab.PATHS for proto in VICTIM_STREAMS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _attack(lab, sizes, log: str):
    seconds = RAMP_S + sizes.noisy_seconds + 3  # outlasts the victim's run, warm-up included
    argv = [sys.executable, "-m", "benchmarks.attack", lab.plan.pod(SHORT_TARGET).ip, "--seconds", str(seconds),
            "--short-port", "9000", "--short-rate", str(sizes.attack_rate),
            "--hold-host", lab.plan.pod(HOLD_TARGET).ip, "--hold-port", "8080",
            "--idle", str(sizes.attack_idle), "--slowloris", str(sizes.attack_slowloris)]
    return inlab.start_in_pod(lab, ATTACKER, argv, log)


@contextlib.contextmanager
def _refused_in_the_kernel(lab, seconds: float):
    """The attacker's connects all fail with EPERM for `seconds` (or until the block ends). The
    deadline is written again every REASSERT_S: the agent writes the same entry for its own
    refusal windows (a connection of the attacked run before, refused late, wrote a window of
    half a second over the floor's, and the floor let the attack through after it)."""
    node0 = lab.plan.nodes[0].name
    cookie = netns.cookie(netns.named_path(lab.plan.pod(ATTACKER).netns))
    deadline = time.monotonic_ns() + int(seconds * 1e9)
    done = threading.Event()
    with Datapath(PinLayout(lab_ops.BPF_PIN_ROOT, node0)) as datapath:
        def reassert() -> None:
            while not done.wait(REASSERT_S):
                datapath.refuse_connects(cookie, deadline)

        datapath.refuse_connects(cookie, deadline)
        writer = threading.Thread(target=reassert)
        writer.start()
        try:
            yield
        finally:
            done.set()
            writer.join()
            datapath.refuse_connects(cookie, 0)  # a deadline passed: refuses nothing


@contextlib.contextmanager
def _cpu_limited(lab, pid: int, cores: float):
    """`pid` (the attacker) under a CFS quota of `cores` while the block runs; removed after."""
    pod_cgroup = lab.pod_cgroup(lab.plan.pod(ATTACKER))
    quota = int(cores * CFS_PERIOD_US)
    if "cpu" in (pod_cgroup / "cgroup.controllers").read_text().split():
        (pod_cgroup / "cpu.max").write_text(f"{quota} {CFS_PERIOD_US}")
        try:
            yield
        finally:
            (pod_cgroup / "cpu.max").write_text(f"max {CFS_PERIOD_US}")
        return
    group = CPU_V1 / "nalab-noisy-attacker"  # a hybrid node: the cpu controller is on v1
    group.mkdir(exist_ok=True)
    try:
        (group / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(quota))
        (group / "cgroup.procs").write_text(str(pid))
        yield
    finally:
        for left in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):  # it may have exited meanwhile
                (CPU_V1 / "cgroup.procs").write_text(left)
        group.rmdir()


def _pod_cpu_s(lab, name: str) -> float:
    """CPU seconds the pod's cgroup has used (every process in it)."""
    stat = (lab.pod_cgroup(lab.plan.pod(name)) / "cpu.stat").read_text()
    return int(next(line.split()[1] for line in stat.splitlines() if line.startswith("usage_usec"))) / 1e6


def one_run(lab, sizes, variant: str, index: int) -> list[dict]:
    node0 = lab.plan.nodes[0].name
    attacker, log = None, f"attack-{index}.log"
    with contextlib.ExitStack() as stack:
        if variant == "floor":
            stack.enter_context(_refused_in_the_kernel(lab, RAMP_S + sizes.noisy_seconds + 120))
        if variant != "quiet":
            attacker = _attack(lab, sizes, log)
            if variant == LIMITED:
                stack.enter_context(_cpu_limited(lab, attacker.pid, ATTACKER_CPU))
            time.sleep(RAMP_S)
        agent_cpu, attacker_cpu = inlab.cpu_seconds(inlab.mesh_pids(lab, node=node0)), _pod_cpu_s(lab, ATTACKER)
        started = time.monotonic()
        with inlab.PeakRss(lambda: inlab.mesh_pids(lab, node=node0)) as peak:
            victims = _victims(lab, sizes)
            elapsed = time.monotonic() - started
            cpu = {"agent_cpu_cores": (inlab.cpu_seconds(inlab.mesh_pids(lab, node=node0)) - agent_cpu) / elapsed,
                   "attacker_cpu_cores": (_pod_cpu_s(lab, ATTACKER) - attacker_cpu) / elapsed}
            attack = {}
            if attacker is not None:
                attacker.wait(timeout=sizes.noisy_seconds + 120)
                lines = (lab_ops.STATE_DIR / "logs" / log).read_text().strip().splitlines()
                attack = {f"attack_{k}": v for k, v in json.loads(lines[-1]).items()} if lines else {}
    rows = []
    for (path, proto), result in victims.items():
        sent = result.get("sent") or 0
        row = {"mode": variant, "path": path, "workload": f"victim {proto} open-loop {sizes.noisy_rate:g}/s", **result,
               "success_pct": round(100 * result.get("ok", 0) / sent, 2) if sent else 0.0,
               "agent_rss_peak_mib": peak.peak, **cpu, **attack}
        print(f"  noisy {variant:9} {path:10} {proto} p99={row.get('p99_ms')} ok={row.get('ok')}/{sent} "
              f"agent peak RSS={peak.peak} MiB agent cpu={cpu['agent_cpu_cores']:.2f} "
              f"attacker cpu={cpu['attacker_cpu_cores']:.2f} {attack}", flush=True)
        rows.append(row)
    return rows


def section(sizes, choice) -> list[dict]:
    if "node" not in choice.modes:
        return []
    rows = []
    with inlab.serving_lab("node", pods_per_node=10) as lab:
        for index, (round_, variant) in enumerate(schedule(VARIANTS, sizes.rounds)):
            rows += [{**row, "round": round_} for row in one_run(lab, sizes, variant, index)]
    return rows
