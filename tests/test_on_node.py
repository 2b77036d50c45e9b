"""Same-node meshed traffic in one hop (hop.py ON_NODE, on_node.py), through the real proxy: two
pods in their own network namespaces and one real Proxy (benchmarks/podpair.py), real sockets;
HTTP/1 clients run in pod A, the sample servers in pod B. Needs root (namespaces), not the lab.
Bounded: a few requests per test; everything is removed after."""

import asyncio
import os
import socket
import sys
import time
from dataclasses import replace

import pytest

from benchmarks.podpair import A_IP, B_IP, NAMESPACE, PodPair, pod_object
from nodeagent import netns
from nodeagent.cluster.model import ClusterView
from nodeagent.policy.authz import POLICY_ANNOTATION
from nodeagent.settings import DEFAULT
from test_http1 import UPGRADE_ECHO_REPLY, UpgradeEcho

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

A_URI = f"spiffe://cluster.local/ns/{NAMESPACE}/sa/pod-a"
ONE_HOP = replace(DEFAULT, on_node_plaintext=True)

# Requests on one keep-alive connection; the client waits for a line on stdin between rounds.
CLIENT = """
import http.client, sys
conn = http.client.HTTPConnection("127.0.0.1", {port}, timeout=10)
for line in sys.stdin:
    conn.request("GET", "/", headers={{"Host": "pod-b.bench:8080"}})
    response = conn.getresponse()
    print(response.status, response.getheader("nodeagent-proxy-error"), response.read().decode().strip(), flush=True)
"""


def view(policy_b: str | None = None) -> ClusterView:
    b = pod_object("pod-b", B_IP)
    if policy_b:
        b["metadata"]["annotations"] = {POLICY_ANNOTATION: policy_b}
    return ClusterView([pod_object("pod-a", A_IP), b])


def sample(pair, name: str, **labels) -> float:
    return pair.proxy.metrics.registry.get_sample_value(name, labels) or 0.0


def traffic(direction: str, pod: str, peer: str, tls: bool) -> dict:
    return {"direction": direction, "namespace": NAMESPACE, "pod": pod, "peer": peer, "tls": str(tls).lower()}


class Client:
    """An HTTP/1 client in pod A with one keep-alive connection: `ask()` is one request (`code`
    and `kind`: another client, of another app kind in pod B)."""

    def __init__(self, pair, code: str = CLIENT, kind: str = "http"):
        self.pair, self.code, self.kind = pair, code, kind

    async def __aenter__(self):
        _, port = self.pair.aim(self.kind)
        self.process = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.pair.names[0], sys.executable, "-c", self.code.format(port=port),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        return self

    async def ask(self) -> list[str]:
        self.process.stdin.write(b"go\n")
        await self.process.stdin.drain()
        line = await asyncio.wait_for(self.process.stdout.readline(), 15)
        return line.decode().rstrip("\n").split(" ", 2)

    async def __aexit__(self, *exc):
        self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except asyncio.TimeoutError:
            self.process.kill()
            await self.process.wait()


async def with_pair(settings, scenario):
    pair = await PodPair(settings).start()
    try:
        pair.proxy.update_view(view())
        return await scenario(pair)
    finally:
        await pair.stop()


def test_one_hop_serves_http1_and_counts_both_directions_without_tls():
    async def scenario(pair):
        async with Client(pair) as client:
            answers = [await client.ask() for _ in range(3)]
        assert [a[0] for a in answers] == ["200"] * 3 and answers[0][2] == "hello from pod-b"
        # Outbound as pod A sees it, inbound as pod B would on a mesh hop: the source's identity.
        assert sample(pair, "request_total", **traffic("outbound", "pod-a", "pod/bench/pod-b", False)) == 3
        assert sample(pair, "request_total", **traffic("inbound", "pod-b", A_URI, False)) == 3
        assert sample(pair, "response_total", **traffic("inbound", "pod-b", A_URI, False), status_code="200",
                      classification="success") == 3
        # One pooled connection to B's app, one inbound connection of B's, under A's identity;
        # no mesh connection, no handshake.
        # (An eager connect, when the client was slow to speak, opens and closes one more.)
        opened = sample(pair, "tcp_open_total", **traffic("inbound", "pod-b", A_URI, False))
        assert opened - sample(pair, "tcp_close_total", **traffic("inbound", "pod-b", A_URI, False)) == 1
        assert sample(pair, "tcp_open_total", **traffic("inbound", "pod-b", A_URI, True)) == 0
        assert sample(pair, "request_total", **traffic("outbound", "pod-a", "pod/bench/pod-b", True)) == 0
        b = pair.pods["pod-b"]
        assert len(pair.proxy.connections.live(b.key)) == 1  # held in B's inbound share while pooled
    asyncio.run(with_pair(ONE_HOP, scenario))


def test_one_hop_asks_the_destinations_policy_with_the_sources_identity_and_a_change_ends_pooled_connections():
    async def scenario(pair):
        pair.proxy.update_view(view("all-authenticated"))  # pod A's identity is admitted
        async with Client(pair) as client:
            assert (await client.ask())[0] == "200"
            inbound = list(pair.proxy.connections.live(pair.pods["pod-b"].key))
            assert len(inbound) == 1 and inbound[0].peer.identity == A_URI and inbound[0].port == 8080
            pair.proxy.update_view(view("deny"))  # the pooled connection is revoked at once
            await asyncio.sleep(0.1)
            assert not pair.proxy.connections.live(pair.pods["pod-b"].key)
            status, reason, body = await client.ask()
            assert (status, reason) == ("403", "unauthorized")  # as B's side of a mesh hop answers
        assert sample(pair, "http_errors_total", direction="outbound", namespace=NAMESPACE, pod="pod-a",
                      status_code="403", reason="unauthorized") == 1
        assert sample(pair, "inbound_authorization_total", namespace=NAMESPACE, pod="pod-b", decision="deny",
                      tls="true") >= 1
    asyncio.run(with_pair(ONE_HOP, scenario))


def test_without_on_node_plaintext_same_node_http1_takes_the_mesh_hop():
    async def scenario(pair):
        async with Client(pair) as client:
            assert (await client.ask())[0] == "200"
        assert sample(pair, "request_total", **traffic("outbound", "pod-a", "pod/bench/pod-b", True)) == 1
        assert sample(pair, "tcp_open_total", **traffic("inbound", "pod-b", A_URI, True)) == 1
    asyncio.run(with_pair(replace(DEFAULT, on_node_plaintext=False), scenario))


UPGRADE_PORT = 9100
def socket_in(pair, pod: str) -> socket.socket:
    """A TCP socket made in `pod`'s network namespace (it stays there whatever thread uses it)."""
    with netns.entered(netns.named_path(pair.names[0 if pod == "pod-a" else 1])):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    return sock


async def settled(check, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def test_an_upgraded_one_hop_connection_gives_the_destinations_inbound_share_back_when_it_ends():
    """The splice after a 101 replaces the pooled connection's protocol: the destination's inbound
    Connection must still close with the relay (else each upgrade leaks one of B's share)."""
    async def scenario(pair):
        loop = asyncio.get_running_loop()
        listener = socket_in(pair, "pod-b")
        listener.bind((B_IP, UPGRADE_PORT))
        listener.listen(8)
        app = await loop.create_server(UpgradeEcho, sock=listener)
        try:
            _, port = pair.aim(UPGRADE_PORT)
            for _ in range(2):
                client = socket_in(pair, "pod-a")
                await loop.sock_connect(client, ("127.0.0.1", port))
                reader, writer = await asyncio.open_connection(sock=client)
                writer.write(b"GET /chat HTTP/1.1\r\nhost: pod-b\r\nupgrade: echo\r\nconnection: upgrade\r\n\r\n")
                assert await asyncio.wait_for(reader.readexactly(len(UPGRADE_ECHO_REPLY)), 10) == UPGRADE_ECHO_REPLY
                writer.write(b"ping")
                assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
                assert len(pair.proxy.connections.live(pair.pods["pod-b"].key)) == 1  # B's inbound, held
                writer.close()
                await writer.wait_closed()
                assert await settled(lambda: pair.proxy.open_connections == 0), pair.proxy.connections.all()
            # Every inbound connection of B's opened is closed (an early connect may add one of each).
            opened = sample(pair, "tcp_open_total", **traffic("inbound", "pod-b", A_URI, False))
            assert opened >= 2 and sample(pair, "tcp_close_total", **traffic("inbound", "pod-b", A_URI, False)) == opened
        finally:
            app.close()
    asyncio.run(with_pair(ONE_HOP, scenario))


def test_a_drain_closes_pooled_one_hop_connections_idle_now_and_busy_after_their_response():
    """A pooled one-hop connection is one of the destination's inbound connections, with no drain
    of its own: a drain closes the idle ones at once and the busy ones after their response (else
    the drain waits its whole deadline for them)."""
    async def scenario(pair):
        b = pair.pods["pod-b"].key
        async with Client(pair) as client:
            assert (await client.ask())[0] == "200"
            assert len(pair.proxy.connections.live(b)) == 1  # pooled, idle
            drain = asyncio.create_task(pair.proxy.drain())
            assert await settled(lambda: not pair.proxy.connections.live(b), 1.0)
            assert (await client.ask())[0] == "200"  # a new one-hop connection, not kept after it
            assert await settled(lambda: not pair.proxy.connections.live(b), 1.0)
            assert pair.proxy.pools.http1.size() == 0
        await drain
    asyncio.run(with_pair(ONE_HOP, scenario))


def test_an_idle_pooled_one_hop_connection_ends_after_the_pool_idle_bound_without_traffic(monkeypatch):
    from nodeagent.proxy import upstream

    monkeypatch.setattr(upstream, "POOL_IDLE_S", 0.3)
    monkeypatch.setattr(upstream, "SWEEP_S", 0.1, raising=False)  # (raising=False: fails, not errs, before the sweeper)

    async def scenario(pair):
        b = pair.pods["pod-b"].key
        async with Client(pair) as client:
            assert (await client.ask())[0] == "200"
        assert len(pair.proxy.connections.live(b)) == 1  # pooled, idle, with no traffic after it
        assert await settled(lambda: not pair.proxy.connections.live(b), 2.0)
        assert pair.proxy.pools.http1.size() == 0
    asyncio.run(with_pair(ONE_HOP, scenario))
