"""The agent's admin surface attacked in the lab (issue 13): a real agent with a worker process,
its admin port on loopback and its metrics port beside it, real requests through the mesh."""

import http.client
import json
import socket
import time
from pathlib import Path

import pytest

from nodeagent.lab import lab as lab_ops
from nodeagent.proxy import tap
from test_proxy import agent_stats, py_in

pytestmark = pytest.mark.privileged
ADMIN_PORT = 4191  # the lab's agent of node0
METRICS_PORT = 4290
TESTS = str(Path(__file__).parent)


@pytest.fixture(scope="module")
def lab():
    lab_ops.down()
    saved = lab_ops.AGENT_EXTRA_ARGS
    lab_ops.AGENT_EXTRA_ARGS = ["--workers", "2", "--metrics", f"127.0.0.1:{METRICS_PORT}"]
    try:
        yield lab_ops.up(nodes=1, pods_per_node=5, mesh="node")
    finally:
        lab_ops.AGENT_EXTRA_ARGS = saved
        lab_ops.down()


def get(port: int, path: str, timeout_s: float = 10) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def agent_rss() -> int:
    pid = agent_stats(0)["workers"][0]
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def wait_for_subscribers(count: int, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while agent_stats(0)["tap_subscribers"] != count:
        assert time.monotonic() < deadline, "the tap did not subscribe"
        time.sleep(0.05)


def test_the_metrics_port_serves_prometheus_and_probes_and_nothing_else(lab):
    answers = {path: get(METRICS_PORT, path) for path in ("/metrics", "/live", "/ready", "/stats", "/tap")}
    assert {path: status for path, (status, _) in answers.items()} == {
        "/metrics": 200, "/live": 200, "/ready": 200, "/stats": 404, "/tap": 404}
    assert b"enrolled_pods" in answers["/metrics"][1]
    listeners = {entry["listener"] for entry in agent_stats(0)["listeners"]}
    assert listeners == {"admin", "metrics"}


REQUESTS = """
import http.client, sys
sys.path.insert(0, {tests!r})
for i in range(6):  # new connections: the agent and its worker each serve some
    conn = http.client.HTTPConnection("10.96.0.10", 80, timeout=10)
    conn.request("GET", f"/reset/{{i}}?token=secret-{{i}}#also-secret")
    conn.getresponse().read()
    conn.close()
from h2_client import H2Client
client = H2Client("10.96.0.11", 80)
print(sorted(r.status for r in client.wait(client.request("GET", "/h2/reset?token=secret-h2", authority="h2c.default"))))
"""


def test_tap_and_stats_never_show_a_query_string(lab):
    conn = http.client.HTTPConnection("127.0.0.1", ADMIN_PORT, timeout=30)
    conn.request("GET", "/tap?pod=client-n0-0&max=7&seconds=20")
    response = conn.getresponse()
    assert response.status == 200
    wait_for_subscribers(1)
    py_in(lab, "client-n0-0", REQUESTS.format(tests=TESTS))
    streamed = response.read()  # the stream ends after 7 events
    conn.close()
    events = [json.loads(line) for line in streamed.splitlines() if line.startswith(b"{")]
    assert sorted(e["path"] for e in events) == sorted([f"/reset/{i}" for i in range(6)] + ["/h2/reset"])
    assert b"secret" not in streamed
    for path in ("/stats", "/metrics"):
        status, body = get(ADMIN_PORT, path)
        assert status == 200 and b"secret" not in body, path


def send_url(port: int, size: int, seconds: float) -> tuple[int, bytes]:
    """Stream a request line of `size` bytes, for at most `seconds`: (bytes sent, what came back)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /")
        chunk, sent, deadline = b"a" * (1 << 20), 0, time.monotonic() + seconds
        try:
            while sent < size and time.monotonic() < deadline:
                sent += sock.send(chunk)
        except OSError:
            pass
        try:
            return sent, sock.recv(4096)
        except OSError:
            return sent, b""


def test_a_200_mib_url_costs_the_agent_no_memory(lab):
    before = agent_rss()
    sent, answer = send_url(ADMIN_PORT, 200 * 2**20, seconds=60)
    grown = agent_rss() - before
    assert grown < 8 * 2**20, f"the agent grew by {grown / 2**20:.1f} MiB"
    assert sent < 16 * 2**20, f"the agent took {sent / 2**20:.0f} MiB of a request line"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 414 "), answer[:100]
    assert get(ADMIN_PORT, "/ready")[0] == 200


def test_idle_admin_connections_are_capped_and_timed_out(lab):
    held = [socket.create_connection(("127.0.0.1", ADMIN_PORT), timeout=10) for _ in range(100)]
    deadline = time.monotonic() + 10  # the head timeout (5 s) and then some
    try:
        time.sleep(0.5)
        answers = []
        for sock in held:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                answers.append(sock.recv(4096))
            except (socket.timeout, OSError):
                answers.append(b"")
    finally:
        for sock in held:
            sock.close()
    statuses = [a.split(b" ")[1] if a.startswith(b"HTTP/1.1 ") else b"none" for a in answers]
    assert statuses.count(b"503") >= 100 - 64  # over the cap: refused at once
    assert statuses.count(b"408") + statuses.count(b"503") == 100  # the rest at the head timeout
    time.sleep(1.5)  # after the error linger, every slot is free again
    assert get(ADMIN_PORT, "/ready")[0] == 200
    admin = next(entry for entry in agent_stats(0)["listeners"] if entry["listener"] == "admin")
    assert admin["refused"] >= 36 and admin["errors"]["408"] >= 1


def test_tap_subscribers_beyond_the_cap_get_503(lab):
    taps = []
    try:
        for _ in range(tap.MAX_SUBSCRIBERS):
            conn = http.client.HTTPConnection("127.0.0.1", ADMIN_PORT, timeout=10)
            conn.request("GET", "/tap?seconds=30")
            response = conn.getresponse()  # holds the socket (`connection: close` lets conn drop it)
            assert response.status == 200
            taps.append(response)
        status, body = get(ADMIN_PORT, "/tap?seconds=1")
        assert status == 503 and b"taps already listen" in body
    finally:
        for response in taps:
            response.close()
    wait_for_subscribers(0)
    assert get(ADMIN_PORT, "/tap?seconds=0.5")[0] == 200


LONG_PATHS = """
import http.client
conn = http.client.HTTPConnection("10.96.0.10", 80, timeout=10)
path = "/" + "p" * 4000
for i in range({count}):
    conn.request("GET", path)
    conn.getresponse().read()
"""


def test_a_tap_reader_that_stops_reading_costs_the_agent_dropped_events_not_memory(lab):
    """12,000 requests with 4 KB paths tapped by a reader that reads nothing: buffered, their
    events would be ~50 MB in the agent; here they wait in the bounded queue, then drop."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", ADMIN_PORT))
    try:
        sock.sendall(b"GET /tap?seconds=120 HTTP/1.1\r\nhost: agent\r\n\r\n")
        wait_for_subscribers(1)
        dropped_before = agent_stats(0)["tap_events_dropped"]
        before = agent_rss()
        py_in(lab, "client-n0-0", LONG_PATHS.format(count=12_000), timeout=300)
        grown = agent_rss() - before
        dropped = agent_stats(0)["tap_events_dropped"] - dropped_before
    finally:
        sock.close()
    assert grown < 20 * 2**20, f"the agent grew by {grown / 2**20:.1f} MiB"
    assert dropped > 0  # beyond the queue and what the sockets' buffers took, events are dropped
