"""After known traffic in the lab, the agent's metrics say exactly what was sent."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import lab_fixture
from nodeagent.observe import admin_client
from test_proxy import py_in, wait_until

pytestmark = pytest.mark.privileged
ADMIN0 = "127.0.0.1:4191"


mesh = lab_fixture(mesh="node")


def value(samples, name, **labels) -> float:
    return sum(v for n, ls, v in samples if n == name and all(ls.get(k) == str(x) for k, x in labels.items()))


REQUESTS = """
import http.client
conn = http.client.HTTPConnection("10.96.0.10", 80, timeout=10)
for i in range(40):
    conn.request("GET", "/status/503" if i % 4 == 0 else "/")
    conn.getresponse().read()
"""

ECHO = """
import socket
s = socket.create_connection(({ip!r}, 9000), timeout=10)
s.sendall(b"x" * 100000); s.shutdown(socket.SHUT_WR)
got = 0
while chunk := s.recv(65536): got += len(chunk)
s.close(); print(got)
"""


def test_metric_values_equal_what_was_sent(mesh):
    py_in(mesh, "client-n0-0", REQUESTS)
    assert py_in(mesh, "client-n0-0", ECHO.format(ip=mesh.plan.pod("echo-n1-0").ip)).strip() == "100000"
    time.sleep(0.3)  # the echo connection's close reaches the proxy
    s = admin_client.scrape(ADMIN0)
    mine = {"direction": "outbound", "pod": "client-n0-0", "peer": "svc/default/http"}
    assert value(s, "request_total", **mine) == 40
    assert value(s, "response_total", **mine, status_code=200, classification="success") == 30
    assert value(s, "response_total", **mine, status_code=503, classification="failure") == 10
    assert value(s, "response_latency_ms_count", **mine) == 40
    assert value(s, "response_latency_ms_bucket", **mine, le="+Inf") == 40
    assert 0 < value(s, "response_latency_ms_bucket", **mine, le="50.0") <= 40  # populated below the top
    echo = {"direction": "outbound", "pod": "client-n0-0", "peer": "pod/default/echo-n1-0", "tls": "true"}
    assert value(s, "tcp_open_total", **echo) == 1 and value(s, "tcp_close_total", **echo) == 1
    assert value(s, "tcp_open_connections", **echo) == 0
    assert value(s, "tcp_read_bytes_total", **echo) == 100000
    assert value(s, "tcp_write_bytes_total", **echo) == 100000
    # The kernel saw the same two connections redirected (plus none other from this pod).
    assert value(s, "kernel_redirected_total", pod="client-n0-0") == 2
    assert value(s, "enrolled_pods", node="node0") == 5
    assert {ls["program"]: v for n, ls, v in s if n == "bpf_programs_attached"} == {
        "na_connect4": 1, "na_connect6": 1, "na_getpeername4": 1, "na_sockops": 1}
    identities = {ls["identity"] for n, ls, v in s if n == "identity_cert_expiration_timestamp_seconds"}
    assert "spiffe://cluster.local/ns/default/sa/client" in identities
    # Inbound on node1: the echo pod's side of that connection, with the client's identity.
    s1 = admin_client.scrape("127.0.0.1:4192")
    inbound = {"direction": "inbound", "pod": "echo-n1-0", "peer": "spiffe://cluster.local/ns/default/sa/client"}
    assert value(s1, "tcp_read_bytes_total", **inbound) == 100000


STEADY = """
import http.client, time
conn = http.client.HTTPConnection("10.96.0.10", 80, timeout=10)
end, i = time.monotonic() + 6, 0
while time.monotonic() < end:
    conn.request("GET", "/status/503" if i % 4 == 0 else "/"); conn.getresponse().read()
    i += 1; time.sleep(0.005)
"""


def test_stat_reports_the_traffic_of_its_window(mesh):
    load = threading.Thread(target=py_in, args=(mesh, "client-n1-0", STEADY))
    load.start()
    done = subprocess.run([sys.executable, "-m", "nodeagent", "stat", "--window", "2"], capture_output=True,
                          text=True, timeout=60, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    load.join()
    assert done.returncode == 0, done.stderr
    line = next(l for l in done.stdout.splitlines() if "svc/default/http" in l)
    cells = [c.strip() for c in line.split("│") if c.strip()]
    assert cells[1] == "2/2" and float(cells[3]) > 0
    assert 70 <= float(cells[2].rstrip("%")) <= 80  # one in four fails; the window cuts the cycle anywhere


def test_tap_shows_requests_in_order(mesh):
    tap = subprocess.Popen([sys.executable, "-m", "nodeagent", "tap", "--pod", "client-n0-0", "--to", "svc/default/http",
                            "--max", "5", "--duration", "20"], stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)  # subscribed
    py_in(mesh, "client-n0-0", """
import http.client
conn = http.client.HTTPConnection("10.96.0.10", 80, timeout=10)
for path in ("/one", "/two", "/three", "/status/418", "/five"):
    conn.request("GET", path); conn.getresponse().read()
""")
    out, _ = tap.communicate(timeout=30)
    lines = out.splitlines()
    assert [l.split(":path=")[1].split()[0] for l in lines] == ["/one", "/two", "/three", "/status/418", "/five"]
    assert ":status=418" in lines[3] and "src=default/client-n0-0" in lines[0]
    # The Service has a pod on each node: tls=true through the mesh hop, tls=false on the one hop (same node).
    assert all(" tls=true " in line or " tls=false " in line for line in lines)


H2_REQUESTS = """
import sys
sys.path.insert(0, {tests!r})
from h2_client import H2Client
client = H2Client("10.96.0.11", 80)
streams = [client.request("GET", "/status/503" if i % 4 == 0 else f"/h2/{{i}}", authority="h2c.default") for i in range(20)]
print(sorted(r.status for r in client.wait(*streams)))
"""


def test_http2_streams_are_counted_and_tapped_one_by_one(mesh):
    tap = subprocess.Popen([sys.executable, "-m", "nodeagent", "tap", "--pod", "client-n0-0", "--to", "svc/default/h2c",
                            "--max", "20", "--duration", "20"], stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)  # subscribed
    before = admin_client.scrape(ADMIN0)
    statuses = py_in(mesh, "client-n0-0", H2_REQUESTS.format(tests=str(Path(__file__).parent))).strip()
    assert statuses == str(sorted([503] * 5 + [404] * 15))  # the sample server has no /h2/<i>
    out, _ = tap.communicate(timeout=30)
    after = admin_client.scrape(ADMIN0)
    mine = {"direction": "outbound", "pod": "client-n0-0", "peer": "svc/default/h2c"}
    def grew(name, **labels):
        return value(after, name, **mine, **labels) - value(before, name, **mine, **labels)
    assert grew("request_total") == 20
    assert grew("response_total", status_code=503, classification="failure") == 5
    assert grew("response_total", status_code=404, classification="success") == 15
    lines = out.splitlines()
    assert len(lines) == 20 and all(":authority=h2c.default" in l for l in lines), out
    assert sum(":status=503" in l for l in lines) == 5


def test_top_shows_the_busiest_routes(mesh):
    load = threading.Thread(target=py_in, args=(mesh, "client-n0-0", STEADY.replace("+ 6", "+ 4")))
    load.start()
    done = subprocess.run([sys.executable, "-m", "nodeagent", "top", "--duration", "3"], capture_output=True,
                          text=True, timeout=60, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    load.join()
    assert done.returncode == 0, done.stderr
    rows = [l for l in done.stdout.splitlines() if "default/client-n0-0" in l and "svc/default/http" in l]
    assert any("/status/503" in r for r in rows) and any(" / " in r or "│ /  " in r for r in rows)


def test_series_of_a_deleted_pod_disappear(mesh):
    assert value(admin_client.scrape(ADMIN0), "request_total", pod="client-n0-0") > 0
    manifest = mesh.cluster_dir / "pods" / "default" / "client-n0-0.yaml"
    saved = manifest.read_text()
    manifest.unlink()  # as the API server would report the pod deleted
    try:
        wait_until(lambda: not any(ls.get("pod") == "client-n0-0" for _, ls, _ in admin_client.scrape(ADMIN0)),
                   "the pod's series to go")
        assert value(admin_client.scrape(ADMIN0), "enrolled_pods", node="node0") == 4
    finally:
        manifest.write_text(saved)


TLS_HELLO = """
import socket, ssl
context = ssl.create_default_context()
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
with socket.create_connection(({ip!r}, 9000), timeout=5) as s:
    try:
        context.wrap_socket(s, server_hostname="db.example.test")  # the echo server answers nonsense
    except (ssl.SSLError, OSError):
        pass
"""


def test_tls_passed_through_is_recorded_with_its_server_name(mesh):
    tap = subprocess.Popen([sys.executable, "-m", "nodeagent", "tap", "--pod", "client-n0-0", "--max", "1",
                            "--duration", "20"], stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)  # subscribed
    py_in(mesh, "client-n0-0", TLS_HELLO.format(ip=mesh.plan.pod("echo-n1-0").ip))
    out, _ = tap.communicate(timeout=30)
    assert "tls-passthrough sni=db.example.test" in out and "src=default/client-n0-0" in out
    samples = admin_client.scrape(ADMIN0)
    assert value(samples, "tls_sni_total", pod="client-n0-0", sni="db.example.test", direction="outbound") == 1
    assert value(samples, "protocol_detected_total", pod="client-n0-0", protocol="tls") >= 1


def test_a_workloads_own_requests_are_counted_on_its_node_meshed_clients_or_not(mesh):
    """Inbound HTTP is served per request at the destination (issue 18): the pod's own success
    rate is on its own node's agent, under each client's identity, and from unmeshed clients
    as `unauthenticated`."""
    from nodeagent.lab import lab as lab_ops

    target = mesh.plan.pod("http-n1-0").ip
    code = f"""
import http.client
conn = http.client.HTTPConnection({target!r}, 8080, timeout=10)
for i in range(20):
    conn.request("GET", "/status/500" if i % 5 == 0 else "/")
    conn.getresponse().read()
"""
    before = admin_client.scrape("127.0.0.1:4192")
    py_in(mesh, "client-n0-0", code)  # meshed: mutual TLS from node0

    def enrolled() -> float:
        return value(admin_client.scrape("127.0.0.1:4192"), "enrolled_pods", node="node1")

    meshed_pods = enrolled()
    assert lab_ops.label("banner-n1-0", "nodeagent.io/mesh=disabled")
    try:
        wait_until(lambda: enrolled() == meshed_pods - 1, "banner-n1-0 to leave the mesh")
        py_in(mesh, "banner-n1-0", code)  # unmeshed: plaintext, steered by sk_lookup
    finally:
        lab_ops.label("banner-n1-0", "nodeagent.io/mesh=enabled")
        wait_until(lambda: enrolled() == meshed_pods, "banner-n1-0 to rejoin the mesh")
    after = admin_client.scrape("127.0.0.1:4192")

    def grown(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    meshed = {"direction": "inbound", "pod": "http-n1-0", "peer": "spiffe://cluster.local/ns/default/sa/client",
              "tls": "true"}
    plain = {"direction": "inbound", "pod": "http-n1-0", "peer": "unauthenticated", "tls": "false"}
    for labels in (meshed, plain):
        assert grown("request_total", **labels) == 20
        assert grown("response_total", **labels, status_code=200, classification="success") == 16
        assert grown("response_total", **labels, status_code=500, classification="failure") == 4
        assert grown("response_latency_ms_count", **labels) == 20
