"""Pods that join the mesh during a handover's overlap (issue 15): the new agent runs beside the
old one, several pods are labelled into the mesh, then the old agent drains and exits. Every
pod must answer as itself all along (never through another pod's listener: two agents choosing
slots on their own gave two pods one slot) and after the old agent's exit (whose listener, if it
was written into a pod's slot last, left the slot empty: inbound connections refused). The
pinned entries must name one slot per pod, the one the remaining agent serves it by."""

import ctypes
import os
import signal
import threading
import time

import pytest

from conftest import lab_fixture
from nodeagent.datapath import abi, libbpf
from nodeagent.datapath.pins import PinLayout
from nodeagent.lab import lab as lab_ops
from nodeagent.lab import upgrade as lab_upgrade
from nodeagent.lab.plan import MESH_LABEL
from test_proxy import agent_stats, curl, run_in, wait_until

pytestmark = pytest.mark.privileged

HTTP = ["http-n0-0", "http-n0-1"]
H2C = ["h2c-n0-0", "h2c-n0-1"]
TCP = ["echo-n0-0", "echo-n0-1", "banner-n0-0", "banner-n0-1"]
JOINING = HTTP + H2C + TCP
OVERLAP_S = 2.0  # both agents poll the manifests every 0.25 s: each has enrolled what it will


lab = lab_fixture(nodes=1, pods_per_node=10, mesh="node")


def pinned_slots(lab) -> dict[str, int]:
    """Pod IP -> the slot sk_lookup steers it by (pods_by_ip)."""
    fd = libbpf.obj_get(str(PinLayout(lab_ops.BPF_PIN_ROOT, "node0").map("pods_by_ip")))
    try:
        slots = {}
        for name in JOINING:
            ip = lab.plan.pod(name).ip
            raw = libbpf.map_lookup(fd, bytes(int(part) for part in ip.split(".")), ctypes.sizeof(abi.Pod))
            if raw is not None:
                slots[name] = abi.Pod.from_buffer_copy(raw).slot
        return slots
    finally:
        os.close(fd)


def answers_as_itself(lab, name: str) -> str:
    ip = lab.plan.pod(name).ip
    if name in HTTP:
        return curl(lab, "client-n0-0", f"http://{ip}:8080/")
    return curl(lab, "client-n0-0", f"http://{ip}:8081/", "--http2-prior-knowledge")


GREETING = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), 5) as s:
    if sys.argv[2] == "9000":
        s.sendall(b"ping")
    print(s.recv(100).decode().strip())
"""


def tcp_answer(lab, name: str) -> str:
    """The banner's greeting (it names its pod) or the echo of a ping: what the pod answers."""
    pod = lab.plan.pod(name)
    port = "9000" if name.startswith("echo") else "2525"
    done = run_in(lab, "client-n0-0", ["python3", "-c", GREETING, pod.ip, port])
    return done.stdout.strip() if done.returncode == 0 else f"failed: {done.stderr.strip()[-200:]}"


def tcp_expected(name: str) -> str:
    return "ping" if name.startswith("echo") else f"220 {name} nodeagent-lab banner ready"


def check_every_joining_pod(lab, rounds: int) -> list[str]:
    wrong = []
    for _ in range(rounds):  # new connections: the kernel picks within each listener's group
        for name in HTTP + H2C:
            try:
                answer = answers_as_itself(lab, name)
            except AssertionError as e:  # curl failed (refused, reset)
                answer = f"failed: {e}"
            if answer != f"hello from {name}\n":
                wrong.append(f"{name}: {answer.strip()}")
        wrong += [f"{name}: {answer}" for name in TCP if (answer := tcp_answer(lab, name)) != tcp_expected(name)]
    return wrong


def test_pods_joining_during_the_overlap_are_served_as_themselves_before_and_after_the_old_agent_exits(lab):
    node = lab.plan.nodes[0]
    for name in JOINING:
        lab_ops.label(name, f"{MESH_LABEL}=disabled")
    wait_until(lambda: not pinned_slots(lab), "the pods out of the mesh")
    (old,) = lab_upgrade.agent_pids(lab, node.name)
    new = lab_ops.start_agent(lab, node).pid
    wait_until(lambda: lab_upgrade.ready_as(node.admin_port, new), "the new agent ready", 60)
    for name in JOINING:
        lab_ops.label(name, f"{MESH_LABEL}=enabled")
    wait_until(lambda: len(pinned_slots(lab)) == len(JOINING), "every joining pod enrolled")
    time.sleep(OVERLAP_S)
    during = check_every_joining_pod(lab, rounds=3)
    os.kill(old, signal.SIGTERM)
    wait_until(lambda: lab_upgrade._gone(old), "the old agent's exit", 60)
    after = check_every_joining_pod(lab, rounds=3)
    assert (during, after) == ([], []), f"during the overlap: {during}; after the old agent's exit: {after}"
    slots = pinned_slots(lab)
    assert len(set(slots.values())) == len(JOINING), slots  # one slot each
    stats = agent_stats(0)
    assert stats["workers"][0] == new
    served = {p["pod"].split("/")[-1]: p["slot"] for p in stats["pods"]}
    assert {name: served[name] for name in JOINING} == slots  # the slots it steers by are its own


def test_pods_left_to_a_newer_agent_that_goes_away_are_enrolled_by_the_older_one(lab):
    """A newer agent's mark makes this one leave joining pods to it; when that agent goes (its
    mark removed: a rollback, a crash found by the next start, a drain) this one enrols them at
    once, though the cluster view has not moved since."""
    name = "echo-n0-0"
    layout = PinLayout(lab_ops.BPF_PIN_ROOT, "node0")
    lab_ops.label(name, f"{MESH_LABEL}=disabled")
    wait_until(lambda: name not in pinned_slots(lab), f"{name} out of the mesh")
    mark = layout.agents / f"{time.clock_gettime_ns(time.CLOCK_BOOTTIME)}-{os.getpid()}"  # newer than the agent's
    mark.mkdir()
    stop = threading.Event()
    renewing = threading.Thread(target=_renew, args=(mark, stop), daemon=True)
    renewing.start()
    try:
        lab_ops.label(name, f"{MESH_LABEL}=enabled")
        time.sleep(2.0)  # the agent has read the label (it polls every 0.25 s) and left the pod alone
        assert name not in pinned_slots(lab)
    finally:
        stop.set()
        renewing.join(5)
        mark.rmdir()
    wait_until(lambda: name in pinned_slots(lab), f"{name} enrolled by the remaining agent")
    assert curl(lab, "client-n0-0", f"http://{lab.plan.pod('http-n0-0').ip}:8080/")  # the agent still serves


def _renew(mark, stop: threading.Event) -> None:
    """As a live agent does: the mark's mtime renewed every 0.25 s, until told to stop."""
    while not stop.wait(0.25):
        os.utime(mark)


LEAVE_JOIN_ROUNDS = 5
LEAVE_JOIN_GAP_S = 0.3  # random gaps up to this: shorter and longer than an agent's poll (0.25 s)


def test_pods_leaving_and_joining_again_during_the_overlap_stay_enrolled_after_the_old_agent_exits(lab):
    """Pods served by the old agent leave the mesh and join it again, in random order with random
    gaps, while the new agent runs beside it. The two agents read the cluster at their own
    moments: one may see a leave and a join the other never saw, or see them later. Whatever each
    saw, an entry the new agent relies on must never be removed by the old one (on the leave it
    saw late, or at its exit): every pod is served after the old agent's exit."""
    import random

    node = lab.plan.nodes[0]
    wait_until(lambda: len(pinned_slots(lab)) == len(JOINING), "every pod enrolled")
    (old,) = lab_upgrade.agent_pids(lab, node.name)
    new = lab_ops.start_agent(lab, node).pid
    wait_until(lambda: lab_upgrade.ready_as(node.admin_port, new), "the new agent ready", 60)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for _ in range(LEAVE_JOIN_ROUNDS):
        pods = rng.sample(JOINING, 3)
        events = pods + pods  # each pod's first event is its leave, its second its join
        rng.shuffle(events)
        out = set()
        for name in events:
            value = "enabled" if name in out else "disabled"
            (out.discard if name in out else out.add)(name)
            lab_ops.label(name, f"{MESH_LABEL}={value}")
            time.sleep(rng.uniform(0, LEAVE_JOIN_GAP_S))
    try:
        wait_until(lambda: len(pinned_slots(lab)) == len(JOINING), "every pod enrolled again", 10)
    except AssertionError:
        missing = sorted(set(JOINING) - set(pinned_slots(lab)))
        raise AssertionError(f"seed {seed}: not enrolled again after 10 s: {missing}") from None
    time.sleep(OVERLAP_S)
    during = check_every_joining_pod(lab, rounds=1)
    os.kill(old, signal.SIGTERM)
    wait_until(lambda: lab_upgrade._gone(old), "the old agent's exit", 60)
    after = check_every_joining_pod(lab, rounds=2)
    assert (during, after) == ([], []), \
        f"seed {seed}: during the overlap: {during}; after the old agent's exit: {after}"
    slots = pinned_slots(lab)
    assert len(set(slots.values())) == len(JOINING), slots
    served = {p["pod"].split("/")[-1]: p["slot"] for p in agent_stats(0)["pods"]}
    assert {name: served[name] for name in JOINING} == slots
