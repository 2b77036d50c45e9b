"""The destination's access log line and trace span of a same-node request: the one hop (hop.py
ON_NODE) writes what the far end of a mesh hop writes (app_target.AppTarget), the same request
run both ways through the real proxy (benchmarks/podpair.py: two pods in their own network
namespaces, real sockets, a real OpenTelemetry Collector). Needs root (namespaces), not the lab.
Bounded: three requests per way; everything is removed after."""

import asyncio
import json
import os
import time
from dataclasses import replace

import pytest

from nodeagent.proxy.accesslog import ANNOTATION
from nodeagent.settings import DEFAULT
from test_telemetry_proxy import CLIENT_TRACE, ECHO_TRACE_PORT, annotated, read_lines, run_pair, traced_requests

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

VARYING = {"timestamp", "total_ns", "tls", "trace_id"}  # a line's fields that differ by run or by hop


def destination_records(tmp_path, on_node: bool):
    """Three requests from pod A to pod B's app (which echoes the traceparent it got): a sampled
    client trace, an unsampled one, none (a new trace, unsampled at rate 0). Pod B asks for an
    access log, pod A for none. (B's lines, the echoed traceparents, every span.)"""
    from otel_collector import Collector

    log = tmp_path / f"on-node-{on_node}.log"
    with Collector() as collector:
        settings = replace(DEFAULT, access_log=str(log), trace_collector=collector.url, trace_sampling=0.0,
                           on_node_plaintext=on_node)
        (output,) = asyncio.run(run_pair(settings, annotated(pod_b={ANNOTATION: "json"}), [
            (ECHO_TRACE_PORT, lambda port: traced_requests(port, ["01", "00", ""]))], lines=3, spans=2,
            echo_trace=True))
        collector.wait_for_spans(2)
        time.sleep(0.5)
        spans = collector.spans()
    return [json.loads(text) for text in read_lines(log)], output.split(), spans


def test_the_one_hop_writes_the_destinations_access_log_line_and_span_as_the_mesh_hops_far_end(tmp_path):
    mesh = destination_records(tmp_path, on_node=False)
    one_hop = destination_records(tmp_path, on_node=True)
    for (lines, echoed, spans), tls in ((mesh, True), (one_hop, False)):
        # B's lines only (A asked for none), one per request, inbound, under A's identity.
        assert [(line["direction"], line["pod"], line["tls"]) for line in lines] == [("inbound", "pod-b", tls)] * 3
        assert [line["trace_id"] == CLIENT_TRACE for line in lines] == [True, True, False]
        assert len(lines[2]["trace_id"]) == 32
        # The app got each request as the child of B's span (A's span its parent), the decision carried on.
        outbound = next(s for s in spans if s["Kind"] == "Client")
        inbound = next(s for s in spans if s["Kind"] == "Server")
        assert len(spans) == 2 and inbound["Parent ID"] == outbound["ID"] and inbound["Trace ID"] == CLIENT_TRACE
        assert echoed[0] == f"00-{CLIENT_TRACE}-{inbound['ID']}-01"
        assert echoed[1].startswith(f"00-{CLIENT_TRACE}-") and echoed[1].endswith("-00")
        assert echoed[2].endswith("-00") and CLIENT_TRACE not in echoed[2]
        assert inbound["attributes"]["nodeagent.tls"] is tls and outbound["attributes"]["nodeagent.tls"] is tls
    # Everything else the same, field by field (the one hop's tls is false: no TLS is used).
    for mesh_line, one_hop_line in zip(mesh[0], one_hop[0]):
        assert {k: v for k, v in one_hop_line.items() if k not in VARYING} == \
            {k: v for k, v in mesh_line.items() if k not in VARYING}
    assert one_hop[0][0]["client.id"] == "spiffe://cluster.local/ns/bench/sa/pod-a"
    assert one_hop[0][0]["client.addr"] == "10.255.0.1"

    def server_span(spans):
        span = next(s for s in spans if s["Kind"] == "Server")
        return span["Name"], {k: v for k, v in span["attributes"].items() if k != "nodeagent.tls"}
    assert server_span(one_hop[2]) == server_span(mesh[2])
    assert server_span(one_hop[2])[1]["nodeagent.source.identity"] == "spiffe://cluster.local/ns/bench/sa/pod-a"
