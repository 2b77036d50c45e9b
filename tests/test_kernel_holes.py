"""Ways around the mesh that the data path closes (issue 13, "Bypasses"), each tried in the lab
the way a pod would: real programs, real namespaces, a stand-in proxy."""

import contextlib
import ctypes
import errno
import inspect
import ipaddress
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nodeagent import netns
from nodeagent.cluster import podfs
from nodeagent.datapath import abi, cleanup, libbpf
from nodeagent.datapath.control import Datapath, PodEntry
from nodeagent.datapath.loader import load_in_subprocess
from nodeagent.datapath.pins import PinLayout
from nodeagent.lab import lab as lab_ops
from nodeagent.lab import pods
from standin_proxy import INBOUND_PORT, OUTBOUND_PORT
from test_datapath import NODE, lab, loaded, node_cgroup, proxy, run_in, serve  # noqa: F401 (fixtures)

pytestmark = pytest.mark.privileged
PROXY_MARK = 0x4E41  # the SO_MARK the proxy's sockets used to carry, and the data path trusted

MARKED_CONNECT = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, {mark})
s.settimeout(5)
try:
    s.connect(({ip!r}, {port}))
    print('connected')
except OSError as e:
    print(e.errno)
"""


def test_a_pod_process_setting_the_proxys_mark_is_still_captured(lab, proxy):
    serve(lab, proxy, "client-n0-0", slot=20)
    echo, service = lab.plan.pod("echo-n1-0"), next(s for s in lab.plan.services if s.name == "echo")
    # To another meshed pod: through the proxy, not straight to it.
    done = run_in(lab, "client-n0-0", MARKED_CONNECT.format(mark=PROXY_MARK, ip=echo.ip, port=9000))
    assert done.stdout.strip() == "connected", done.stderr
    # To a Service VIP (routed nowhere without the mesh): the proxy's listener answers.
    done = run_in(lab, "client-n0-0", MARKED_CONNECT.format(mark=PROXY_MARK, ip=service.cluster_ip, port=9000))
    assert done.stdout.strip() == "connected", f"not captured: errno {done.stdout.strip()} " \
                                               f"({errno.errorcode.get(int(done.stdout or 0), '')})"
    assert proxy.originals == [(echo.ip, 9000), (service.cluster_ip, 9000)]
    assert proxy.datapath.counters(20)["redirected"] == 2


def attempt(ip: str, port: int) -> str:
    """Connect, send, read the echo: "reply b'hi'", or the errno. Run in a pod (its source is)."""
    import socket

    s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
    s.settimeout(5)
    try:
        # A link-local address is reached through eth0.
        s.connect((ip, port, 0, socket.if_nametoindex("eth0")) if ip.startswith("fe80:") else (ip, port))
        s.sendall(b"hi")
        s.shutdown(socket.SHUT_WR)
        return f"reply {s.recv(10)}"
    except OSError as e:
        return str(e.errno)
    finally:
        s.close()


def connect_from(lab, pod: str, ip: str, port: int) -> str:
    """From a process of the pod (its cgroup and namespace)."""
    done = run_in(lab, pod, inspect.getsource(attempt) + f"print(attempt({ip!r}, {port}))")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def connect_inside(lab, pod: str, ip: str, port: int) -> str:
    """From the pod's namespace, but not its cgroup (as the proxy does)."""
    with netns.entered(netns.named_path(lab.plan.pod(pod).netns)):
        return attempt(ip, port)


@contextlib.contextmanager
def addresses(lab, *assignments: tuple[str, str]):
    """Give pods extra addresses on eth0 for a test (`(pod, "fd00::1/64")`), removed on exit."""
    done = []
    try:
        for pod, address in assignments:
            netns_name = lab.plan.pod(pod).netns
            subprocess.run(["ip", "-n", netns_name, "addr", "add", address, "dev", "eth0"]
                           + (["nodad"] if ":" in address else []), check=True)
            done.append((netns_name, address))
        yield
    finally:
        for netns_name, address in done:
            subprocess.run(["ip", "-n", netns_name, "addr", "del", address, "dev", "eth0"], check=False)


@contextlib.contextmanager
def echo_server(lab, pod: str, host: str, port: int):
    """An echo listener inside a pod's namespace (a thread of the test), closed on exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with netns.entered(netns.named_path(lab.plan.pod(pod).netns)):
        listener = socket.socket(family)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    listener.bind((host, port))
    listener.listen()

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    conn.sendall(conn.recv(10))
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)


ULA = "fd6e:616c:6162::"  # "nalab": a unique local prefix, only ever on the lab's bridge


def test_ipv6_to_an_enrolled_pod_is_refused_never_delivered_around_the_mesh(lab, proxy):
    server, client = "echo-n0-0", "client-n1-0"
    with addresses(lab, (server, f"{ULA}e/64"), (client, f"{ULA}c/64")), echo_server(lab, server, "::", 9600):
        assert connect_from(lab, client, f"{ULA}e", 9600) == "reply b'hi'"  # not meshed yet: reached
        serve(lab, proxy, server, slot=21)
        assert connect_from(lab, client, f"{ULA}e", 9600) == str(errno.ECONNREFUSED)
        # The link-local address every IPv6 interface has is refused just as well.
        link_local = next(a for a in podfs.addresses(netns.named_path(lab.plan.pod(server).netns))
                          if a.version == 6 and a.is_link_local)
        assert connect_from(lab, client, str(link_local), 9600) == str(errno.ECONNREFUSED)
        # Inside the pod's namespace IPv6 works over lo only (the pod's processes connect with
        # IPv6 only to ::1 anyway: na_connect6 refuses the rest with EPERM).
        with echo_server(lab, server, "::1", 9601):
            assert connect_inside(lab, server, "::1", 9601) == "reply b'hi'"
        assert connect_inside(lab, server, f"{ULA}e", 9600) == str(errno.ECONNREFUSED)
    refused = proxy.datapath.unmeshed_refusals()
    assert refused[ipaddress.ip_address(f"{ULA}e")] == 2 and refused[link_local] == 1
    assert proxy.accepted["inbound"] == 0


def test_another_ipv4_address_an_enrolled_pod_gives_itself_is_refused(lab, proxy):
    server, extra = "echo-n0-0", "10.244.0.250"
    serve(lab, proxy, server, slot=22)
    with addresses(lab, (server, f"{extra}/16")):
        assert connect_from(lab, "client-n1-0", extra, 9000) == str(errno.ECONNREFUSED)
        # Its pod IP is steered as ever.
        assert connect_from(lab, "client-n1-0", lab.plan.pod(server).ip, 9000) == "reply b'hi'"
    assert proxy.datapath.unmeshed_refusals()[ipaddress.ip_address(extra)] == 1
    assert proxy.accepted["inbound"] == 1


def test_the_proxys_own_ports_at_a_pod_ip_are_refused_by_the_kernel(lab, proxy):
    server = lab.plan.pod("echo-n0-0")
    serve(lab, proxy, server.name, slot=23)
    for port in (OUTBOUND_PORT, INBOUND_PORT):
        assert connect_from(lab, "client-n1-0", server.ip, port) == str(errno.ECONNREFUSED)
    assert proxy.accepted["inbound"] == 0  # never steered onto the proxy, so never a loop
    assert proxy.datapath.counters(23)["proxy_port_refused"] == 2


def test_the_pod_reaching_its_own_ip_is_not_steered(lab, proxy):
    # As the proxy reaches an app (inbound): from inside the pod, at the pod's IP, over lo.
    server = lab.plan.pod("echo-n0-0")
    serve(lab, proxy, server.name, slot=24)
    with echo_server(lab, server.name, "127.0.0.1", 7000):
        assert connect_from(lab, server.name, server.ip, 9000) == "reply b'hi'"
        assert connect_from(lab, server.name, server.ip, 7000) == str(errno.ECONNREFUSED)  # 127.0.0.1 only
    assert proxy.accepted["inbound"] == 0 and proxy.datapath.counters(24)["inbound_steered"] == 0


def martian_sources() -> int:
    """Packets the kernel dropped for a martian source address (all CPUs, all namespaces)."""
    lines = Path("/proc/net/stat/rt_cache").read_text().split("\n")
    column = lines[0].split().index("in_martian_src")
    return sum(int(line.split()[column], 16) for line in lines[1:] if line.strip())


def syn(source: str, destination: str, port: int) -> bytes:
    """An IPv4 TCP SYN (the kernel fills in the IP checksum and length of a raw IPPROTO_RAW send)."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0x4e41, 0, 64, socket.IPPROTO_TCP, 0,
                     socket.inet_aton(source), socket.inet_aton(destination))
    return ip + struct.pack("!HHIIBBHHH", 40000, port, 1, 0, 5 << 4, 0x02, 65535, 0, 0)


def test_a_packet_from_outside_claiming_the_pods_own_ip_never_reaches_sk_lookup(lab, proxy):
    # Why sk_lookup may leave connections over lo alone: lo only carries what the namespace's
    # own stack sends, and a packet from outside with the pod's IP as its source, which could
    # otherwise pass for the pod's own, is a martian the kernel drops before any socket lookup.
    server = lab.plan.pod("echo-n0-0")
    serve(lab, proxy, server.name, slot=25)
    before = martian_sources()
    with netns.entered(netns.named_path(lab.plan.pod("client-n1-0").netns)):
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    with raw:
        for _ in range(3):
            raw.sendto(syn(server.ip, server.ip, 9000), (server.ip, 0))
    deadline = time.monotonic() + 5
    while martian_sources() < before + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert martian_sources() >= before + 3
    counters = proxy.datapath.counters(25)
    assert counters["inbound_steered"] == counters["inbound_refused"] == 0 and proxy.accepted["inbound"] == 0


PROXY_ENDS = """
import asyncio, socket, sys
from pathlib import Path
from nodeagent.datapath.control import Datapath
from nodeagent.datapath.pins import PinLayout
from nodeagent.proxy import upstream
upstream.register_sockets_with(Datapath(PinLayout(Path({root!r}), {node!r})).register_proxy_socket)
listener = socket.create_server(('127.0.0.1', {outbound}))  # as the proxy's outbound listener
app = socket.create_server(('127.0.0.1', 7100))  # an app of the pod
client = socket.create_connection(('127.0.0.1', {outbound}))  # an app's connect, as connect4 makes it
accepted, _ = listener.accept()
async def main():
    return await upstream.open_socket('/proc/self/ns/net', ('127.0.0.1', 7100), 5)  # the proxy's leg to the app
to_app = asyncio.run(main())
served, _ = app.accept()
print(client.getsockname()[1], to_app.getsockname()[1], flush=True)
sys.stdin.read()  # keep them open while the test reads the data path
"""


def test_the_proxys_ends_are_known_without_a_mark_when_it_runs_below_the_pods_cgroup(lab, node_cgroup):
    # As in a cluster, where the agent's pod is below kubepods: sockops sees the proxy's sockets
    # and flags them (their sends keep TCP, whose counters count spliced bytes): accepted ones by
    # their local address, connected ones by the cookie registered before connect.
    load_in_subprocess(NODE, node_cgroup, lab_ops.BPF_PIN_ROOT, fast_paths=abi.FAST_SPLICE | abi.FAST_LOOPBACK)
    datapath = Datapath(PinLayout(lab_ops.BPF_PIN_ROOT, NODE))
    pod = lab.plan.pod("client-n0-0")
    cookie = netns.cookie(netns.named_path(pod.netns))
    datapath.enrol(PodEntry(cookie, pod.ip, 26, OUTBOUND_PORT))
    code = PROXY_ENDS.format(root=str(lab_ops.BPF_PIN_ROOT), node=NODE, outbound=OUTBOUND_PORT)
    process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               preexec_fn=lambda: pods.enter(netns.named_path(pod.netns), lab.pod_cgroup(pod)))
    try:
        client_port, proxy_port = map(int, process.stdout.readline().split())
        loopback = ipaddress.IPv4Address("127.0.0.1")

        def flags(local: int, remote: int) -> int:
            fd = libbpf.obj_get(str(PinLayout(lab_ops.BPF_PIN_ROOT, NODE).map("msg_state")))
            try:
                key = bytes(abi.SockKey(cookie, int.from_bytes(loopback.packed, "little"), local, remote))
                raw = libbpf.map_lookup(fd, key, ctypes.sizeof(abi.MsgState))
            finally:
                os.close(fd)
            assert raw is not None, f"no msg_state for {local}->{remote}"
            return abi.MsgState.from_buffer_copy(raw).flags

        assert flags(OUTBOUND_PORT, client_port) == abi.SOCK_PROXY  # accepted on the outbound listener
        assert flags(client_port, OUTBOUND_PORT) == 0  # the app's end
        assert flags(proxy_port, 7100) == abi.SOCK_PROXY  # registered before it connected
        assert flags(7100, proxy_port) == 0
        assert datapath.counters(26)["opened"] == 1  # the app's connect, not the proxy's
    finally:
        process.stdin.close()
        process.wait(10)
        datapath.close()
        cleanup.remove_node(PinLayout(lab_ops.BPF_PIN_ROOT, NODE))
