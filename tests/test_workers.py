"""The agent with worker processes: every process serves every pod, the kernel spreads the
connections, and the agent's metrics, tap and supervision cover them all."""

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request

import pytest

from nodeagent import netns
from nodeagent.agent import heap
from nodeagent.identity import ca, naming
from nodeagent.identity.workload import WorkloadIdentities
from nodeagent.lab import lab as lab_ops
from nodeagent.observe import admin_client
from nodeagent.ports import MESH_PORT
from nodeagent.proxy import mesh
from nodeagent.settings import DEFAULT
from test_proxy import agent_stats, curl, py_in, wait_until

pytestmark = pytest.mark.privileged
PROCESSES = 3


@pytest.fixture(scope="module")
def lab():
    lab_ops.down()
    saved = lab_ops.AGENT_EXTRA_ARGS
    lab_ops.AGENT_EXTRA_ARGS = ["--workers", str(PROCESSES)]
    try:
        yield lab_ops.up(nodes=2, pods_per_node=5, mesh="node")
    finally:
        lab_ops.AGENT_EXTRA_ARGS = saved
        lab_ops.down()


def owners(lab, pod_name: str, local: str, peer: str) -> set[int]:
    """PIDs of the processes holding established sockets from `local` to `peer`'s address in a pod."""
    pod = lab.plan.pod(pod_name)
    out = subprocess.run(["ip", "netns", "exec", pod.netns, "ss", "-Htnp", "state", "established", "src", local,
                          "dst", peer], capture_output=True, text=True, check=True).stdout
    return {int(part.split("pid=")[1].split(",")[0]) for part in out.split() if "pid=" in part}


HOLD = """
import socket, sys, time
held = [socket.create_connection(({ip!r}, {port}), timeout=5) for _ in range(40)]
print('open', flush=True)
sys.stdin.readline()
"""


def holding(lab, client: str, ip: str, port: int):
    pod = lab.plan.pod(client)
    process = subprocess.Popen(["ip", "netns", "exec", pod.netns, sys.executable, "-c", HOLD.format(ip=ip, port=port)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               preexec_fn=lambda: (lab.pod_cgroup(pod) / "cgroup.procs").write_text("0"))
    assert process.stdout.readline().strip() == "open"
    return process


def test_the_agent_runs_its_workers_and_reports_them(lab):
    pids = agent_stats(0)["workers"]
    assert len(pids) == PROCESSES and len(set(pids)) == PROCESSES
    for pid in pids:
        assert os.path.exists(f"/proc/{pid}")


def test_debug_memory_answers_for_every_process(lab):
    url = f"http://127.0.0.1:{lab.plan.nodes[0].admin_port}/debug/memory"
    with urllib.request.urlopen(url, timeout=30) as response:
        processes = json.load(response)["processes"]
    assert [p["pid"] for p in processes] == agent_stats(0)["workers"]
    assert all(p["tables"]["pods"] == 5 and p["allocator"]["in_use_kib"] > 0 for p in processes)
    # Each process froze what its start-up made (agent/gc_tuning.py), once it served.
    assert all(p["python"]["gc_frozen"] > 10_000 for p in processes), [p["python"] for p in processes]
    # Node-wide bounds are shared out by the agent's count of processes (each worker admitted the
    # whole --max-connections, and counted the processes itself).
    assert all(p["tables"]["connections_max"] == DEFAULT.max_connections // PROCESSES for p in processes)
    assert all(p["tables"]["memory_budget"] == DEFAULT.memory_budget // PROCESSES for p in processes)
    # Every process set glibc up at its start (agent/heap.py): two arenas at most, a periodic trim.
    assert all(len(p["allocator"]["arenas"]) <= heap.ARENAS for p in processes)
    assert all(p["trims"]["every_s"] == heap.TRIM_EVERY_S for p in processes)


def test_outbound_connections_are_spread_over_the_processes(lab):
    process = holding(lab, "client-n0-0", lab.plan.pod("echo-n1-0").ip, 9000)
    try:
        served_by = owners(lab, "client-n0-0", "127.0.0.1:15001", "127.0.0.1")
        assert served_by <= set(agent_stats(0)["workers"]) and len(served_by) >= 2, served_by
    finally:
        process.kill()
        process.wait()


def test_inbound_connections_steered_by_sk_lookup_are_spread_too(lab):
    try:
        lab_ops.label("client-n1-0", "nodeagent.io/mesh=disabled")
        wait_until(lambda: all(p["pod"] != "default/client-n1-0" for p in agent_stats(1)["pods"]), "unmeshed")
        process = holding(lab, "client-n1-0", lab.plan.pod("echo-n0-0").ip, 9000)
        try:
            # The accepted side keeps the original destination; the app's sockets face the proxy's
            # legs to it (from the pod's IP), not the client.
            echo, client = lab.plan.pod("echo-n0-0"), lab.plan.pod("client-n1-0")
            served_by = owners(lab, "echo-n0-0", f"{echo.ip}:9000", client.ip)
            assert served_by <= set(agent_stats(0)["workers"]) and len(served_by) >= 2, served_by
        finally:
            process.kill()
            process.wait()
    finally:
        lab_ops.label("client-n1-0", "nodeagent.io/mesh=enabled")
        wait_until(lambda: any(p["pod"] == "default/client-n1-0" for p in agent_stats(1)["pods"]), "meshed again")


def mesh_client(lab, pod_name: str, address: tuple[str, int], context: ssl.SSLContext,
                session: ssl.SSLSession | None) -> tuple[ssl.SSLSession, bool]:
    """One mutual-TLS connection to a mesh port from `pod_name`'s network namespace (the pod
    unmeshed: nothing redirects it): the session after it, and whether it was resumed."""
    with netns.entered(netns.named_path(lab.plan.pod(pod_name).netns)):
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.settimeout(10)
    raw.connect(address)
    with context.wrap_socket(raw, server_hostname="mesh", session=session) as tls:
        tls.sendall(mesh.encode_header(9000, 0) + b"ping")
        try:
            tls.recv(4)  # the tickets come before any answer (or the close)
        except (OSError, ssl.SSLError):
            pass
        return tls.session, tls.session_reused


def test_a_mesh_client_resumes_its_session_whichever_process_takes_the_connection(lab):
    """The agent's ticket keys are every process's (proxy/tickets.py): with keys of their own,
    about 2/3 of these resumptions would land on another process and be full handshakes."""
    issuer, anchors = ca.load_issuer(lab_ops.identity_dir())
    client = WorkloadIdentities(issuer, anchors)
    identity = naming.of_pod("default", "client-n1-0")
    client.allow({identity})
    context = client.material(identity).client
    echo = (lab.plan.pod("echo-n0-0").ip, MESH_PORT)
    try:
        lab_ops.label("client-n1-0", "nodeagent.io/mesh=disabled")
        wait_until(lambda: all(p["pod"] != "default/client-n1-0" for p in agent_stats(1)["pods"]), "unmeshed")
        session, reused = mesh_client(lab, "client-n1-0", echo, context, None)
        assert not reused and session.has_ticket
        resumed = [mesh_client(lab, "client-n1-0", echo, context, session)[1] for _ in range(30)]
        assert all(resumed), f"{resumed.count(True)} of {len(resumed)} resumed"
    finally:
        lab_ops.label("client-n1-0", "nodeagent.io/mesh=enabled")
        wait_until(lambda: any(p["pod"] == "default/client-n1-0" for p in agent_stats(1)["pods"]), "meshed again")


NEW_CONNECTIONS = """
import http.client
for i in range(60):
    conn = http.client.HTTPConnection("10.96.0.10", 80, timeout=10)
    conn.request("GET", f"/n{i}")
    conn.getresponse().read()  # a 404 from the app: any answer is a request to count
    conn.close()
"""


def test_metrics_and_tap_add_up_over_the_processes(lab):
    def requests() -> float:
        return sum(v for name, labels, v in admin_client.scrape("127.0.0.1:4191")
                   if name == "request_total" and labels.get("pod") == "client-n0-0")

    before = requests()
    tap = subprocess.Popen([sys.executable, "-m", "nodeagent", "tap", "--admin", "127.0.0.1:4191", "--pod",
                            "client-n0-0", "--max", "60", "--duration", "30"], stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)  # subscribed, and the workers told
    py_in(lab, "client-n0-0", NEW_CONNECTIONS)
    out, _ = tap.communicate(timeout=40)
    paths = sorted(line.split(":path=")[1].split()[0] for line in out.splitlines())
    assert paths == sorted(f"/n{i}" for i in range(60))
    assert requests() - before == 60


def test_a_worker_that_dies_is_started_again_and_traffic_goes_on(lab):
    first = agent_stats(0)["workers"]
    os.kill(first[1], signal.SIGKILL)
    wait_until(lambda: len(set(agent_stats(0)["workers"]) - set(first)) == 1, "a new worker", timeout_s=15)
    for _ in range(10):
        assert "hello from http-n1-0" in curl(lab, "client-n0-0", f"http://{lab.plan.pod('http-n1-0').ip}:8080/")


def test_workers_die_with_a_killed_agent_and_its_pods_fail_closed(lab):
    node = lab.plan.nodes[0]
    pids = agent_stats(0)["workers"]
    os.kill(pids[0], signal.SIGKILL)
    wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
                               for pid in pids), "every process of the agent to be gone")
    code = (f"import socket, errno\ntry:\n    socket.create_connection(({lab.plan.pod('echo-n1-0').ip!r}, 9000), 3)\n"
            f"    print('connected')\nexcept OSError as e:\n    print(e.errno)")
    assert py_in(lab, "client-n0-0", code).strip() == str(__import__("errno").ECONNREFUSED)
    lab_ops.start_agent(lab, node)
    lab_ops.wait_agent_ready(node)
    assert len(agent_stats(0)["workers"]) == PROCESSES
    assert "hello from http-n1-0" in curl(lab, "client-n0-0", f"http://{lab.plan.pod('http-n1-0').ip}:8080/")

