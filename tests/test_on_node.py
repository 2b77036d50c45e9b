"""Same-node meshed traffic in one hop (hop.py ON_NODE, on_node.py), through the real proxy: two
pods in their own network namespaces and one real Proxy (benchmarks/podpair.py), real sockets;
HTTP/1 clients run in pod A, the sample servers in pod B. Needs root (namespaces), not the lab.
Bounded: a few requests per test; everything is removed after."""

import asyncio
import os
import sys
from dataclasses import replace

import pytest

from benchmarks.podpair import A_IP, B_IP, NAMESPACE, PodPair, pod_object
from nodeagent.cluster.model import ClusterView
from nodeagent.policy.authz import POLICY_ANNOTATION
from nodeagent.settings import DEFAULT

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
    """An HTTP/1 client in pod A with one keep-alive connection: `ask()` is one request."""

    def __init__(self, pair):
        self.pair = pair

    async def __aenter__(self):
        _, port = self.pair.aim("http")
        self.process = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.pair.names[0], sys.executable, "-c", CLIENT.format(port=port),
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
        assert sample(pair, "tcp_open_total", **traffic("inbound", "pod-b", A_URI, False)) == 1
        assert sample(pair, "tcp_open_total", **traffic("inbound", "pod-b", A_URI, True)) == 0
        assert sample(pair, "request_total", **traffic("outbound", "pod-a", "pod/bench/pod-b", True)) == 0
        b = pair.pods["pod-b"]
        assert pair.proxy.connections.live(b.key)  # held in B's inbound share while pooled
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
