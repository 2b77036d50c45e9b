"""gRPC (unary and streaming, over HTTP/2 with trailers) and WebSocket echo through the mesh."""

import json
import sys
from pathlib import Path

import pytest

from conftest import lab_fixture
from nodeagent.lab import pods
from nodeagent.observe import admin_client
from test_proxy import py_in


def requests_to(pod: str) -> float:
    """Requests client-n0-0 sent to `pod` by its IP, as the node0 agent counted them."""
    return sum(v for n, ls, v in admin_client.scrape("127.0.0.1:4191") if n == "request_total"
               and ls.get("pod") == "client-n0-0" and ls.get("peer") == f"pod/default/{pod}")


def detected(protocol: str) -> float:
    """How many outbound connections of client-n0-0 the node0 agent detected as `protocol`."""
    return sum(v for n, ls, v in admin_client.scrape("127.0.0.1:4191") if n == "protocol_detected_total"
               and ls.get("pod") == "client-n0-0" and ls.get("protocol") == protocol)

pytestmark = pytest.mark.privileged
PEERS = str(Path(__file__).with_name("protocol_peers.py"))

mesh = lab_fixture(mesh="node")


def start_peer(lab, pod_name: str, role: str, port: int) -> None:
    pod = lab.plan.pod(pod_name)
    pods.start(pod, lab.pod_cgroup(pod), [sys.executable, PEERS, role, str(port)],
               lab.cluster_dir.parent / "logs" / f"{role}-{pod_name}.log")
    code = (f"import socket, time\nfor _ in range(200):\n    try: socket.create_connection(({pod.ip!r}, {port}), 1)"
            f".close(); break\n    except OSError: time.sleep(0.05)")
    py_in(lab, "client-n1-0", code)  # listening (checked from another pod, through the mesh)


def client(lab, pod_name: str, role: str, host: str, port: int) -> dict:
    return json.loads(py_in(lab, pod_name, f"import runpy, sys; sys.argv = [{PEERS!r}, {role!r}, {host!r}, "
                                           f"'{port}']; runpy.run_path({PEERS!r}, run_name='__main__')"))


@pytest.mark.parametrize("server", ["h2c-n0-0", "h2c-n1-0"])
def test_grpc_unary_and_streaming_calls_through_the_mesh(mesh, server):
    start_peer(mesh, server, "grpc-server", 50051)
    before, requests_before = detected("h2"), requests_to(server)
    result = client(mesh, "client-n0-0", "grpc-client", mesh.plan.pod(server).ip, 50051)
    assert result == {"unary": "echo:hello", "stream": ["stream:a", "stream:b", "stream:c"]}
    assert detected("h2") > before  # it went through the proxy, detected as HTTP/2
    assert requests_to(server) - requests_before == 2  # and each call was a request of its own


@pytest.mark.parametrize("server", ["http-n0-0", "http-n1-0"])
def test_a_websocket_echo_through_the_mesh(mesh, server):
    start_peer(mesh, server, "ws-server", 8765)
    before = detected("http/1")
    result = client(mesh, "client-n0-0", "ws-client", mesh.plan.pod(server).ip, 8765)
    assert result == {"echoed": ["one", "two", "100000 chars"]}
    assert detected("http/1") > before  # the upgrade went through the proxy's HTTP/1 layer
