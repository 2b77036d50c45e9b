"""The node proxy in the lab: one agent per simulated node, real clients in pods."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from nodeagent.datapath import libbpf
from nodeagent.datapath.programs import CGROUP_PROGRAMS
from nodeagent.lab import lab as lab_ops
from nodeagent.lab import manifests, pods

pytestmark = pytest.mark.privileged
HTTP_VIP, H2C_VIP, ECHO_VIP, BANNER_VIP = "10.96.0.10", "10.96.0.11", "10.96.0.12", "10.96.0.13"
TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module", params=["node", "sidecar"])
def mesh(request):
    """The same functional tests in both modes: one agent per node, and one proxy per pod."""
    lab_ops.down()
    created = lab_ops.up(nodes=2, pods_per_node=5, mesh=request.param)
    yield created
    lab_ops.down()


def node_mode_only(lab):
    if lab.mesh != "node":
        pytest.skip("about the per-node agent itself")


def client_admin(lab, pod_name: str = "client-n0-0") -> int:
    """The admin port of the proxy serving `pod_name`: its node's agent, or its sidecar."""
    pod = lab.plan.pod(pod_name)
    if lab.mesh == "sidecar":
        return lab_ops.sidecar_admin_port(lab, pod)
    return next(n.admin_port for n in lab.plan.nodes if n.name == pod.node)


def proxy_stats(lab, pod_name: str = "client-n0-0") -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{client_admin(lab, pod_name)}/stats", timeout=5) as response:
        return json.load(response)


def run_in(lab, pod_name: str, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    pod = lab.plan.pod(pod_name)
    return pods.run(pod, lab.pod_cgroup(pod), argv, timeout_s=timeout)


def py_in(lab, pod_name: str, code: str, timeout: float = 120) -> str:
    done = run_in(lab, pod_name, [sys.executable, "-c", code], timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout


def curl(lab, pod_name: str, url: str, *options: str) -> str:
    done = run_in(lab, pod_name, ["curl", "-sS", "-m", "10", *options, url])
    assert done.returncode == 0, done.stderr
    return done.stdout


def agent_stats(node_index: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{4191 + node_index}/stats", timeout=5) as response:
        return json.load(response)


def counter(stats: dict, name: str, **labels) -> int:
    return sum(c["value"] for c in stats["counters"]
               if c["name"] == name and all(c["labels"].get(k) == v for k, v in labels.items()))


def behave(lab, pod_name: str, setting: str) -> None:
    """Tell an http or h2c pod how to answer from now on (/set-delay/<ms>, /set-status/<code>)."""
    ip = lab.plan.pod(pod_name).ip
    if pod_name.startswith("h2c"):
        assert pod_name in curl(lab, "client-n1-0", f"http://{ip}:8081/{setting}", "--http2-prior-knowledge")
    else:
        assert pod_name in curl(lab, "client-n1-0", f"http://{ip}:8080/{setting}")


def add_service(lab, name: str, vip: str, selector: dict, annotations: dict, target_port: int = 8080) -> None:
    manifest = {"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": "default", "annotations": annotations},
                "spec": {"clusterIP": vip, "selector": selector, "ports": [{"port": 80, "targetPort": target_port}]}}
    manifests.write_manifest(lab.cluster_dir, manifest)


def wait_until(predicate, what: str, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return result


def wait_for_service(lab, vip: str, *curl_options: str) -> None:
    """Until the agent has read the new Service's manifest (a new connection routes to it)."""
    wait_until(lambda: curl(lab, "client-n0-0", f"http://{vip}/", *curl_options, "-o", "/dev/null", "-w",
                            "%{http_code}") == "200", f"the Service at {vip}")


def served_by(lab, client: str, url: str, count: int) -> dict[str, int]:
    """Send `count` GETs on one keep-alive connection; how many each pod served."""
    code = f"""
import http.client, collections, json, urllib.parse
u = urllib.parse.urlsplit({url!r})
conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=10)
seen = collections.Counter()
for _ in range({count}):
    conn.request("GET", u.path or "/")
    response = conn.getresponse(); response.read()
    seen[(response.getheader("x-pod") or "none") + " " + str(response.status)] += 1
print(json.dumps(seen))
"""
    return json.loads(py_in(lab, client, code))


def h2_served_by(lab, client: str, url: str, count: int) -> dict[str, int]:
    """Send `count` HTTP/2 GETs, one after another, on one connection; how many each pod served."""
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.partition(":")
    return json.loads(py_in(lab, client, f"import sys; sys.path.insert(0, {TESTS!r}); import h2_client; import json; "
                                         f"print(json.dumps(h2_client.count_served({host!r}, {port or 80}, "
                                         f"'/{path}', {count})))"))


def test_agents_are_ready_and_serve_every_pod_of_their_node(mesh):
    node_mode_only(mesh)
    for i in range(2):
        stats = agent_stats(i)
        assert stats["ready"] and len(stats["pods"]) == 5
        assert sorted(stats["datapath"]["created"] + stats["datapath"]["adopted"]) == sorted(
            [p.name for p in CGROUP_PROGRAMS])


def test_curl_http1_through_a_service_and_to_a_pod_ip(mesh):
    assert curl(mesh, "client-n0-0", f"http://{HTTP_VIP}/").startswith("hello from http-n")
    assert curl(mesh, "client-n1-0", f"http://{mesh.plan.pod('http-n0-0').ip}:8080/") == "hello from http-n0-0\n"
    before = proxy_stats(mesh)
    curl(mesh, "client-n0-0", f"http://{HTTP_VIP}/status/201")
    after = proxy_stats(mesh)
    assert counter(after, "response_total", peer="svc/default/http", status_code="201") == counter(
        before, "response_total", peer="svc/default/http", status_code="201") + 1
    # The client pod's kernel counters saw the redirects.
    client = next(p for p in after["pods"] if p["pod"] == "default/client-n0-0")
    assert client["kernel"]["redirected"] >= 2


def test_curl_h2c_prior_knowledge_through_the_mesh(mesh):
    assert curl(mesh, "client-n0-0", f"http://{H2C_VIP}/", "--http2-prior-knowledge").startswith("hello from h2c-n")


def test_http_keep_alive_chunked_bodies_and_head_requests(mesh):
    code = f"""
import http.client
conn = http.client.HTTPConnection({HTTP_VIP!r}, 80, timeout=10)
conn.request("POST", "/", body=iter([b"chunk-1 ", b"chunk-2"]), encode_chunked=True,
             headers={{"transfer-encoding": "chunked"}})
r = conn.getresponse(); print(r.status, r.read())
conn.request("HEAD", "/bytes/1000"); r = conn.getresponse(); print(r.status, r.getheader("content-length"), r.read())
conn.request("GET", "/bytes/100000"); r = conn.getresponse(); print(r.status, len(r.read()))
"""
    assert py_in(mesh, "client-n0-0", code).splitlines() == [
        "200 b'chunk-1 chunk-2'", "200 1000 b''", "200 100000"]


def test_tcp_echo_of_a_large_payload_is_byte_exact(mesh):
    for target in (ECHO_VIP, mesh.plan.pod("echo-n1-0").ip, mesh.plan.pod("echo-n0-0").ip):
        out = py_in(mesh, "client-n0-0", f"from nodeagent.lab import client; import json; "
                                         f"print(json.dumps(client.run('echo', {target!r}, 9000, size=32 << 20)))")
        result = json.loads(out)
        assert result["ok"], result
    if mesh.mesh == "node":  # the kernel fast paths are off unless asked for (test_fastpath.py)
        assert counter(agent_stats(0), "kernel_fast_path_bytes_total") == 0


def test_a_server_that_speaks_first_is_heard_without_the_client_speaking(mesh):
    for target in (BANNER_VIP, mesh.plan.pod("banner-n0-0").ip, mesh.plan.pod("banner-n1-0").ip):
        code = f"import socket; s = socket.create_connection(({target!r}, 2525), timeout=5); print(s.recv(100))"
        assert "220 banner-n" in py_in(mesh, "client-n0-0", code)


@pytest.mark.parametrize("kind", ["http", "h2c"])
def test_balancing_shifts_load_away_from_a_slow_endpoint(mesh, kind):
    """Per request, on one client connection: HTTP/1 keep-alive, or HTTP/2 streams."""
    h2 = kind == "h2c"
    behave(mesh, f"{kind}-n0-0", "set-delay/150")  # the endpoint on the client's own node
    try:
        seen = (h2_served_by if h2 else served_by)(mesh, "client-n0-0", f"http://{H2C_VIP if h2 else HTTP_VIP}/", 60)
    finally:
        behave(mesh, f"{kind}-n0-0", "set-delay/0")
    assert seen.get(f"{kind}-n1-0 200", 0) >= 48, seen
    assert counter(proxy_stats(mesh), "request_total", peer=f"svc/default/{kind}") >= 60


@pytest.mark.parametrize("kind", ["http", "h2c"])
def test_a_failing_endpoint_is_ejected_and_retried_requests_still_succeed(mesh, kind):
    vip, port, h2 = {"http": ("10.96.0.50", 8080, False), "h2c": ("10.96.0.53", 8081, True)}[kind]
    add_service(mesh, f"{kind}-retry", vip, {"app": kind}, {"retry.nodeagent.io/http": "5xx"}, port)
    wait_for_service(mesh, vip, *(["--http2-prior-knowledge"] if h2 else []))
    behave(mesh, f"{kind}-n1-0", "set-status/503")
    behave(mesh, f"{kind}-n0-0", "set-delay/20")  # so that the failing one, being faster, is chosen
    try:
        seen = (h2_served_by if h2 else served_by)(mesh, "client-n0-0", f"http://{vip}/", 40)
    finally:
        behave(mesh, f"{kind}-n1-0", "set-status/0")
        behave(mesh, f"{kind}-n0-0", "set-delay/0")
    assert seen == {f"{kind}-n0-0 200": 40}, seen
    stats = proxy_stats(mesh)
    assert counter(stats, "endpoint_ejections_total", peer=f"svc/default/{kind}-retry") >= 1
    assert counter(stats, "retries_total", peer=f"svc/default/{kind}-retry") >= 1


H2_LARGE = """
import hashlib, os, sys, json
sys.path.insert(0, {tests!r})
from h2_client import H2Client
client = H2Client({host!r}, 80, timeout=30)
upload = os.urandom(4 * 1024 * 1024)
echo = client.request("POST", "/", body=upload)
download = client.request("GET", "/bytes/{size}")
echoed, downloaded = client.wait(echo, download)
print(json.dumps([echoed.status, hashlib.sha256(echoed.body).digest() == hashlib.sha256(upload).digest(),
                  downloaded.status, len(downloaded.body)]))
"""


def test_http2_large_bodies_both_ways_through_the_mesh(mesh):
    """Flow control across the client's connection, the mTLS tunnel and the endpoint's."""
    size = 20 * 1024 * 1024
    result = json.loads(py_in(mesh, "client-n0-0", H2_LARGE.format(tests=TESTS, host=H2C_VIP, size=size)))
    assert result == [200, True, 200, size]


def test_the_retry_budget_stops_a_retry_storm(mesh):
    add_service(mesh, "http-storm", "10.96.0.51", {"app": "http"},
                {"retry.nodeagent.io/http": "429", "retry.nodeagent.io/limit": "3"})
    wait_for_service(mesh, "10.96.0.51")
    for pod in ("http-n0-0", "http-n1-0"):
        behave(mesh, pod, "set-status/429")  # retried, but not a failure that ejects
    try:
        seen = served_by(mesh, "client-n0-0", "http://10.96.0.51/", 400)
    finally:
        for pod in ("http-n0-0", "http-n1-0"):
            behave(mesh, pod, "set-status/0")
    assert sum(v for k, v in seen.items() if k.endswith(" 429")) == 400
    stats = proxy_stats(mesh)
    retries = counter(stats, "retries_total", peer="svc/default/http-storm")
    refused = counter(stats, "retry_budget_exhausted_total", peer="svc/default/http-storm")
    # 20% of ~401 requests plus 10/s over 10 s, instead of up to 400 retries.
    assert 100 <= retries <= 181 and refused >= 219, (retries, refused)


def test_no_endpoints_is_a_503_with_a_reason_and_tcp_is_reset(mesh):
    add_service(mesh, "nobody", "10.96.0.52", {"app": "nobody"}, {})
    wait_until(lambda: "503" in curl(mesh, "client-n0-0", "http://10.96.0.52/", "-o", "/dev/null", "-w",
                                     "%{http_code}"), "the new Service")
    headers = curl(mesh, "client-n0-0", "http://10.96.0.52/", "-D", "-", "-o", "/dev/null")
    assert "nodeagent-proxy-error: no endpoints" in headers
    code = ("import socket; s = socket.create_connection(('10.96.0.52', 80), timeout=5); s.sendall(b'\\x00raw');"
            "\ntry:\n print(repr(s.recv(10)))\nexcept OSError as e:\n print(e.errno)")
    assert py_in(mesh, "client-n0-0", code).strip() in (str(errno.ECONNRESET), "b''")


MALFORMED = """
import socket
def exchange(data):
    s = socket.create_connection(({vip!r}, 80), timeout=10); s.sendall(data)
    reply = b""
    while chunk := s.recv(65536): reply += chunk
    return reply.split(b"\\r\\n")[0].decode()
print(exchange(b"GET / HTTP/1.1\\r\\nno colon here\\r\\n\\r\\n"))
print(exchange(b"GET / HTTP/1.1\\r\\nx-big: " + b"a" * 70000 + b"\\r\\n\\r\\n"))
print(exchange(b"GET / HTTP/1.1\\r\\nhost: x\\r\\nconnection: close\\r\\n\\r\\n"))
"""


def test_malformed_requests_get_400_and_the_proxy_serves_the_next(mesh):
    lines = py_in(mesh, "client-n0-0", MALFORMED.format(vip=HTTP_VIP)).splitlines()
    assert lines[:2] == ["HTTP/1.1 400 Bad Request", "HTTP/1.1 431 Request Header Fields Too Large"]
    assert lines[2].startswith("HTTP/1.1 200 ")
    assert counter(proxy_stats(mesh), "http_errors_total", status_code="400") >= 1


def test_pods_leave_and_rejoin_the_mesh_live(mesh):
    def meshed(pod_key):
        return any(p["pod"] == pod_key for p in proxy_stats(mesh)["pods"])

    assert lab_ops.label("client-n0-0", "nodeagent.io/mesh=disabled")
    try:
        wait_until(lambda: not meshed("default/client-n0-0"), "the pod to leave")
        # Unmeshed: Service VIPs route nowhere (no kube-proxy in the lab); pod IPs work directly.
        assert "Network is unreachable" in py_in(mesh, "client-n0-0", f"""
import socket
try: socket.create_connection(({HTTP_VIP!r}, 80), timeout=5)
except OSError as e: print(e.strerror)""")
        assert curl(mesh, "client-n0-0", f"http://{mesh.plan.pod('http-n1-0').ip}:8080/") == "hello from http-n1-0\n"
    finally:
        lab_ops.label("client-n0-0", "nodeagent.io/mesh=enabled")
    wait_until(lambda: meshed("default/client-n0-0"), "the pod to rejoin")
    assert curl(mesh, "client-n0-0", f"http://{HTTP_VIP}/").startswith("hello from")


def _agent_pid(mesh, node: str) -> int:
    """The agent's main process (its worker processes are its children, in the same cgroup)."""
    pids = lab_ops.cgroups.pids_in(lab_ops.agent_cgroup(mesh, node))
    (pid,) = [p for p in pids if int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1]) not in pids]
    return pid


def test_a_killed_agent_fails_closed_and_its_successor_serves_the_same_pods(mesh):
    node_mode_only(mesh)
    node = mesh.plan.nodes[0]
    os.kill(_agent_pid(mesh, "node0"), signal.SIGKILL)
    wait_until(lambda: not lab_ops.agent_ready(node), "the agent to die")
    target = mesh.plan.pod("http-n1-0").ip
    refused = f"""
import socket
try: socket.create_connection(({target!r}, 8080), timeout=5); print("connected")
except OSError as e: print(e.errno)"""
    assert py_in(mesh, "client-n0-0", refused).strip() == str(errno.ECONNREFUSED)
    # From node1 the client's own proxy accepts, then finds node0's pod refusing it: a 502 with the reason.
    inbound = curl(mesh, "client-n1-0", f"http://{mesh.plan.pod('http-n0-0').ip}:8080/", "-D", "-")
    assert inbound.startswith("HTTP/1.1 502") and "nodeagent-proxy-error: connect failed" in inbound

    lab_ops.start_agent(mesh, node)
    lab_ops.wait_agent_ready(node)
    stats = agent_stats(0)
    assert sorted(stats["datapath"]["adopted"]) == sorted([p.name for p in CGROUP_PROGRAMS])
    assert len(stats["pods"]) == 5
    assert curl(mesh, "client-n0-0", f"http://{target}:8080/") == "hello from http-n1-0\n"
    assert curl(mesh, "client-n1-0", f"http://{mesh.plan.pod('http-n0-0').ip}:8080/") == "hello from http-n0-0\n"
    fd = os.open(mesh.cgroup_root / "node0", os.O_RDONLY)
    try:
        assert [len(libbpf.prog_query(fd, p.attach_type)) for p in CGROUP_PROGRAMS] == [1] * len(CGROUP_PROGRAMS)
    finally:
        os.close(fd)


def test_a_meshed_pod_still_cannot_reach_outside_the_lab(mesh):
    # The pod's connect lands on its proxy; the proxy's connect, made in the pod's namespace, has no route.
    headers = curl(mesh, "client-n0-0", "http://198.51.100.1/", "-D", "-", "-o", "/dev/null")
    assert headers.startswith("HTTP/1.1 502") and "nodeagent-proxy-error: connect failed" in headers
    code = ("import socket; s = socket.create_connection(('198.51.100.1', 9000), timeout=5); s.sendall(b'\\x00');"
            "\ntry:\n print(repr(s.recv(10)))\nexcept OSError as e:\n print(e.errno)")
    assert py_in(mesh, "client-n0-0", code).strip() in (str(errno.ECONNRESET), "b''")


def test_an_idle_opaque_connection_is_closed_after_the_services_idle_timeout(mesh):
    manifests.write_manifest(mesh.cluster_dir, {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "echo-idle", "namespace": "default",
                     "annotations": {"timeout.nodeagent.io/idle": "500ms"}},
        "spec": {"clusterIP": "10.96.0.53", "selector": {"app": "echo"},
                 "ports": [{"port": 9000, "targetPort": 9000}]}})
    code = """
import socket, time
s = socket.create_connection(("10.96.0.53", 9000), timeout=10)
s.sendall(b"ping"); assert s.recv(10) == b"ping"
start = time.monotonic()
print(s.recv(10), round(time.monotonic() - start))
"""
    # Until the agent has read the Service, the VIP routes nowhere: retry until it answers.
    out = wait_until(lambda: (run_in(mesh, "client-n0-0", [sys.executable, "-c", code]).stdout or None),
                     "the Service at 10.96.0.53")
    data, waited = out.split()
    assert data == "b''" and int(waited) < 10  # closed by the proxy, not the 10 s socket timeout
