"""A draining agent ends the HTTP connections it serves as a destination too (issue 15): a
source proxy's pooled tunnel to a pod of the draining node is closed between requests, so the
agent stops as soon as its clients have moved, not at the drain deadline (10 minutes)."""

import os
import signal

import pytest

from conftest import lab_fixture
from nodeagent.lab import lab as lab_ops
from test_proxy import _agent_pid, py_in, wait_until

pytestmark = pytest.mark.privileged

mesh = lab_fixture(mesh="node")


@pytest.mark.parametrize("speaks_after_s", [0, 0.5])
def test_a_destinations_pooled_http_tunnels_end_when_its_agent_drains(mesh, speaks_after_s):
    """`speaks_after_s`: a client that speaks later than the eager-connect delay got an early
    tunnel, adopted into its agent's pool though the far end relayed it as opaque: that drain
    waited for its deadline (2 of ~30 runs under load; every time with 0.5)."""
    target = mesh.plan.pod("http-n1-0").ip
    code = f"""
import http.client, time
conn = http.client.HTTPConnection({target!r}, 8080, timeout=10)
conn.connect()
time.sleep({speaks_after_s})
for _ in range(5):
    conn.request("GET", "/")
    assert conn.getresponse().read() == b"hello from http-n1-0\\n"
"""
    py_in(mesh, "client-n0-0", code)  # node0's pool now keeps an idle tunnel to node1's agent
    node = mesh.plan.nodes[1]
    pid = _agent_pid(mesh, node.name)
    os.kill(pid, signal.SIGTERM)
    try:
        # Its HTTP connections end between requests (the idle tunnel after DRAIN_IDLE_S): nothing
        # is left for the 10-minute deadline.
        wait_until(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z",
                   "node1's agent to finish draining", 30)
    finally:
        if os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z":
            os.kill(pid, signal.SIGKILL)
        lab_ops.start_agent(mesh, node)
        lab_ops.wait_agent_ready(node)
    py_in(mesh, "client-n0-0", code)  # and the successor serves the same pod
