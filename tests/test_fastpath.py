"""The kernel fast path (sk_msg over loopback_socks) in the lab: real sockets, real programs.

Agents here run with --fast-path splice,skb,loopback and --on-node-plaintext:
apps' loopback sends skip TCP, and opaque connections the proxy only forwards
are spliced past it (sk_msg for apps' sends, sk_skb for what remote peers send).
"""

import json
import subprocess
import sys
import time

import pytest

from nodeagent.datapath.programs import CGROUP_PROGRAMS, SOCKHASH_PROGRAMS, SOCKOPS_PROXY
from nodeagent.lab import lab as lab_ops
from test_mtls_lab import annotate, held_connection_after, meshed_on
from test_proxy import agent_stats, counter, curl, py_in, wait_until

pytestmark = pytest.mark.privileged
MB = 1 << 20


@pytest.fixture(scope="module")
def lab():
    lab_ops.down()
    saved = lab_ops.AGENT_EXTRA_ARGS
    lab_ops.AGENT_EXTRA_ARGS = ["--fast-path", "splice,skb,loopback", "--on-node-plaintext", "true"]
    try:
        yield lab_ops.up(nodes=2, pods_per_node=5, mesh="node")
    finally:
        lab_ops.AGENT_EXTRA_ARGS = saved
        lab_ops.down()


def echo(lab, client: str, target_ip: str, size: int) -> dict:
    out = py_in(lab, client, f"from nodeagent.lab import client; import json; "
                             f"print(json.dumps(client.run('echo', {target_ip!r}, 9000, size={size})))")
    return json.loads(out)


def spliced(node: int, **labels) -> int:
    return counter(agent_stats(node), "tcp_spliced_bytes_total", **labels)


def spliced_grows(node: int, before: int, at_least: int, **labels) -> int:
    """Connections are counted when the proxy has closed its ends, just after the client's."""
    wait_until(lambda: spliced(node, **labels) - before >= at_least, f"{at_least} bytes spliced ({labels})")
    return spliced(node, **labels) - before


def fast_bytes(node: int, pod: str) -> int:
    return counter(agent_stats(node), "kernel_fast_path_bytes_total", pod=pod)


def test_the_fast_paths_programs_are_attached_once_to_their_sockhashes(lab):
    stats = agent_stats(0)
    assert sorted(stats["datapath"]["created"] + stats["datapath"]["adopted"]) == sorted(
        [p.name for p in CGROUP_PROGRAMS + SOCKHASH_PROGRAMS + (SOCKOPS_PROXY,)])
    assert len(_lab_programs("na_skb_verdict")) == 2  # one per node


def test_two_pods_of_a_node_exchange_100_mb_byte_exact_past_the_proxy(lab):
    before = spliced(0, direction="outbound", pod="client-n0-0")
    result = echo(lab, "client-n0-0", lab.plan.pod("echo-n0-0").ip, 100 * MB)
    assert result["ok"], result
    # The echo server's replies are spliced from its first byte (the splice is asked for before
    # the proxy forwards anything); the client never lets the proxy catch up (it sends while the
    # echo comes back), so its stream may stay with the proxy: not counted on here.
    spliced_grows(0, before, 100 * MB, direction="outbound", pod="client-n0-0")
    inbound = agent_stats(0)
    assert counter(inbound, "tcp_close_total", direction="inbound", pod="echo-n0-0",
                   peer="spiffe://cluster.local/ns/default/sa/client") >= 1


def test_across_nodes_the_loopback_legs_skip_tcp_and_mtls_stays(lab):
    before = fast_bytes(0, "client-n0-0")
    result = echo(lab, "client-n0-0", lab.plan.pod("echo-n1-0").ip, 100 * MB)
    assert result["ok"], result
    # app -> proxy by sk_msg (the proxy's own sends take TCP); the hop between nodes is mutual TLS.
    assert fast_bytes(0, "client-n0-0") - before >= 100 * MB
    stats = agent_stats(0)
    assert counter(stats, "tcp_read_bytes_total", direction="outbound", pod="client-n0-0",
                   peer="pod/default/echo-n1-0", tls="true") >= 100 * MB
    assert counter(stats, "tcp_spliced_bytes_total", tls="true") == 0


def test_many_short_connections_stay_byte_exact_while_splices_start(lab):
    """Each connection's switch from the proxy to the splice happens mid-stream: bytes must
    neither be lost nor overtake each other, whatever the timing."""
    code = f"""
import concurrent.futures, hashlib, os, socket
def one(i):
    payload = os.urandom(1000 + i * 997)
    with socket.create_connection(({lab.plan.pod("echo-n0-0").ip!r}, 9000), timeout=10) as s:
        for start in range(0, len(payload), 4096):  # many sends: the switch lands between two of them
            s.sendall(payload[start:start + 4096])
        s.shutdown(socket.SHUT_WR)
        got = b''
        while chunk := s.recv(65536):
            got += chunk
    return hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
with concurrent.futures.ThreadPoolExecutor(16) as pool:
    results = list(pool.map(one, range(300)))
print(sum(results), len(results))
"""
    assert py_in(lab, "client-n0-0", code).split() == ["300", "300"]


def test_a_server_that_speaks_first_and_http_work_on_the_node(lab):
    code = (f"import socket; s = socket.create_connection(({lab.plan.pod('banner-n0-0').ip!r}, 2525), timeout=5); "
            f"print(s.recv(100))")
    assert "220 banner-n0-0" in py_in(lab, "client-n0-0", code)
    assert "hello from http-n0-0" in curl(lab, "client-n0-0", f"http://{lab.plan.pod('http-n0-0').ip}:8080/")
    # HTTP/1 is served in one hop too (on_node.py): per request, counted on both sides, no TLS.
    stats = agent_stats(0)
    assert counter(stats, "response_total", direction="outbound", pod="client-n0-0", tls="false") >= 1
    assert counter(stats, "response_total", direction="inbound", pod="http-n0-0",
                   peer="spiffe://cluster.local/ns/default/sa/client", tls="false") >= 1


def test_the_destination_policy_still_decides_on_the_node(lab):
    target = lab.plan.pod("echo-n0-0").ip
    code = (f"import socket, time; time.sleep(0.3); s = socket.create_connection(({target!r}, 9000), timeout=5); "
            f"s.sendall(b'hello'); s.shutdown(socket.SHUT_WR)\n"
            f"try:\n    print(repr(s.recv(10)))\nexcept ConnectionResetError:\n    print('reset')")
    try:
        annotate(lab, "echo-n0-0", {"config.nodeagent.io/default-inbound-policy": "deny"})
        wait_until(lambda: py_in(lab, "client-n0-0", code).strip() in ("b''", "reset"), "deny to apply")
        assert counter(agent_stats(0), "inbound_authorization_total", pod="echo-n0-0", decision="deny") >= 1
    finally:
        annotate(lab, "echo-n0-0", {})
    wait_until(lambda: py_in(lab, "client-n0-0", code).strip() == "b'hello'", "the allow to return")


def test_a_policy_change_ends_on_node_connections_it_no_longer_admits(lab, tmp_path):
    """On the node (plaintext, spliced): the same re-check as across nodes, on the port asked."""
    other = "spiffe://cluster.local/ns/default/sa/other"
    assert held_connection_after(lab, "client-n0-0", "echo-n0-0", {"authz.nodeagent.io/8080": other}, tmp_path) == "alive"
    assert held_connection_after(lab, "client-n0-0", "echo-n0-0", {"authz.nodeagent.io/9000": other}, tmp_path) == "cut"


ROUNDS = """
import os, socket
s = socket.create_connection(({ip!r}, 9000), timeout=10)
for round in range(32):
    payload = os.urandom(1 << 20)
    s.sendall(payload)
    got = b''
    while len(got) < len(payload):
        got += s.recv(1 << 20)
    assert got == payload, round
print('32 rounds exact')
"""


STREAMER = """
import hashlib, socket, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(('0.0.0.0', 7100)); srv.listen()
print('listening', flush=True)
c, _ = srv.accept()
c.recv(1)
block = bytes(range(256)) * 4096
for i in range({blocks}):
    c.sendall(block[i % 256:] + block[:i % 256])
c.close()
time.sleep(2)
"""

FETCH = """
import hashlib, socket
block = bytes(range(256)) * 4096
expected = hashlib.sha256()
for i in range({blocks}):
    expected.update(block[i % 256:] + block[:i % 256])
s = socket.create_connection(({ip!r}, 7100), timeout=10)
s.sendall(b'go')
got = hashlib.sha256()
n = 0
while chunk := s.recv(1 << 20):
    got.update(chunk)
    n += len(chunk)
print(n, got.digest() == expected.digest())
"""


def test_a_download_from_outside_the_mesh_arrives_byte_exact_through_sk_skb(lab):
    """The bytes come from a remote peer: the sk_skb verdict puts them into the proxy's socket
    toward the app, and the EOF waits until the kernel's worker has sent them all."""
    server = lab.plan.pod("echo-n1-0")
    blocks = 100  # 100 MiB
    try:
        lab_ops.label("echo-n1-0", "nodeagent.io/mesh=disabled")
        wait_until(lambda: not meshed_on(1, "default/echo-n1-0"), "echo-n1-0 to leave the mesh")
        streamer = subprocess.Popen(["ip", "netns", "exec", server.netns, sys.executable, "-c",
                                     STREAMER.format(blocks=blocks)], stdout=subprocess.PIPE, text=True,
                                    preexec_fn=lambda: (lab.pod_cgroup(server) / "cgroup.procs").write_text("0"))
        try:
            assert streamer.stdout.readline().strip() == "listening"
            before = spliced(0, direction="outbound", pod="client-n0-0")
            out = py_in(lab, "client-n0-0", FETCH.format(blocks=blocks, ip=server.ip))
            assert out.split() == [str(blocks << 20), "True"]
            spliced_grows(0, before, 90 * MB, direction="outbound", pod="client-n0-0")
        finally:
            streamer.kill()
            streamer.wait()
    finally:
        lab_ops.label("echo-n1-0", "nodeagent.io/mesh=enabled")
    wait_until(lambda: meshed_on(1, "default/echo-n1-0"), "echo-n1-0 to rejoin")


def test_plaintext_to_and_from_pods_outside_the_mesh_is_spliced(lab):
    try:
        lab_ops.label("client-n1-0", "nodeagent.io/mesh=disabled")
        lab_ops.label("echo-n1-0", "nodeagent.io/mesh=disabled")
        wait_until(lambda: not meshed_on(1, "default/client-n1-0") and not meshed_on(1, "default/echo-n1-0"),
                   "two pods to leave the mesh")
        # Inbound from a client outside the mesh: the app's replies go straight into the client's socket.
        before = spliced(0, direction="inbound", pod="echo-n0-0")
        result = echo(lab, "client-n1-0", lab.plan.pod("echo-n0-0").ip, 32 * MB)
        assert result["ok"], result
        spliced_grows(0, before, 16 * MB, direction="inbound", pod="echo-n0-0")
        # Outbound to a pod outside the mesh: the app's bytes go straight into the proxy's socket
        # toward it, from the first pause in the app's sending (here: after each round).
        before = spliced(1, direction="outbound", pod="http-n1-0")
        assert py_in(lab, "http-n1-0", ROUNDS.format(ip=lab.plan.pod("echo-n1-0").ip)).strip() == "32 rounds exact"
        spliced_grows(1, before, 16 * MB, direction="outbound", pod="http-n1-0")
    finally:
        lab_ops.label("client-n1-0", "nodeagent.io/mesh=enabled")
        lab_ops.label("echo-n1-0", "nodeagent.io/mesh=enabled")
    wait_until(lambda: meshed_on(1, "default/client-n1-0") and meshed_on(1, "default/echo-n1-0"), "rejoin")


HOLDER = """
import socket, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(('0.0.0.0', 7000)); srv.listen()
print('listening', flush=True)
c, _ = srv.accept(); c.recv(1); c.settimeout(2)
sent = 0
try:
    while sent < (1 << 30):
        sent += c.send(b'y' * (1 << 20))
except OSError:
    pass
print(sent, flush=True)
time.sleep(5)
"""


def test_a_spliced_sender_is_still_held_back_by_a_receiver_that_does_not_read(lab):
    """The splice goes into a send queue: TCP's backpressure holds (an sk_msg redirect into a
    receive queue would let the sender queue without bound)."""
    server = lab.plan.pod("echo-n0-0")
    holder = subprocess.Popen(["ip", "netns", "exec", server.netns, sys.executable, "-c", HOLDER],
                              stdout=subprocess.PIPE, text=True,
                              preexec_fn=lambda: (lab.pod_cgroup(server) / "cgroup.procs").write_text("0"))
    try:
        assert holder.stdout.readline().strip() == "listening"
        code = (f"import socket, time; s = socket.create_connection(({server.ip!r}, 7000)); s.sendall(b'w'); "
                f"time.sleep(4); print('done')")
        assert py_in(lab, "client-n0-0", code).strip() == "done"
        sent = int(holder.stdout.readline())
        assert 0 < sent < 64 * MB, sent  # socket buffers' worth, not a gigabyte
    finally:
        holder.kill()
        holder.wait()


def _bpftool(*args: str):
    return json.loads(subprocess.run(["bpftool", *args, "--json"], capture_output=True, text=True, check=True).stdout)


def _lab_programs(name: str, node: str = "*") -> set[int]:
    """Ids of the programs called `name` that use a map pinned for the lab's `node` (another data
    path loaded on this machine meanwhile, by another test or tool, is not ours to count)."""
    maps = {_bpftool("map", "show", "pinned", str(path))["id"]
            for path in lab_ops.BPF_PIN_ROOT.glob(f"{node}/maps/*")}
    return {p["id"] for p in _bpftool("prog", "show") if p.get("name") == name and maps & set(p.get("map_ids", ()))}


def _loaded(ids: set[int]) -> set[int]:
    return ids & {p["id"] for p in _bpftool("prog", "show")}


def test_cleanup_frees_the_programs_even_with_sockets_in_the_sockhash(lab):
    """Runs last: it unmeshes node0. Sockets in the sockhash keep its programs alive until
    it is emptied; cleanup empties it, and the open connection goes on as plain TCP."""
    code = f"""
import socket, subprocess, sys, time
s = socket.create_connection(({lab.plan.pod("echo-n0-0").ip!r}, 9000), timeout=10)
def round_trip(data):
    s.sendall(data)
    got = b''
    while len(got) < len(data):
        got += s.recv(65536)
    return got == data
ok = round_trip(b'a' * 100000) and round_trip(b'b' * 100000)
print('open', ok, flush=True)
sys.stdin.readline()  # cleanup happens now
print('after', round_trip(b'c' * 100000), flush=True)
"""
    pod = lab.plan.pod("client-n0-0")
    process = subprocess.Popen(["ip", "netns", "exec", pod.netns, sys.executable, "-c", code],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               preexec_fn=lambda: (lab.pod_cgroup(pod) / "cgroup.procs").write_text("0"))
    try:
        assert process.stdout.readline().strip() == "open True"
        assert len(_lab_programs("na_msg")) == 2  # node0 and node1
        node0 = _lab_programs("na_msg", "node0")
        done = subprocess.run([sys.executable, "-m", "nodeagent", "cleanup", "--pin-root", str(lab_ops.BPF_PIN_ROOT),
                               "--node", "node0"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        wait_until(lambda: not _loaded(node0), "node0's sk_msg program to be freed")
        process.stdin.write("go\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "after True"
    finally:
        process.kill()
        process.wait()
