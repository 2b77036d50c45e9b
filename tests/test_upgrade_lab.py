"""An agent upgrade is not an outage (issue 15): under load, each node's agent is handed over to
a new one (`lab upgrade`), one node after the other, with no failed request, no reset, the
long-lived stream byte-exact, and no program attached twice; pins of another layout are refused;
the trust anchors and the issuer rotate under load, live, with no failed request either."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmark's round is the test's load
from benchmarks import upgrade as bench  # noqa: E402
from nodeagent.datapath import abi, libbpf  # noqa: E402
from nodeagent.identity.ca import Authority  # noqa: E402
from nodeagent.datapath.loader import LoadError, check_layout  # noqa: E402
from nodeagent.datapath.pins import PinLayout  # noqa: E402
from nodeagent.datapath.programs import CGROUP_PROGRAMS  # noqa: E402
from nodeagent.lab import lab as lab_ops  # noqa: E402
from nodeagent.lab import upgrade as lab_upgrade  # noqa: E402
from test_proxy import agent_stats, curl, wait_until  # noqa: E402

pytestmark = pytest.mark.privileged


LOAD_S = 14.0


@pytest.fixture(scope="module")
def lab():
    lab_ops.down()
    saved = lab_ops.AGENT_EXTRA_ARGS
    lab_ops.AGENT_EXTRA_ARGS = [*saved, *bench.drain_timeout_args(LOAD_S)]
    try:
        yield lab_ops.up(nodes=2, pods_per_node=5, mesh="node")
    finally:
        lab_ops.AGENT_EXTRA_ARGS = saved
        lab_ops.down()


def attached_programs(lab, node: str) -> list[int]:
    fd = os.open(lab.cgroup_root / node, os.O_RDONLY)
    try:
        return [len(libbpf.prog_query(fd, p.attach_type)) for p in CGROUP_PROGRAMS]
    finally:
        os.close(fd)


def test_both_agents_upgraded_under_load_with_no_failed_request_and_no_reset(lab):
    result = bench.one_round(lab, LOAD_S)
    for name, traffic in result["traffic"].items():
        assert traffic["failed"] == 0 and traffic["resets"] == 0, (name, traffic)
        assert traffic.get("requests", 1) > 0 or traffic.get("bytes", 0) > 0, (name, traffic)
    assert result["echo_exact"] and result["traffic"]["opaque echo stream"]["bytes"] > 0
    for agent in result["agents"]:
        assert agent["old_exited"], agent  # at its deadline, past the traffic's end
        assert lab_upgrade.agent_pids(lab, agent["node"]) != [agent["old_pid"]]
    for index, node in enumerate(lab.plan.nodes):
        assert attached_programs(lab, node.name) == [1] * len(CGROUP_PROGRAMS)
        assert len(agent_stats(index)["pods"]) == 5 and agent_stats(index)["ready"]
    assert curl(lab, "client-n0-0", f"http://{lab.plan.pod('http-n1-0').ip}:8080/") == "hello from http-n1-0\n"


def test_lab_upgrade_hands_a_node_over(lab):
    (old,) = lab_upgrade.agent_pids(lab, "node1")
    done = subprocess.run([sys.executable, "-m", "nodeagent", "lab", "upgrade", "--node", "node1"],
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "NODEAGENT_LAB_AGENT_ARGS": " ".join(lab_ops.AGENT_EXTRA_ARGS)})
    assert done.returncode == 0, done.stderr
    (new,) = lab_upgrade.agent_pids(lab, "node1")
    assert new != old and done.stdout.startswith(f"node1: agent {old} -> {new}: new one ready in ")
    with open(f"/proc/{new}/maps") as maps:
        assert "libbcc" not in maps.read()  # the same build: adopted in its own process, nothing compiled
    pod = lab.plan.pod("http-n1-0")
    migrate = subprocess.run(["ip", "netns", "exec", pod.netns, "cat", "/proc/sys/net/ipv4/tcp_migrate_req"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert migrate == "1"  # a closing listener's queue goes to its group: turned on at enrolment
    assert curl(lab, "client-n1-0", f"http://{lab.plan.pod('http-n0-0').ip}:8080/") == "hello from http-n0-0\n"
    assert lab_upgrade.ready_as(lab.plan.nodes[1].admin_port, new)


def test_pins_of_another_layout_are_refused_with_the_way_out(lab):
    layout = PinLayout(lab_ops.BPF_PIN_ROOT, "node0")
    pins = check_layout(layout)  # this agent's own
    assert pins.layout_version == abi.LAYOUT_VERSION
    fd = libbpf.obj_get(str(layout.map("layout")))
    try:
        libbpf.map_update(fd, abi.u32(0), bytes(abi.Pins(abi.LAYOUT_VERSION + 1, 0, pins.programs_digest)))
        with pytest.raises(LoadError, match=rf"has layout {abi.LAYOUT_VERSION + 1}, this agent's is "
                                            rf"{abi.LAYOUT_VERSION}: .*nodeagent cleanup --node node0"):
            check_layout(layout)
    finally:
        libbpf.map_update(fd, abi.u32(0), bytes(pins))
        os.close(fd)


def replace_file(path: Path, data: bytes) -> None:
    """As a Secret's update lands: the new content at once (kubelet swaps a symlink)."""
    staged = path.with_name(f".{path.name}.new")
    staged.write_bytes(data)
    os.replace(staged, path)


def test_rotating_the_trust_anchors_then_the_issuer_under_load_fails_nothing(lab):
    directory = lab_ops.identity_dir()
    old_anchors = (directory / "ca.crt").read_bytes()
    new_anchor = Authority.new_anchor("cluster.local")
    new_issuer = new_anchor.new_issuer("cluster.local")

    def issued_again(before: list[int]) -> list[int]:
        now = [agent_stats(i)["certificates_issued"] for i in range(len(lab.plan.nodes))]
        return now if all(n > b for n, b in zip(now, before)) else []

    def rotate(lab) -> list[list[int]]:
        start = [agent_stats(i)["certificates_issued"] for i in range(len(lab.plan.nodes))]
        replace_file(directory / "ca.crt", old_anchors + new_anchor.certificate_pem())  # README's step 2
        trusted = wait_until(lambda: issued_again(start), "both agents to take the new anchors", 15)
        replace_file(directory / "issuer.crt", new_issuer.chain_pem())  # step 3: the key follows
        replace_file(directory / "issuer.key", new_issuer.key_pem())
        switched = wait_until(lambda: issued_again(trusted), "both agents to take the new issuer", 15)
        return [start, trusted, switched]

    traffic, counts = bench.under_load(lab, LOAD_S, rotate)
    for name, kind in traffic.items():
        assert kind["failed"] == 0 and kind["resets"] == 0, (name, kind)
    assert bench.totals(traffic)["echo_exact"]
    log = (lab_ops.STATE_DIR / "logs" / "agent-node0.log").read_text()
    assert log.count("the issuer or trust anchors changed") >= 2
