"""Clients of a pod cannot take its own mutual-TLS handshakes (issue 13), through the real proxy
(benchmarks/podpair.py: two pods in their own network namespaces, real sockets, real handshakes).

Anyone who can reach a pod's IP can open idle TCP connections to its mesh port 4143. Each held
one of the pod's `handshakes`, the same ones its own outbound mesh connections need, for up to
the 10 s handshake deadline: 16 idle connections and the pod's own connections were refused
("handshakes limit"). Now they hold the pod's `inbound-handshakes` and are dropped when no
whole ClientHello comes within `Timeouts.client_hello_s` (one that stalls halfway held its slot until
the 10 s handshake deadline). Needs root (namespaces), not the lab."""

import asyncio
import os
import socket
import subprocess
from dataclasses import replace

import pytest

from benchmarks.podpair import A_IP, NAMESPACE, SUBNET
from nodeagent import netns
from nodeagent.ports import MESH_PORT
from nodeagent.proxy import limits
from nodeagent.proxy.limits import Limit
from nodeagent.settings import DEFAULT
from test_client_hello import a_client_hello
from test_handshake_pacing import sample, settled, with_pair

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

INBOUND = 4  # pod A's inbound-handshakes in this test
IDLE = limits.DEFAULTS[Limit.HANDSHAKES]  # as many idle clients as the pod has handshakes as client
SETTINGS = replace(DEFAULT, on_node_plaintext=False, pod_limits=limits.parse(f"inbound-handshakes={INBOUND}"))


async def connected(netns_name: str, address: tuple[str, int], source: str | None = None) -> socket.socket:
    with netns.entered(f"/var/run/netns/{netns_name}"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if source is not None:
        sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, address), 5)
    return sock


async def dropped(sock: socket.socket, within_s: float) -> bool:
    """True if the proxy closes (or resets) `sock` before `within_s`, having sent nothing."""
    try:
        return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 1), within_s) == b""
    except ConnectionResetError:
        return True
    except asyncio.TimeoutError:
        return False


async def echo_from_a(pair) -> bytes:
    """One connection of pod A's own through the mesh to pod B's echo server."""
    host, port = pair.aim("echo")
    sock = await connected(pair.names[0], (host, port))
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(sock, b"ping")
        return await asyncio.wait_for(loop.sock_recv(sock, 4), 5)
    except ConnectionResetError:
        return b""
    finally:
        sock.close()


def client_addresses(pair, count: int) -> list[str]:
    """`count` more addresses of pod B's (as many client pods; one address holds a quarter of a
    pod's inbound handshakes at most, source_share.py). Gone with the pair's namespaces."""
    addresses = [f"10.255.0.{100 + i}" for i in range(count)]
    for address in addresses:
        subprocess.run(["ip", "-n", pair.names[1], "addr", "add", f"{address}/{SUBNET}", "dev", f"{pair.tag}b"],
                       check=True, capture_output=True)
    return addresses


def test_idle_clients_on_the_mesh_port_take_neither_the_pods_own_handshakes_nor_long():
    async def scenario(pair):
        quota = pair.pods["pod-a"].quota
        idle = [await connected(pair.names[1], (A_IP, MESH_PORT), source)  # from pod B's namespace
                for source in client_addresses(pair, IDLE)]
        try:
            for _ in range(50):  # the proxy accepts them
                if quota.held[Limit.INBOUND_HANDSHAKES] == INBOUND:
                    break
                await asyncio.sleep(0.02)
            assert quota.held[Limit.INBOUND_HANDSHAKES] == INBOUND and quota.held[Limit.HANDSHAKES] == 0
            refused = sample(pair, "limit_exceeded_total", direction="inbound", namespace=NAMESPACE, pod="pod-a",
                             limit="inbound-handshakes")
            assert refused == IDLE - INBOUND
            # Meanwhile the pod's own mesh connections are served.
            assert await echo_from_a(pair) == b"ping"
            # The silent ones are dropped (the deadline is 2 s; 30 s: the bound, not the timing).
            assert all(await asyncio.gather(*(dropped(sock, 30) for sock in idle)))
            assert sample(pair, "tls_handshake_failures_total", direction="inbound", reason="no ClientHello") == INBOUND
            assert quota.held[Limit.INBOUND_HANDSHAKES] == 0
        finally:
            for sock in idle:
                sock.close()
        await settled(pair, "pod-a")
    asyncio.run(with_pair(SETTINGS, scenario))


def test_a_client_stalled_halfway_through_its_client_hello_is_dropped_at_the_hello_deadline():
    """The ClientHello deadline covers the whole ClientHello: a few bytes of one do not keep the
    slot until the handshake's deadline (before, it was dropped there, counted as a TimeoutError)."""
    async def scenario(pair):
        quota = pair.pods["pod-a"].quota
        stalled = await connected(pair.names[1], (A_IP, MESH_PORT))
        try:
            await asyncio.get_running_loop().sock_sendall(stalled, a_client_hello()[:40])
            for _ in range(50):
                if quota.held[Limit.INBOUND_HANDSHAKES] == 1:
                    break
                await asyncio.sleep(0.02)
            assert quota.held[Limit.INBOUND_HANDSHAKES] == 1
            assert await dropped(stalled, 30)  # the deadline is 2 s; 30 s: the bound, not the timing
            assert sample(pair, "tls_handshake_failures_total", direction="inbound", reason="no ClientHello") == 1
            assert sample(pair, "tls_handshake_failures_total", direction="inbound", reason="TimeoutError") == 0
            assert quota.held[Limit.INBOUND_HANDSHAKES] == 0
            # A whole ClientHello is still answered (pod A's own connection, at pod B's mesh port).
            assert await echo_from_a(pair) == b"ping"
        finally:
            stalled.close()
        await settled(pair, "pod-a")
    asyncio.run(with_pair(SETTINGS, scenario))
