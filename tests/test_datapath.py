"""The eBPF data path in the lab: real programs, real namespaces, real sockets."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import lab_fixture
from nodeagent import netns
from nodeagent.datapath import cleanup, libbpf
from nodeagent.datapath.control import Datapath, PodEntry
from nodeagent.datapath.loader import LoadError, load_in_subprocess
from nodeagent.datapath.pins import PinLayout
from nodeagent.datapath.programs import CGROUP_PROGRAMS, SK_LOOKUP
from nodeagent.lab import lab as lab_ops
from nodeagent.lab import pods
from standin_proxy import OUTBOUND_PORT, StandinProxy

pytestmark = pytest.mark.privileged
NODE = "node0"
STANDIN = Path(__file__).with_name("standin_proxy.py")


lab = lab_fixture()


@pytest.fixture
def node_cgroup(lab):
    return lab.cgroup_root / NODE


@pytest.fixture
def loaded(lab, node_cgroup):
    """node0's data path loaded into the lab; removed after each test."""
    report = load_in_subprocess(NODE, node_cgroup, lab_ops.BPF_PIN_ROOT)
    yield report
    cleanup.remove_node(PinLayout(lab_ops.BPF_PIN_ROOT, NODE))


@pytest.fixture
def proxy(loaded):
    standin = StandinProxy(lab_ops.BPF_PIN_ROOT, NODE)
    yield standin
    standin.close()


def run_in(lab, pod_name: str, code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    pod = lab.plan.pod(pod_name)
    return pods.run(pod, lab.pod_cgroup(pod), [sys.executable, "-c", code], timeout_s=timeout)


def serve(lab, proxy, pod_name: str, slot: int, enrol: bool = True) -> int:
    pod = lab.plan.pod(pod_name)
    return proxy.serve_pod(pod.netns, pod.ip, slot, enrol)


def attached(cgroup: Path) -> dict[str, int]:
    """How many programs of each hook are attached to the cgroup."""
    fd = os.open(cgroup, os.O_RDONLY)
    try:
        return {p.name: len(libbpf.prog_query(fd, p.attach_type)) for p in CGROUP_PROGRAMS}
    finally:
        os.close(fd)


def sk_lookup_count(lab, pod_name: str) -> int:
    fd = os.open(netns.named_path(lab.plan.pod(pod_name).netns), os.O_RDONLY)
    try:
        return len(libbpf.prog_query(fd, SK_LOOKUP.attach_type))
    finally:
        os.close(fd)


ECHO_ONCE = """
import socket, sys
s = socket.create_connection((sys.argv[1] if len(sys.argv) > 1 else '{ip}', {port}), timeout=5)
peer = s.getpeername()  # before the close: once both sides' FINs are through, there is no peer
s.sendall(b'ping'); s.shutdown(socket.SHUT_WR)
print(peer, s.recv(100))
"""


def test_loader_reports_compile_time_and_attaches_each_hook_once(loaded, node_cgroup):
    assert loaded["compile_and_load_ms"] > 0
    assert sorted(loaded["created"]) == sorted([p.name for p in CGROUP_PROGRAMS])
    assert attached(node_cgroup) == {p.name: 1 for p in CGROUP_PROGRAMS}


def test_redirect_happens_only_for_enrolled_pods(lab, proxy):
    serve(lab, proxy, "client-n0-0", slot=0)
    serve(lab, proxy, "banner-n0-0", slot=1, enrol=False)  # listeners exist, but not enrolled
    echo = lab.plan.pod("echo-n1-0")
    code = ECHO_ONCE.format(ip=echo.ip, port=9000)
    enrolled, unenrolled = run_in(lab, "client-n0-0", code), run_in(lab, "banner-n0-0", code)
    assert unenrolled.returncode == 0, unenrolled.stderr
    # Either way the app sees its own destination and its echo.
    assert enrolled.stdout == unenrolled.stdout == f"('{echo.ip}', 9000) b'ping'\n"
    assert proxy.originals == [(echo.ip, 9000)]
    assert proxy.datapath.counters(0)["redirected"] == 1
    assert proxy.datapath.counters(1)["redirected"] == 0


def test_loopback_own_ip_skip_ports_and_proxy_sockets_are_never_redirected(lab, proxy):
    serve(lab, proxy, "http-n0-0", slot=2)
    own = lab.plan.pod("http-n0-0").ip
    proxy.datapath.skip_port("outbound", 9000)
    echo = lab.plan.pod("echo-n1-0").ip
    for address in (("127.0.0.1", 8080), (own, 8080), (echo, 9000)):
        done = run_in(lab, "http-n0-0", f"import socket; socket.create_connection({address!r}, timeout=5)")
        assert done.returncode == 0, done.stderr
    assert proxy.datapath.counters(2)["redirected"] == 0
    assert proxy.originals == []
    proxy.datapath.skip_port("outbound", 9000, skip=False)


PARALLEL = """
import selectors, socket
socks = []
for i in range(1000):
    s = socket.socket(); s.setblocking(False)
    s.connect_ex((f"10.96.{1 + i // 250}.{1 + i % 250}", 20000 + i))
    socks.append(s)
sel = selectors.DefaultSelector()
for i, s in enumerate(socks):
    sel.register(s, selectors.EVENT_WRITE, i)
pending = set(range(1000))
while pending:
    for key, _ in sel.select(timeout=10):
        i = key.data
        key.fileobj.setblocking(True); key.fileobj.sendall(f"{i}\\n".encode())
        sel.unregister(key.fileobj); pending.discard(i)
for s in socks:
    s.recv(1)
print("done")
"""


def test_a_thousand_parallel_connects_each_recover_their_own_destination(lab, loaded):
    datapath = Datapath(PinLayout(lab_ops.BPF_PIN_ROOT, NODE))
    pod = lab.plan.pod("client-n0-0")
    with netns.entered(netns.named_path(pod.netns)):
        listener = socket.create_server(("127.0.0.1", OUTBOUND_PORT), backlog=4096)
    cookie = netns.socket_cookie_of_netns(listener)
    datapath.reset_counters(3)
    datapath.enrol(PodEntry(cookie, pod.ip, 3, OUTBOUND_PORT))
    client = subprocess.Popen([sys.executable, "-c", PARALLEL], stdout=subprocess.PIPE, text=True,
                              preexec_fn=lambda: pods.enter(netns.named_path(pod.netns), lab.pod_cgroup(pod)))
    try:
        wrong, conns = [], []
        listener.settimeout(30)
        for _ in range(1000):
            conn, peer = listener.accept()
            original = datapath.original_destination(cookie, peer[1])
            index = int(conn.makefile().readline())
            if original != (f"10.96.{1 + index // 250}.{1 + index % 250}", 20000 + index):
                wrong.append((index, original))
            conns.append(conn)
        for conn in conns:
            conn.sendall(b"k")
            conn.close()
        assert client.wait(30) == 0
        assert wrong == []
        assert datapath.counters(3)["redirected"] == 1000
    finally:
        client.kill()
        listener.close()
        datapath.close()


STREAM = """
import socket, time
ok = 0
for i in range({n}):
    s = socket.create_connection(('{ip}', 9000), timeout=5)
    s.sendall(b'x%d' % i); s.shutdown(socket.SHUT_WR)
    ok += s.recv(100) == b'x%d' % i
    s.close(); time.sleep(0.005)
print(ok)
"""


def test_enrol_and_leave_while_traffic_runs(lab, proxy):
    cookie = serve(lab, proxy, "client-n0-0", slot=4)
    pod = lab.plan.pod("client-n0-0")
    echo = lab.plan.pod("echo-n1-0")
    client = subprocess.Popen([sys.executable, "-c", STREAM.format(n=300, ip=echo.ip)], stdout=subprocess.PIPE,
                              text=True, preexec_fn=lambda: pods.enter(netns.named_path(pod.netns), lab.pod_cgroup(pod)))
    for _ in range(6):
        time.sleep(0.1)
        proxy.datapath.forget(cookie, pod.ip)
        time.sleep(0.1)
        proxy.datapath.enrol(PodEntry(cookie, pod.ip, 4, OUTBOUND_PORT))
    out, _ = client.communicate(timeout=60)
    assert out.strip() == "300"  # no connection lost to a change of enrolment
    redirected = proxy.datapath.counters(4)["redirected"]
    assert 0 < redirected < 300 and redirected == len(proxy.originals)


def test_inbound_bypass_is_impossible_for_an_enrolled_pod(lab, proxy):
    serve(lab, proxy, "echo-n0-0", slot=5)
    echo = lab.plan.pod("echo-n0-0")
    code = "import socket; s = socket.create_connection(('{ip}', {port}), timeout=5); s.sendall(b'in'); " \
           "s.shutdown(socket.SHUT_WR); print(s.recv(10))"
    done = run_in(lab, "client-n1-0", code.format(ip=echo.ip, port=9000))
    assert done.stdout == "b'in'\n", done.stderr
    # Any port, even one nothing listens on, lands on the proxy.
    run_in(lab, "client-n1-0", code.format(ip=echo.ip, port=12345))
    assert proxy.accepted["inbound"] == 2
    assert proxy.datapath.counters(5)["inbound_steered"] == 2
    # An exempt port (a kubelet probe, say) reaches the app directly.
    proxy.datapath.skip_port("inbound", 9000)
    run_in(lab, "client-n1-0", code.format(ip=echo.ip, port=9000))
    assert proxy.accepted["inbound"] == 2
    proxy.datapath.skip_port("inbound", 9000, skip=False)


def test_the_mesh_port_is_not_steered(lab, proxy):
    serve(lab, proxy, "h2c-n0-0", slot=6)
    pod = lab.plan.pod("h2c-n0-0")
    with netns.entered(netns.named_path(pod.netns)):
        mesh = socket.create_server((pod.ip, 4143))
    with mesh:
        done = run_in(lab, "client-n1-0", f"import socket; socket.create_connection(('{pod.ip}', 4143), timeout=5)")
        assert done.returncode == 0, done.stderr
        mesh.settimeout(5)
        mesh.accept()[0].close()
    assert proxy.accepted["inbound"] == 0


CONNECT_ERRNO = """
import socket
try:
    socket.create_connection(('{ip}', {port}), timeout=5); print('connected')
except OSError as e:
    print(e.errno)
"""


def test_policy_denials_fail_at_once_with_eperm_and_are_counted(lab, proxy):
    serve(lab, proxy, "client-n0-0", slot=7)
    echo, http = lab.plan.pod("echo-n1-0"), lab.plan.pod("http-n1-0")
    proxy.datapath.deny(0, 0, 9000)  # any source, any destination, port 9000
    assert run_in(lab, "client-n0-0", CONNECT_ERRNO.format(ip=echo.ip, port=9000)).stdout.strip() == str(errno.EPERM)
    assert run_in(lab, "client-n0-0", CONNECT_ERRNO.format(ip=http.ip, port=8080)).stdout.strip() == "connected"
    proxy.datapath.undeny(0, 0, 9000)
    # By identity class: pod class 7 may not reach class 9 (http-n1-0) on any port.
    pod = lab.plan.pod("client-n0-0")
    proxy.datapath.enrol(PodEntry(netns.cookie(netns.named_path(pod.netns)), pod.ip, 7, OUTBOUND_PORT, identity=7))
    proxy.datapath.set_ip_identity(http.ip, 9)
    proxy.datapath.deny(7, 9, 0)
    assert run_in(lab, "client-n0-0", CONNECT_ERRNO.format(ip=http.ip, port=8080)).stdout.strip() == str(errno.EPERM)
    assert run_in(lab, "client-n0-0", CONNECT_ERRNO.format(ip=echo.ip, port=9000)).stdout.strip() == "connected"
    proxy.datapath.undeny(7, 9, 0)
    assert proxy.datapath.counters(7)["denied"] == 2


def test_a_killed_agent_fails_closed_and_a_restart_adopts_without_duplicates(lab, loaded, node_cgroup):
    client, echo = lab.plan.pod("client-n0-0"), lab.plan.pod("echo-n0-0")
    specs = [f"{client.netns}:{client.ip}:8", f"{echo.netns}:{echo.ip}:9"]

    def start_standin():
        process = subprocess.Popen([sys.executable, str(STANDIN), str(lab_ops.BPF_PIN_ROOT), NODE, *specs],
                                   stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(STANDIN.parent)})
        assert process.stdout.readline().strip() == "ready"
        return process

    target = lab.plan.pod("echo-n1-0")
    outbound = CONNECT_ERRNO.format(ip=target.ip, port=9000)
    inbound = CONNECT_ERRNO.format(ip=echo.ip, port=9000)
    first = start_standin()
    try:
        assert run_in(lab, "client-n0-0", outbound).stdout.strip() == "connected"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # No agent: enrolled pods are refused, in and out, never sent around the mesh.
    assert run_in(lab, "client-n0-0", outbound).stdout.strip() == str(errno.ECONNREFUSED)
    assert run_in(lab, "client-n1-0", inbound).stdout.strip() == str(errno.ECONNREFUSED)

    report = load_in_subprocess(NODE, node_cgroup, lab_ops.BPF_PIN_ROOT)
    assert sorted(report["adopted"]) == sorted([p.name for p in CGROUP_PROGRAMS])
    assert report["created"] == [] and report["compiled"] is False  # the same build: adopted as pinned
    assert report["sk_lookup_links_updated"] == 2
    second = start_standin()
    try:
        assert run_in(lab, "client-n0-0", outbound).stdout.strip() == "connected"
        assert run_in(lab, "client-n1-0", inbound).stdout.strip() == "connected"
    finally:
        second.kill()
        second.wait()
    assert attached(node_cgroup) == {p.name: 1 for p in CGROUP_PROGRAMS}
    assert sk_lookup_count(lab, "echo-n0-0") == 1


def test_programs_of_another_build_are_compiled_again_and_replace_the_pinned_ones(lab, loaded, node_cgroup):
    from nodeagent.datapath.loader import write_layout

    write_layout(PinLayout(lab_ops.BPF_PIN_ROOT, NODE), digest=1)  # as if source, flags or kernel differed
    report = load_in_subprocess(NODE, node_cgroup, lab_ops.BPF_PIN_ROOT)
    assert report["compiled"] is True and report["created"] == []
    assert load_in_subprocess(NODE, node_cgroup, lab_ops.BPF_PIN_ROOT)["compiled"] is False
    assert attached(node_cgroup) == {p.name: 1 for p in CGROUP_PROGRAMS}


def test_cleanup_detaches_everything_and_leaves_no_pin(lab, node_cgroup):
    load_in_subprocess(NODE, node_cgroup, lab_ops.BPF_PIN_ROOT)
    standin = StandinProxy(lab_ops.BPF_PIN_ROOT, NODE)
    serve(lab, standin, "echo-n0-0", slot=10)
    standin.close()
    done = subprocess.run([sys.executable, "-m", "nodeagent", "cleanup", "--pin-root", str(lab_ops.BPF_PIN_ROOT)],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "removed" in done.stdout
    assert attached(node_cgroup) == {p.name: 0 for p in CGROUP_PROGRAMS}
    assert sk_lookup_count(lab, "echo-n0-0") == 0
    assert not lab_ops.BPF_PIN_ROOT.exists()
    # Unmeshed again: the app is reached directly.
    assert run_in(lab, "client-n1-0", CONNECT_ERRNO.format(ip=lab.plan.pod("echo-n0-0").ip, port=9000)
                  ).stdout.strip() == "connected"


def test_loader_refuses_a_directory_that_is_not_a_cgroup(tmp_path):
    with pytest.raises(LoadError, match="not a cgroup v2 directory"):
        load_in_subprocess(NODE, tmp_path, lab_ops.BPF_PIN_ROOT)


def test_check_passes_here_and_names_a_missing_bpffs(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "nodeagent", "check"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout
    assert "[ok]   bcc compiles the data path" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "nodeagent", "check", "--no-compile", "--pin-root", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "[FAIL] bpffs" in bad.stdout and "hint: mount -t bpf" in bad.stdout


def test_counters_of_an_enrolled_pod_count_opens_and_failures(lab, proxy):
    serve(lab, proxy, "client-n0-0", slot=11)
    proxy.datapath.skip_port("outbound", 9999)  # not redirected: goes to the real (closed) port
    target = lab.plan.pod("echo-n1-0").ip
    run_in(lab, "client-n0-0", CONNECT_ERRNO.format(ip=target, port=9999))
    run_in(lab, "client-n0-0", CONNECT_ERRNO.format(ip=target, port=9000))
    counters = proxy.datapath.counters(11)
    assert counters["failed"] == 1
    assert counters["opened"] == 1 and counters["redirected"] == 1
    proxy.datapath.skip_port("outbound", 9999, skip=False)
    json.dumps(counters)


REGISTERED_CONNECT = """
import asyncio
from pathlib import Path
from nodeagent.datapath.control import Datapath
from nodeagent.datapath.pins import PinLayout
from nodeagent.proxy import upstream
from nodeagent.proxy.fastpath import socket_cookie
upstream.register_sockets_with(Datapath(PinLayout(Path({root!r}), {node!r})).register_proxy_socket)
async def main():
    sock = await upstream.open_socket('/proc/self/ns/net', ({ip!r}, 9000), 5)
    print(sock.getpeername(), socket_cookie(sock))
asyncio.run(main())
"""


def proxy_socks_keys() -> list[int]:
    fd = libbpf.obj_get(str(PinLayout(lab_ops.BPF_PIN_ROOT, NODE).map("proxy_socks")))
    try:
        return [int.from_bytes(k, "little") for k in libbpf.map_keys(fd, 8)]
    finally:
        os.close(fd)


def test_the_proxys_registered_sockets_inside_a_pods_cgroup_are_not_captured(lab, proxy):
    # In a cluster the agent's own pod is below kubepods too: the proxy's sockets in a pod's
    # namespace meet connect4 and sockops, which know them by the cookie registered before connect.
    serve(lab, proxy, "client-n0-0", slot=12)
    echo = lab.plan.pod("echo-n1-0")
    done = run_in(lab, "client-n0-0", REGISTERED_CONNECT.format(root=str(lab_ops.BPF_PIN_ROOT), node=NODE, ip=echo.ip))
    peer, cookie = done.stdout.rsplit(" ", 1)
    assert peer == f"('{echo.ip}', 9000)", done.stderr
    counters = proxy.datapath.counters(12)
    assert counters["redirected"] == 0 and counters["opened"] == 0 and proxy.originals == []
    assert int(cookie) not in proxy_socks_keys()  # dropped once established: the map holds connects in flight


def test_the_agent_refuses_to_start_with_a_named_reason(tmp_path):
    identity = tmp_path / "identity"
    subprocess.run([sys.executable, "-m", "nodeagent", "identity", "init", "--dir", str(identity)], check=True,
                   capture_output=True)
    (tmp_path / "cluster").mkdir()
    done = subprocess.run([sys.executable, "-m", "nodeagent", "run", "--node-name", "n", "--cluster-dir",
                           str(tmp_path / "cluster"), "--cgroup", str(tmp_path), "--identity-dir", str(identity),
                           "--pin-root", str(lab_ops.BPF_PIN_ROOT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "agent refused to start: the data path could not be loaded" in done.stderr
    assert "is not a cgroup v2 directory" in done.stderr and "Traceback" not in done.stderr
    missing = subprocess.run([sys.executable, "-m", "nodeagent", "run", "--node-name", "n", "--cluster-dir",
                              str(tmp_path / "cluster"), "--cgroup", str(tmp_path), "--identity-dir",
                              str(tmp_path / "cluster"), "--pin-root", str(lab_ops.BPF_PIN_ROOT)],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "cannot load the identity issuer" in missing.stderr
