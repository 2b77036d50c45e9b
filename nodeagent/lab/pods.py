"""Processes inside pods: in the pod's network namespace and container cgroup."""

import os
import subprocess
import sys
from pathlib import Path

from nodeagent import cgroups, netns
from nodeagent.lab.plan import WORKLOAD_BY_KIND, PodPlan


def enter(netns_path: str, cgroup_dir: Path) -> None:
    """Put the calling process into a pod: cgroup first, then namespace.

    The cgroup comes first so that the process is never in the pod's network
    without its cgroup (cgroup BPF programs decide by it).
    """
    cgroups.join(cgroup_dir)
    netns.enter_for_good(netns_path)


def workload_argv(pod: PodPlan) -> list[str]:
    workload = WORKLOAD_BY_KIND[pod.workload]
    if not workload.port:
        # A pod that only runs clients (`lab exec`) still has a resident process, like a pause container.
        return ["sleep", "infinity"]
    return [sys.executable, "-m", "nodeagent.lab.workloads", workload.kind, "--port", str(workload.port),
            "--name", pod.name]


def start(pod: PodPlan, cgroup_dir: Path, argv: list[str], log_path: Path) -> subprocess.Popen:
    """Start a background process in the pod that outlives the caller."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: enter(netns.named_path(pod.netns), cgroup_dir),
        )


def exec_in(pod: PodPlan, cgroup_dir: Path, argv: list[str]) -> None:
    """Replace this process with `argv` running inside the pod."""
    enter(netns.named_path(pod.netns), cgroup_dir)
    os.execvp(argv[0], argv)


def run(pod: PodPlan, cgroup_dir: Path, argv: list[str], timeout_s: float = 30.0) -> subprocess.CompletedProcess:
    """Run `argv` in the pod to completion and capture its output."""
    return subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        preexec_fn=lambda: enter(netns.named_path(pod.netns), cgroup_dir),
    )
