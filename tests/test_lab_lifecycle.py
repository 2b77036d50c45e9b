"""Bringing labs up and down: idempotent, complete, and clean after failures."""

import os
import shutil
import subprocess
import sys

import pytest

from nodeagent.lab import lab as lab_ops
from nodeagent.lab import network

pytestmark = pytest.mark.privileged


def nodeagent(*args: str) -> subprocess.CompletedProcess:
    # A wide terminal, so that rich does not fold the lines we look for.
    return subprocess.run([sys.executable, "-m", "nodeagent", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "250"})


def lab_netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("nalab-")]


def test_up_down_twice_leaves_nothing():
    lab_ops.down()
    for _ in range(2):
        assert nodeagent("lab", "up", "--nodes", "1", "--pods", "2").returncode == 0
        assert len(lab_netns()) == 3  # fabric and two pods
        assert nodeagent("lab", "down").returncode == 0
        assert lab_netns() == [] and lab_ops.leftovers() == []
    assert "nothing to remove" in nodeagent("lab", "down").stdout


def test_no_enroll_labels_pods_disabled():
    lab_ops.down()
    try:
        lab = lab_ops.up(1, 2, enroll=False)
        status = lab_ops.status(lab)
        assert {p["labels"]["nodeagent.io/mesh"] for p in status["pods"]} == {"disabled"}
    finally:
        lab_ops.down()


def test_down_cleans_up_after_a_crashed_run_without_state():
    lab_ops.down()
    lab = lab_ops.up(1, 3)
    shutil.rmtree(lab_ops.STATE_DIR)  # as if the state was lost with the process that made it
    assert lab_netns() and lab_ops.leftovers()
    nodeagent("lab", "down")
    assert lab_netns() == [] and lab_ops.leftovers() == []
    assert not lab.cgroup_root.exists()


def test_a_failure_halfway_through_up_leaves_nothing(monkeypatch):
    lab_ops.down()
    real_add_pod, calls = network.add_pod, []

    def failing_add_pod(pod, node_index, pod_index):
        calls.append(pod.name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of `lab up`
        real_add_pod(pod, node_index, pod_index)

    monkeypatch.setattr(network, "add_pod", failing_add_pod)
    with pytest.raises(KeyboardInterrupt):
        lab_ops.up(2, 2)
    assert lab_netns() == [] and lab_ops.leftovers() == []


def test_bad_sizes_and_missing_lab_are_clear_errors():
    lab_ops.down()
    bad = nodeagent("lab", "up", "--nodes", "0")
    assert bad.returncode == 2 and "--nodes" in bad.stderr
    missing = nodeagent("lab", "status")
    assert missing.returncode == 1 and "no lab is up" in missing.stderr


def test_demo_runs_and_cleans_up():
    done = nodeagent("demo")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(" ok ") == 12
    assert "HTTP 502 from the pod's proxy: connect failed" in done.stdout
    assert lab_netns() == [] and lab_ops.leftovers() == []
