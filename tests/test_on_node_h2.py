"""Same-node HTTP/2 in one hop (hop.py ON_NODE with the H2 hint, target.py `acquire_h2`,
h2upstream.OnNodeH2Upstream), through the real proxy: two pods in their own network namespaces
and one real Proxy (benchmarks/podpair.py), real sockets; an HTTP/2 client (tests/h2_client.py)
in pod A, the sample h2c server in pod B. Needs root (namespaces), not the lab. Bounded: a few
requests per test; everything is removed after."""

import asyncio
import json
import os
from dataclasses import replace

import pytest

from nodeagent.proxy.accesslog import ANNOTATION
from nodeagent.settings import DEFAULT
from test_on_node import A_URI, ONE_HOP, Client, sample, settled, traffic, view, with_pair
from test_telemetry_proxy import annotated, h2_requests, read_lines, run_pair

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

TESTS = os.path.dirname(os.path.abspath(__file__))

# Requests on one HTTP/2 connection; the client waits for a line on stdin between rounds.
CLIENT = f"""
import sys
sys.path.insert(0, {TESTS!r})
from h2_client import H2Client
client = H2Client("127.0.0.1", {{port}})
for line in sys.stdin:
    (response,) = client.wait(client.request("GET", "/", authority="pod-b.bench:8081"))
    reason = response.headers.get(b"nodeagent-proxy-error", b"None").decode()
    print(response.status, reason, bytes(response.body).decode().strip(), flush=True)
client.close()
"""


def H2Client(pair) -> Client:
    """An HTTP/2 client in pod A with one connection: `ask()` is one request."""
    return Client(pair, CLIENT, "h2c")


def test_one_hop_serves_http2_and_counts_both_directions_without_tls():
    async def scenario(pair):
        b = pair.pods["pod-b"].key
        async with H2Client(pair) as client:
            answers = [await client.ask() for _ in range(3)]
            assert [a[0] for a in answers] == ["200"] * 3 and answers[0][2] == "hello from pod-b"
            # One shared connection to B's app, from B's namespace: one of B's inbound connections.
            live = pair.proxy.connections.live(b)
            assert len(live) == 1 and live[0].peer.identity == A_URI and live[0].port == 8081
        # The inbound side counts at the stream's end, after the client has its response.
        assert await settled(lambda: sample(pair, "response_total", **traffic("inbound", "pod-b", A_URI, False),
                                            status_code="200", classification="success") == 3)
        assert sample(pair, "request_total", **traffic("outbound", "pod-a", "pod/bench/pod-b", False)) == 3
        assert sample(pair, "request_total", **traffic("inbound", "pod-b", A_URI, False)) == 3
        opened = sample(pair, "tcp_open_total", **traffic("inbound", "pod-b", A_URI, False))
        assert opened - sample(pair, "tcp_close_total", **traffic("inbound", "pod-b", A_URI, False)) == 1
        # No mesh hop: no mesh connection of B's, no request counted with TLS.
        assert sample(pair, "tcp_open_total", **traffic("inbound", "pod-b", A_URI, True)) == 0
        assert sample(pair, "request_total", **traffic("outbound", "pod-a", "pod/bench/pod-b", True)) == 0
    asyncio.run(with_pair(ONE_HOP, scenario))


def test_one_hop_http2_asks_the_destinations_policy_and_a_change_ends_the_shared_connection():
    async def scenario(pair):
        b = pair.pods["pod-b"].key
        pair.proxy.update_view(view("all-authenticated"))  # pod A's identity is admitted
        async with H2Client(pair) as client:
            assert (await client.ask())[0] == "200"
            assert len(pair.proxy.connections.live(b)) == 1
            pair.proxy.update_view(view("deny"))  # the shared connection is revoked at once
            assert await settled(lambda: not pair.proxy.connections.live(b), 2.0)
            assert pair.proxy.pools.http2.ready(pair.pods["pod-a"].cookie, ("10.255.0.2", 8081)) is None
            status, reason, _ = await client.ask()
            assert (status, reason) == ("403", "unauthorized")  # as B's side of a mesh hop answers
        assert sample(pair, "http_errors_total", direction="outbound", namespace="bench", pod="pod-a",
                      status_code="403", reason="unauthorized") == 1
        assert sample(pair, "inbound_authorization_total", namespace="bench", pod="pod-b", decision="deny",
                      tls="true") >= 1
        assert sample(pair, "tcp_open_total", **traffic("inbound", "pod-b", A_URI, False)) == \
            sample(pair, "tcp_close_total", **traffic("inbound", "pod-b", A_URI, False))
    asyncio.run(with_pair(ONE_HOP, scenario))


def test_a_drain_closes_the_idle_shared_one_hop_http2_connection():
    async def scenario(pair):
        b = pair.pods["pod-b"].key
        async with H2Client(pair) as client:
            assert (await client.ask())[0] == "200"
            assert await settled(lambda: len(pair.proxy.connections.live(b)) == 1)
            assert sample(pair, "tcp_open_total", **traffic("inbound", "pod-b", A_URI, False)) == 1  # the one hop's
            drain = asyncio.create_task(pair.proxy.drain())
            assert await settled(lambda: not pair.proxy.connections.live(b), 1.0)
        await drain
    asyncio.run(with_pair(ONE_HOP, scenario))


def test_an_idle_shared_one_hop_http2_connection_ends_after_the_pool_idle_bound(monkeypatch):
    from nodeagent.proxy.h2upstream import H2Upstream

    monkeypatch.setattr(H2Upstream, "idle_s", 0.3)

    async def scenario(pair):
        b = pair.pods["pod-b"].key
        async with H2Client(pair) as client:
            assert (await client.ask())[0] == "200"
            assert sample(pair, "tcp_open_total", **traffic("inbound", "pod-b", A_URI, False)) == 1  # the one hop's
            assert await settled(lambda: not pair.proxy.connections.live(b), 2.0)  # the client still connected
            assert (await client.ask())[0] == "200"  # a new one
            assert sample(pair, "tcp_open_total", **traffic("inbound", "pod-b", A_URI, False)) == 2
    asyncio.run(with_pair(ONE_HOP, scenario))


def test_the_one_hop_writes_the_destinations_http2_access_log_lines_and_spans_as_the_mesh_hops_far_end(tmp_path):
    from otel_collector import Collector

    paths = ["/", "/status/503", "/status/404"]
    records, spans = {}, {}
    for on_node in (False, True):
        log = tmp_path / f"{on_node}.log"
        with Collector() as collector:
            settings = replace(DEFAULT, access_log=str(log), on_node_plaintext=on_node,
                               trace_collector=collector.url, trace_sampling=1.0)
            (output,) = asyncio.run(run_pair(settings, annotated(pod_b={ANNOTATION: "json"}),
                                             [("h2c", lambda port: h2_requests(port, paths))], lines=3, spans=6))
            spans[on_node] = collector.wait_for_spans(6)
        assert output.split() == ["200", "503", "404"]
        records[on_node] = [json.loads(text) for text in read_lines(log)]
    for on_node, found in spans.items():  # B's server span of each request, the child of A's client span
        clients = {s["ID"]: s for s in found if s["Kind"] == "Client"}
        servers = [s for s in found if s["Kind"] == "Server"]
        assert len(clients) == len(servers) == 3
        assert all(clients[s["Parent ID"]]["Trace ID"] == s["Trace ID"] for s in servers)
        assert {s["attributes"]["nodeagent.tls"] for s in found} == {not on_node}
        assert {s["attributes"]["nodeagent.source.identity"] for s in servers} == {A_URI}
    varying = {"timestamp", "total_ns", "tls", "trace_id"}
    for mesh, one_hop in zip(records[False], records[True], strict=True):
        assert (mesh["tls"], one_hop["tls"]) == (True, False)
        assert {k: v for k, v in one_hop.items() if k not in varying} == {k: v for k, v in mesh.items() if k not in varying}
    assert [(r["direction"], r["version"], r["uri"], r["client.id"]) for r in records[True]] == \
        [("inbound", "HTTP/2", path, A_URI) for path in paths]
