"""Cluster settings changed live in the lab (issue 15, item 4): `lab config` rewrites the
agents' mounted ConfigMap; both agents and their workers apply log-level, pod-limits and
default-policy to new connections while an open connection keeps working; a setting that needs
a restart is reported, and a bad value is refused with the settings in use kept."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request

import pytest

from nodeagent.lab import lab as lab_ops
from test_proxy import _agent_pid, wait_until

pytestmark = pytest.mark.privileged
TESTS = os.path.dirname(os.path.abspath(__file__))
ATTEMPTS = 6  # new connections tried after each change


@pytest.fixture(scope="module")
def lab():
    lab_ops.down()
    saved = lab_ops.AGENT_EXTRA_ARGS
    state = tempfile.mkdtemp(prefix="nodeagent-state-")  # the agents' last good settings (both write the same)
    # The agent and one worker: both must take the change.
    lab_ops.AGENT_EXTRA_ARGS = [*saved, "--workers=2", f"--state-dir={state}"]
    try:
        yield lab_ops.up(nodes=2, pods_per_node=5, mesh="node")
    finally:
        lab_ops.AGENT_EXTRA_ARGS = saved
        lab_ops.down()
        shutil.rmtree(state, ignore_errors=True)


class Client:
    """settings_client.py in a pod: open, echo and close connections on command."""

    def __init__(self, lab, pod_name: str):
        pod = lab.plan.pod(pod_name)
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", pod.netns, sys.executable, os.path.join(TESTS, "settings_client.py")],
            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            preexec_fn=lambda: (lab.pod_cgroup(pod) / "cgroup.procs").write_text("0"))

    def ask(self, line: str) -> str:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def open_many(self, prefix: str, address: str) -> list[str]:
        return [self.ask(f"open {prefix}{i} {address}") for i in range(ATTEMPTS)]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(10)


def stats(node) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.admin_port}/stats", timeout=5) as response:
        return json.loads(response.read())


def metrics(node) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.admin_port}/metrics", timeout=5) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def configure(lab, *changes: str, check: bool = True) -> dict:
    """`lab config CHANGES`, then wait until both agents read it (every 2 s; 10 s bound)."""
    before = [stats(node)["settings"]["reloads"] for node in lab.plan.nodes]
    data = lab_ops.configure(list(changes), check=check)
    for node, seen in zip(lab.plan.nodes, before):
        wait_until(lambda: stats(node)["settings"]["reloads"] != seen, f"{node.name}'s agent to read {changes}", 10)
    return data


def agent_log(node) -> str:
    return (lab_ops.STATE_DIR / "logs" / f"agent-{node.name}.log").read_text()


def test_log_level_pod_limits_and_default_policy_change_live_and_an_open_connection_survives(lab):
    node0, node1 = lab.plan.nodes
    echo0, echo1 = f"{lab.plan.pod('echo-n0-0').ip}:9000", f"{lab.plan.pod('echo-n1-0').ip}:9000"
    # client-n1-0 leaves the mesh: its connections reach echo-n0-0 in plaintext, unauthenticated.
    lab_ops.label("client-n1-0", "nodeagent.io/mesh=disabled")
    wait_until(lambda: "client-n1-0" not in json.dumps(stats(node1)["pods"]), "client-n1-0 to leave the mesh", 10)
    meshed, unmeshed = Client(lab, "client-n0-0"), Client(lab, "client-n1-0")
    try:
        assert meshed.ask(f"open held {echo1}") == "ok"  # through node0's and node1's proxies, mTLS
        assert meshed.open_many("before", echo1) == ["ok"] * ATTEMPTS
        for i in range(ATTEMPTS):
            meshed.ask(f"close before{i}")
        assert unmeshed.ask(f"open u0 {echo0}") == "ok"  # all-unauthenticated admits it
        unmeshed.ask("close u0")

        log_from = len(agent_log(node0))
        configure(lab, "log-level=error", "pod-limits=outbound-connections=1", "default-policy=all-authenticated")
        for node in (node0, node1):
            in_use = stats(node)["settings"]["in_use"]
            assert (in_use["log-level"], in_use["default-policy"]) == ("error", "all-authenticated")
            assert "outbound-connections=1," in in_use["pod-limits"]
        assert meshed.ask("echo held") == "ok"  # admitted before: kept, over the new limit too
        # client-n0-0 holds one outbound connection in one of node0's two processes: that one
        # admits no more, the other at most one more.
        answers = meshed.open_many("after", echo1)
        assert sum(a == "ok" for a in answers) <= 1, answers
        assert sample(metrics(node0), "limit_exceeded_total", direction="outbound", limit="outbound-connections",
                      pod="client-n0-0") >= ATTEMPTS - 1
        assert unmeshed.ask(f"open u1 {echo0}").startswith("refused")  # all-authenticated refuses it
        assert meshed.ask("echo held") == "ok"  # a mesh identity: still authorized
        # log-level=error: neither process of node0 logged the refusals (warnings).
        assert "limit is reached" not in agent_log(node0)[log_from:]

        configure(lab, "log-level-")  # back to the command line's: info
        answers = meshed.open_many("again", echo1)
        assert sum(a == "ok" for a in answers) <= 1, answers
        wait_until(lambda: "the outbound-connections limit is reached" in agent_log(node0)[log_from:],
                   "the refusals to be logged at info", 5)

        configure(lab, "pod-limits-", "default-policy-")
        assert meshed.open_many("last", echo1) == ["ok"] * ATTEMPTS
        assert unmeshed.ask(f"open u2 {echo0}") == "ok"
        assert meshed.ask("echo held") == "ok"  # one connection, open through every change
    finally:
        meshed.close()
        unmeshed.close()


def test_a_setting_that_needs_a_restart_is_reported_and_a_bad_value_keeps_the_settings(lab):
    node0 = lab.plan.nodes[0]
    configure(lab, "workers=3", "max-connections=500")
    settings = stats(node0)["settings"]
    assert settings["in_use"]["workers"] == "2" and settings["in_use"]["max-connections"] == "500"
    assert set(settings["needs_restart"]) == {"workers"}
    assert sample(metrics(node0), "config_needs_restart", setting="workers") == 1
    assert "--workers: '2' -> '3' needs a restart" in agent_log(node0)

    configure(lab, "max-connections=many", check=False)
    settings = stats(node0)["settings"]
    assert "--max-connections" in settings["refused"]
    assert settings["in_use"]["max-connections"] == "500"  # the settings in use stay
    assert lab_ops.agent_ready(node0)  # and the agent stays ready
    assert sample(metrics(node0), "config_reloads_total", result="refused") == 1

    configure(lab, "workers-", "max-connections-")
    settings = stats(node0)["settings"]
    assert settings["needs_restart"] == {} and settings["refused"] is None
    assert settings["in_use"]["max-connections"] == "20000"


def test_an_agent_started_again_on_a_bad_content_starts_from_the_last_good_one_and_serves(lab):
    """A node's agent killed (OOM, reboot) while the ConfigMap holds a bad value: its successor
    refuses the value as a running agent does, starts from the last content applied, and serves."""
    node0 = lab.plan.nodes[0]
    echo1 = f"{lab.plan.pod('echo-n1-0').ip}:9000"
    configure(lab, "max-connections=500")
    configure(lab, "max-connections=many", check=False)
    pid = _agent_pid(lab, node0.name)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z",
               "node0's agent to die", 10)
    log_from = len(agent_log(node0))
    lab_ops.start_agent(lab, node0)
    lab_ops.wait_agent_ready(node0)  # it started, on the bad content
    settings = stats(node0)["settings"]
    assert settings["started_from"] == "last-good" and "--max-connections" in settings["refused"]
    assert settings["in_use"]["max-connections"] == "500"
    assert sample(metrics(node0), "config_reloads_total", result="refused") == 1
    assert "settings: the new ConfigMap is refused" in agent_log(node0)[log_from:]
    client = Client(lab, "client-n0-0")
    try:
        assert client.open_many("restarted", echo1) == ["ok"] * ATTEMPTS  # its pods are served
    finally:
        client.close()
    configure(lab, "max-connections-")  # fixed: taken live
    assert stats(node0)["settings"]["refused"] is None
