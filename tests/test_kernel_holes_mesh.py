"""The data path's holes (issue 13) tried against real agents, in both modes where it matters:
what an app listens on only locally stays local, the proxy's own ports never loop, IPv6 is
refused and counted per pod, and pods in the node's namespace are never enrolled."""

import errno
import signal
import subprocess
import time
import urllib.request
import uuid

import pytest

from nodeagent import cgroups
from nodeagent.lab import lab as lab_ops
from nodeagent.lab import manifests
from nodeagent.lab.plan import NAMESPACE
from nodeagent.ports import INBOUND_PORT, OUTBOUND_PORT
from test_kernel_holes import ULA, addresses, attempt, connect_from, connect_inside, echo_server
from test_proxy import agent_stats, client_admin, counter, proxy_stats, wait_until

pytestmark = pytest.mark.privileged
REACHED = "reply b'hi'"
# Accepted by a proxy, then closed or reset (before or after the client's shutdown).
CUT = ("reply b''", str(errno.ECONNRESET), str(errno.EPIPE), str(errno.ENOTCONN))


@pytest.fixture(scope="module", params=["node", "sidecar"])
def mesh(request):
    lab_ops.down()
    created = lab_ops.up(nodes=2, pods_per_node=5, mesh=request.param)
    yield created
    lab_ops.down()


def node_mode_only(lab):
    if lab.mesh != "node":
        pytest.skip("about the per-node agent's enrolment")


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def pod_kernel(lab, pod: str) -> dict:
    return next(p["kernel"] for p in proxy_stats(lab, pod)["pods"] if p["pod"] == f"{NAMESPACE}/{pod}")


def test_an_app_listening_on_localhost_only_stays_out_of_reach(mesh):
    server = mesh.plan.pod("http-n0-0")
    with echo_server(mesh, server.name, "127.0.0.1", 7000), echo_server(mesh, server.name, "0.0.0.0", 7001):
        # Through the mesh (client-n1-0's proxy, mutual TLS, the server's proxy) ...
        assert connect_from(mesh, "client-n1-0", server.ip, 7000) in CUT
        assert connect_from(mesh, "client-n1-0", server.ip, 7001) == REACHED
        # ... and from outside the mesh (steered onto the server's inbound listener).
        assert connect_inside(mesh, "client-n1-0", server.ip, 7000) in CUT
        assert connect_inside(mesh, "client-n1-0", server.ip, 7001) == REACHED
        # The pod itself still reaches its own localhost.
        assert connect_from(mesh, server.name, "127.0.0.1", 7000) == REACHED


def test_the_proxys_own_ports_are_never_a_loop(mesh):
    server = mesh.plan.pod("http-n0-0")

    def inbound_opens() -> int:
        return counter(proxy_stats(mesh, server.name), "tcp_open_total", direction="inbound", pod=server.name)

    before = inbound_opens()
    for port in (INBOUND_PORT, OUTBOUND_PORT):
        # From outside the mesh the kernel refuses them before any proxy sees them ...
        assert connect_inside(mesh, "client-n1-0", server.ip, port) == str(errno.ECONNREFUSED)
        # ... and through the mesh the server's proxy gets one connection, which goes nowhere.
        assert connect_from(mesh, "client-n1-0", server.ip, port) in CUT
    time.sleep(1)  # a loop would keep opening connections meanwhile
    assert inbound_opens() - before <= 2
    assert pod_kernel(mesh, server.name)["proxy_port_refused"] == 2


def test_ipv6_to_an_enrolled_pod_is_refused_and_counted_per_pod(mesh):
    server, client = "http-n0-0", "client-n1-0"
    with addresses(mesh, (server, f"{ULA}e/64"), (client, f"{ULA}c/64")), echo_server(mesh, server, "::", 9600):
        assert connect_inside(mesh, client, f"{ULA}e", 9600) == str(errno.ECONNREFUSED)
        # A meshed client cannot even try: its IPv6 connects are refused where they start.
        assert connect_from(mesh, client, f"{ULA}e", 9600) == str(errno.EPERM)
        assert pod_kernel(mesh, server)["inbound_unmeshed_refused"] == 1
        assert (f'kernel_inbound_unmeshed_refused_total{{namespace="{NAMESPACE}",pod="{server}"}} 1.0'
                in metrics(client_admin(mesh, server)))


def start_in_host_netns(cgroup_dir) -> subprocess.Popen:
    """A process in a pod's cgroup but the node's own namespace (as CRI-O's conmon, or a
    hostNetwork pod's container)."""
    cgroup_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(["sleep", "300"], preexec_fn=lambda: cgroups.join(cgroup_dir))


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(10)


def enrolled(node: int) -> set[str]:
    return {p["pod"] for p in agent_stats(node)["pods"]}


def host_listens(port: int) -> bool:
    return attempt("127.0.0.1", port) != str(errno.ECONNREFUSED)


def test_a_host_network_pod_is_reported_and_never_enrolled(mesh):
    node_mode_only(mesh)
    name, uid = "hostnet-n0-0", str(uuid.uuid4())
    pod_dir = mesh.cgroup_root / "node0" / "kubepods" / "besteffort" / f"pod{uid}"
    manifest = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": NAMESPACE, "uid": uid,
                             "labels": {"app": "client", "nodeagent.io/mesh": "enabled"}},
                "spec": {"nodeName": "node0", "hostNetwork": True, "serviceAccountName": "client",
                         "containers": [{"name": "main", "image": "nodeagent-lab/client"}]},
                "status": {"phase": "Running", "podIP": "10.244.0.251", "podIPs": [{"ip": "10.244.0.251"}]}}
    process = start_in_host_netns(pod_dir / ("0" * 64))
    path = manifests.write_manifest(mesh.cluster_dir, manifest)
    try:
        reported = {"pod": f"{NAMESPACE}/{name}", "reason": "host-network"}
        wait_until(lambda: reported in agent_stats(0)["not_enrolled"], "the hostNetwork pod reported")
        time.sleep(1)  # rounds of reconciling: still reported once, never enrolled
        assert f"{NAMESPACE}/{name}" not in enrolled(0)
        assert not host_listens(INBOUND_PORT) and not host_listens(OUTBOUND_PORT)
        assert (f'pods_not_enrolled{{namespace="{NAMESPACE}",pod="{name}",reason="host-network"}} 1.0'
                in metrics(4191))
        log = (lab_ops.STATE_DIR / "logs" / "agent-node0.log").read_text()
        assert log.count(f"pod {NAMESPACE}/{name} is meshed but not enrolled: host-network") == 1
    finally:
        path.unlink()
        stop(process)
        cgroups.remove_tree(pod_dir)
    wait_until(lambda: agent_stats(0)["not_enrolled"] == [], "the report gone with the pod")


def test_a_pod_whose_first_process_is_in_another_namespace_is_enrolled_in_its_own(mesh):
    node_mode_only(mesh)
    pod = mesh.plan.pod("echo-n0-0")
    key = f"{NAMESPACE}/{pod.name}"
    lab_ops.label(pod.name, "nodeagent.io/mesh=disabled")
    wait_until(lambda: key not in enrolled(0), "the pod out of the mesh")
    # Listed before the container's process: cgroup.procs of the pod's own cgroup comes first.
    conmon = start_in_host_netns(mesh.pod_cgroup(pod).parent)
    try:
        assert cgroups.pids_in(mesh.pod_cgroup(pod).parent)[0] == conmon.pid
        lab_ops.label(pod.name, "nodeagent.io/mesh=enabled")
        wait_until(lambda: key in enrolled(0), "the pod enrolled again")
        assert not host_listens(INBOUND_PORT)  # its listeners are in the pod, not the node
        steered = pod_kernel(mesh, pod.name)["inbound_steered"]
        assert connect_inside(mesh, "client-n1-0", pod.ip, 9000) == REACHED
        assert pod_kernel(mesh, pod.name)["inbound_steered"] == steered + 1
    finally:
        stop(conmon)
