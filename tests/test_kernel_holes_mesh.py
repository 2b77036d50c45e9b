"""The data path's holes (issue 13) tried against real agents, in both modes where it matters:
what an app listens on only locally stays local, the proxy's own ports never loop, IPv6 is
refused and counted per pod."""

import errno
import time
import urllib.request

import pytest

from nodeagent.lab import lab as lab_ops
from nodeagent.lab.plan import NAMESPACE
from nodeagent.ports import INBOUND_PORT, OUTBOUND_PORT
from test_kernel_holes import ULA, addresses, connect_from, connect_inside, echo_server
from test_proxy import client_admin, counter, proxy_stats

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
