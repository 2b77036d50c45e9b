"""Edges from known traffic in the lab: `nodeagent edges` and /edges name both workloads, the
identities each side proved over mTLS, and count requests, connections and bytes exactly."""

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import lab_fixture
from nodeagent.lab import lab as lab_ops
from test_metrics_lab import ECHO
from test_mtls_lab import meshed_on
from test_proxy import py_in, wait_until

pytestmark = pytest.mark.privileged
TD = "spiffe://cluster.local/ns/default/sa"

# The mesh hop's edges (identities proved by certificates): the Service's pod on the client's node too.
mesh = lab_fixture(mesh="node", agent_args=("--on-node-plaintext", "false"))

REQUESTS = """
import http.client
conn = http.client.HTTPConnection("10.96.0.10", 80, timeout=10)
for i in range(20):
    conn.request("GET", "/status/503" if i % 4 == 0 else "/")
    conn.getresponse().read()
conn.close()
"""


def edges_cli() -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "nodeagent", "edges", "--json"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def one(edges: list[dict], src: str, dst: str) -> dict:
    found = [e for e in edges if e["src"] == src and e["dst"] == dst]
    assert len(found) == 1, json.dumps(edges, indent=1)
    return found[0]


def test_edges_between_meshed_and_unmeshed_workloads(mesh):
    py_in(mesh, "client-n0-0", REQUESTS)
    assert py_in(mesh, "client-n0-0", ECHO.format(ip=mesh.plan.pod("echo-n1-0").ip)).strip() == "100000"
    lab_ops.label("client-n1-0", "nodeagent.io/mesh=disabled")
    try:
        wait_until(lambda: not meshed_on(1, "default/client-n1-0"), "client-n1-0 to leave the mesh")
        assert py_in(mesh, "client-n1-0", ECHO.format(ip=mesh.plan.pod("echo-n0-0").ip)).strip() == "100000"
    finally:
        lab_ops.label("client-n1-0", "nodeagent.io/mesh=enabled")
    time.sleep(0.5)  # the connections' closes reach the proxies (bytes are counted then)

    edges = edges_cli()
    # HTTP through the Service, over mTLS: seen by the client's agent, confirmed by the server's.
    http = one(edges, "app/client", "app/http")
    assert (http["src_namespace"], http["dst_namespace"], http["tls"], http["seen_by"], http["verified"]) == (
        "default", "default", True, "client", True)
    assert (http["client_id"], http["server_id"]) == (f"{TD}/client", f"{TD}/http")
    assert (http["requests"], http["successes"], http["failures"], http["connections"]) == (20, 15, 5, 1)
    assert http["bytes_read"] > 0 and http["bytes_written"] > 0
    # Opaque TCP straight to a pod on the other node: bytes exactly as sent.
    echo = one(edges, "app/client", "app/echo")
    assert (echo["server_id"], echo["verified"], echo["connections"], echo["requests"]) == (
        f"{TD}/echo", True, 1, 0)
    assert (echo["bytes_read"], echo["bytes_written"]) == (100000, 100000)
    # A client outside the mesh: only the server's agent saw it, and no identity was presented.
    unmeshed = one(edges, "unmeshed", "app/echo")
    assert (unmeshed["src_namespace"], unmeshed["client_id"], unmeshed["server_id"], unmeshed["tls"],
            unmeshed["seen_by"], unmeshed["connections"]) == ("", "", "", False, "server", 1)
    assert unmeshed["bytes_read"] == 100000

    # The table, and the namespace filter.
    done = subprocess.run([sys.executable, "-m", "nodeagent", "edges", "--namespace", "nowhere", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and json.loads(done.stdout) == []
    done = subprocess.run([sys.executable, "-m", "nodeagent", "edges"], capture_output=True, text=True, timeout=60,
                          env={"COLUMNS": "250", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if "app/client" in line and "app/http" in line)
    assert "client.default" in row and "http.default" in row and "client (verified)" in row


def test_the_admin_document_lists_the_nodes_pods_and_peers(mesh):
    py_in(mesh, "client-n0-0", REQUESTS)
    with urllib.request.urlopen("http://127.0.0.1:4191/edges", timeout=10) as response:
        document = json.load(response)
    assert document["node"] == "node0"
    assert {(p["pod"], p["workload"], p["identity"]) for p in document["pods"]} == {
        (f"default/{kind}-n0-0", f"app/{kind}", f"{TD}/{kind}") for kind in ("http", "h2c", "echo", "banner", "client")}
    assert {(w["workload"], w["pods"]) for w in document["workloads"]} == {
        (f"app/{kind}", 2) for kind in ("http", "h2c", "echo", "banner", "client")}
    assert document["peers"]["svc/default/http"] == {"namespace": "default", "workload": "app/http"}
