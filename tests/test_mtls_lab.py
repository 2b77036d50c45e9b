"""Mutual TLS and authorization between lab pods on two simulated nodes."""

import json
import os
import socket
import threading
import time
import urllib.request

import pytest

from conftest import lab_fixture
from nodeagent import netns
from nodeagent.lab import lab as lab_ops
from nodeagent.lab import manifests
from nodeagent.lab.plan import FABRIC_NETNS, veth_name
from test_proxy import agent_stats, counter, curl, py_in, wait_until

pytestmark = pytest.mark.privileged
ETH_P_ALL = 0x0003


mesh = lab_fixture(mesh="node")


class Capture:
    """Every frame through one port of the lab bridge, read in the fabric namespace."""

    def __init__(self, ifname: str):
        with netns.entered(netns.named_path(FABRIC_NETNS)):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((ifname, 0))
        self.sock.settimeout(0.2)
        self.frames: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while not self.stop.is_set():
            try:
                self.frames.append(self.sock.recv(65536))
            except TimeoutError:
                continue
            except OSError:
                return  # the fabric went away (a failed test's lab was torn down)

    def finish(self) -> bytes:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()
        return b"".join(self.frames)


def pod_port(lab, pod_name: str) -> str:
    """The fabric side of a pod's link: where its frames cross the bridge."""
    pod = lab.plan.pod(pod_name)
    node = next(n for n in lab.plan.nodes if n.name == pod.node)
    index = [p.name for p in lab.plan.pods if p.node == pod.node].index(pod_name)
    return veth_name(node.index, index)


def send_marker(lab, marker: str) -> bool:
    """Whether the marker, sent 50 times to echo-n1-0, came back whole."""
    target = lab.plan.pod("echo-n1-0").ip
    code = (f"import socket; s = socket.create_connection(({target!r}, 9000), timeout=5)\n"
            f"s.sendall({marker!r}.encode() * 50); s.shutdown(socket.SHUT_WR)\n"
            f"got = b''\nwhile chunk := s.recv(65536): got += chunk\nprint(len(got))")
    return py_in(lab, "client-n0-0", code).strip() == str(len(marker) * 50)


def meshed_on(node_index: int, pod_key: str) -> bool:
    return any(p["pod"] == pod_key for p in agent_stats(node_index)["pods"])


def test_bytes_between_meshed_pods_are_encrypted_on_the_wire(mesh):
    marker = os.urandom(16).hex()
    capture = Capture(pod_port(mesh, "echo-n1-0"))
    assert send_marker(mesh, marker)
    wire = capture.finish()
    assert len(wire) > len(marker) * 50  # the transfer crossed this port
    assert marker.encode() not in wire
    # Control: the same transfer to the pod out of the mesh crosses the wire in the clear.
    lab_ops.label("echo-n1-0", "nodeagent.io/mesh=disabled")
    try:
        wait_until(lambda: not meshed_on(1, "default/echo-n1-0"), "echo-n1-0 to leave the mesh")
        capture = Capture(pod_port(mesh, "echo-n1-0"))
        # node0's agent learns of the change on its own poll: until then it still opens a tunnel
        # to a mesh port that is gone, and the client is reset.
        wait_until(lambda: send_marker(mesh, marker), "node0's agent to see echo-n1-0 out of the mesh")
        assert marker.encode() in capture.finish()
    finally:
        lab_ops.label("echo-n1-0", "nodeagent.io/mesh=enabled")
        wait_until(lambda: meshed_on(1, "default/echo-n1-0"), "echo-n1-0 to rejoin")


def annotate(lab, pod_name: str, annotations: dict) -> None:
    path = lab.cluster_dir / "pods" / "default" / f"{pod_name}.yaml"
    import yaml

    manifest = yaml.safe_load(path.read_text())
    manifest["metadata"]["annotations"] = annotations
    manifests.write_manifest(lab.cluster_dir, manifest)


def status_of(lab, client: str, url: str, *options: str) -> str:
    return curl(lab, client, url, *options, "-o", "/dev/null", "-w", "%{http_code}")


def test_inbound_policy_modes_and_port_allow_lists(mesh):
    url = f"http://{mesh.plan.pod('http-n1-0').ip}:8080/"
    try:
        annotate(mesh, "http-n1-0", {"config.nodeagent.io/default-inbound-policy": "deny"})
        wait_until(lambda: status_of(mesh, "client-n0-0", url) == "403", "deny to apply")
        headers = curl(mesh, "client-n0-0", url, "-D", "-", "-o", "/dev/null")
        assert "nodeagent-proxy-error: unauthorized" in headers
        # HTTP/2 is refused in its own language too, and admitted again once the policy allows.
        h2_url = f"http://{mesh.plan.pod('h2c-n1-0').ip}:8081/"
        annotate(mesh, "h2c-n1-0", {"config.nodeagent.io/default-inbound-policy": "deny"})
        wait_until(lambda: status_of(mesh, "client-n0-0", h2_url, "--http2-prior-knowledge") == "403",
                   "deny on h2c to apply")
        headers = curl(mesh, "client-n0-0", h2_url, "--http2-prior-knowledge", "-D", "-", "-o", "/dev/null")
        assert "nodeagent-proxy-error: unauthorized" in headers
        annotate(mesh, "h2c-n1-0", {})
        wait_until(lambda: status_of(mesh, "client-n0-0", h2_url, "--http2-prior-knowledge") == "200",
                   "allow on h2c to apply")
        # Opaque traffic is refused by closing: a raw connection gets nothing back.
        annotate(mesh, "echo-n1-0", {"config.nodeagent.io/default-inbound-policy": "deny"})
        code = (f"import socket, time; time.sleep(0.5); s = socket.create_connection(({mesh.plan.pod('echo-n1-0').ip!r}, "
                f"9000), timeout=5); s.sendall(b'\\x00\\x01'); print(repr(s.recv(10)))")
        wait_until(lambda: py_in(mesh, "client-n0-0", code).strip() == "b''", "deny on echo to apply")

        # All-authenticated: meshed clients pass, a client outside the mesh does not.
        annotate(mesh, "http-n1-0", {"config.nodeagent.io/default-inbound-policy": "all-authenticated"})
        wait_until(lambda: status_of(mesh, "client-n0-0", url) == "200", "all-authenticated to apply")
        lab_ops.label("client-n1-0", "nodeagent.io/mesh=disabled")
        wait_until(lambda: not meshed_on(1, "default/client-n1-0"), "client-n1-0 to leave")
        assert status_of(mesh, "client-n1-0", url) == "403"
        lab_ops.label("client-n1-0", "nodeagent.io/mesh=enabled")
        wait_until(lambda: meshed_on(1, "default/client-n1-0"), "client-n1-0 to rejoin")

        # A port allow-list: only the client ServiceAccount's identity may use 8080.
        annotate(mesh, "http-n1-0", {"authz.nodeagent.io/8080": "spiffe://cluster.local/ns/default/sa/client"})
        wait_until(lambda: status_of(mesh, "banner-n0-0", url) == "403", "the allow-list to apply")
        assert status_of(mesh, "client-n0-0", url) == "200"
    finally:
        annotate(mesh, "http-n1-0", {})
        annotate(mesh, "echo-n1-0", {})
        annotate(mesh, "h2c-n1-0", {})
        lab_ops.label("client-n1-0", "nodeagent.io/mesh=enabled")
    stats = agent_stats(1)
    assert counter(stats, "inbound_authorization_total", pod="http-n1-0", decision="deny") >= 3
    assert counter(stats, "inbound_authorization_total", pod="http-n1-0", decision="allow", tls="true") >= 2


def test_the_agent_holds_identities_only_for_its_nodes_service_accounts(mesh):
    for index, node in enumerate(mesh.plan.nodes):
        accounts = {p.service_account for p in mesh.plan.pods if p.node == node.name}
        expected = {f"spiffe://cluster.local/ns/default/sa/{sa}" for sa in accounts}
        assert set(agent_stats(index)["identities"]) == expected


HELD = """
import os, socket, sys, time
s = socket.create_connection(({ip!r}, {port}), timeout=5)
s.sendall(b'a'); assert s.recv(1) == b'a'
open({marker!r}, 'w').close()  # connected and echoing: the test may change the policy now
deadline = time.monotonic() + 6  # a policy change applies within a second
try:
    while time.monotonic() < deadline:
        s.sendall(b'b')
        if s.recv(1) != b'b':
            print('cut'); sys.exit()
        time.sleep(0.1)
except OSError:
    print('cut'); sys.exit()
print('alive')
"""


def held_connection_after(lab, client: str, server: str, annotations: dict, tmp_path) -> str:
    """'cut' or 'alive': an echo connection from `client` to `server`:9000 that was allowed
    when it opened, once `server`'s annotations become `annotations`."""
    marker = tmp_path / f"connected-{client}-{server}"
    marker.unlink(missing_ok=True)  # a call before this one left its own
    # The connection must be admitted when it opens: an earlier test's policy on `server` is
    # lifted by an annotation the agent sees a moment later, not at once.
    probe = (f"import socket\ntry:\n    s = socket.create_connection(({lab.plan.pod(server).ip!r}, 9000), timeout=5)\n"
             f"    s.sendall(b'p'); print(repr(s.recv(1)))\nexcept OSError as error:\n    print(error)")
    wait_until(lambda: py_in(lab, client, probe).strip() == "b'p'", f"{server}:9000 to admit {client}")
    code = HELD.format(ip=lab.plan.pod(server).ip, port=9000, marker=str(marker))
    outcome = []
    runner = threading.Thread(target=lambda: outcome.append(py_in(lab, client, code).strip()), daemon=True)
    runner.start()
    try:
        wait_until(lambda: marker.exists() or not runner.is_alive(), "the connection to echo")
        annotate(lab, server, annotations)
        runner.join(40)
    finally:
        annotate(lab, server, {})
    return outcome[0] if outcome else "no answer"


def test_a_policy_change_ends_the_connections_it_no_longer_admits(mesh, tmp_path):
    """Across nodes (mutual TLS): an allow-list on another port leaves the connection alone; one
    on its port that names someone else ends it."""
    other = "spiffe://cluster.local/ns/default/sa/other"
    assert held_connection_after(mesh, "client-n0-0", "echo-n1-0", {"authz.nodeagent.io/8080": other}, tmp_path) == "alive"
    assert held_connection_after(mesh, "client-n0-0", "echo-n1-0", {"authz.nodeagent.io/9000": other}, tmp_path) == "cut"


KEPT_ALIVE = """
import http.client, json, time
stop_after = time.monotonic() + {seconds}
conn, answers = http.client.HTTPConnection({ip!r}, 8080, timeout=10), []
while time.monotonic() < stop_after:
    for attempt in (1, 2):  # an idle kept-alive connection the server closed: open another, as clients do
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
            break
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            conn.close()
            conn = http.client.HTTPConnection({ip!r}, 8080, timeout=10)
    answers.append((time.time(), response.status))
    if response.getheader("connection", "").lower() == "close":
        conn.close()
        conn = http.client.HTTPConnection({ip!r}, 8080, timeout=10)
    time.sleep(0.05)
print(json.dumps(answers))
"""


def retired_pods(node_index: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{4191 + node_index}/debug/memory", timeout=30) as response:
        return sum(p["tables"]["pods_retired"] for p in json.load(response)["processes"])


def test_a_pod_that_leaves_and_joins_again_serves_a_kept_alive_client_as_before(mesh):
    """A server pod leaves the mesh and joins again while a client keeps a connection alive to it.
    Its agent asks the departed pod's HTTP connections to end, and releases what they held (the
    pod's namespace descriptor: connections opened into the pod through a number closed early
    went wherever the number pointed next) once they have. Before the pod leaves and once it
    has joined again, every request is answered 200. (In between, the two agents read the change
    a moment apart: a mesh hop to a pod its agent no longer serves is refused.)"""
    outcome = []
    code = KEPT_ALIVE.format(ip=mesh.plan.pod("http-n1-0").ip, seconds=8)
    runner = threading.Thread(target=lambda: outcome.append(py_in(mesh, "client-n0-0", code).strip()), daemon=True)
    runner.start()
    try:
        time.sleep(1.5)
        left_at = time.time()
        lab_ops.label("http-n1-0", "nodeagent.io/mesh=disabled")
        wait_until(lambda: not meshed_on(1, "default/http-n1-0"), "http-n1-0 to leave")
        wait_until(lambda: retired_pods(1) == 0, "the departed pod's connections to end")
        lab_ops.label("http-n1-0", "nodeagent.io/mesh=enabled")
        wait_until(lambda: meshed_on(1, "default/http-n1-0") and meshed_on(0, "default/client-n0-0"),
                   "http-n1-0 to rejoin")
        settled_at = time.time() + 1.0  # both agents have read the label (they poll every 0.25 s)
    finally:
        lab_ops.label("http-n1-0", "nodeagent.io/mesh=enabled")
        runner.join(30)
    assert outcome, "the client did not finish"
    answers = json.loads(outcome[0])
    before = [status for at, status in answers if at < left_at]
    after = [status for at, status in answers if at > settled_at]
    assert len(before) > 10 and len(after) > 10, answers
    assert set(before) == {200} and set(after) == {200}, answers


@pytest.fixture
def short_lived_certificates(monkeypatch):
    lab_ops.down()
    monkeypatch.setattr(lab_ops, "AGENT_EXTRA_ARGS", ["--cert-lifetime", "4s"])
    created = lab_ops.up(nodes=2, pods_per_node=5, mesh="node")
    yield created
    lab_ops.down()


LONG_LIVED = """
import socket, time
s = socket.create_connection(({ip!r}, 9000), timeout=10)
ok = 0
for i in range(24):  # 6 s of traffic on one connection, across renewals at 2.8 s and later
    s.sendall(b"tick-%03d" % i)
    ok += s.recv(100) == b"tick-%03d" % i
    time.sleep(0.25)
print(ok)
"""


def test_renewal_while_a_long_lived_connection_carries_traffic(mesh, short_lived_certificates):
    lab = short_lived_certificates
    issued = agent_stats(1)["certificates_issued"]
    assert py_in(lab, "client-n0-0", LONG_LIVED.format(ip=lab.plan.pod("echo-n1-0").ip)).strip() == "24"
    assert agent_stats(1)["certificates_issued"] > issued  # renewed meanwhile
    # New connections use the new certificates.
    assert curl(lab, "client-n0-0", f"http://{lab.plan.pod('http-n1-0').ip}:8080/") == "hello from http-n1-0\n"


