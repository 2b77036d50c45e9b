"""Access logs (and, below, tracing) through the real proxy: two pods in their own network
namespaces and one real Proxy (benchmarks/podpair.py), real sockets, mutual TLS between the
pods' hops; clients run in pod A. Bounded: a few dozen requests; everything is removed after."""

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from benchmarks.podpair import A_IP, B_IP, PodPair, pod_object
from nodeagent.cluster.model import ClusterView
from nodeagent.proxy.accesslog import ANNOTATION
from nodeagent.settings import DEFAULT

# Root for the two namespaces, but not `privileged`: no lab, no BPF, nothing machine-wide (the pair's
# namespaces and addresses are its own), so no turn at the lab lock is needed (HELPERS: podpair).
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network namespaces")

TESTS = os.path.dirname(os.path.abspath(__file__))
MESH = replace(DEFAULT, on_node_plaintext=False)  # the mesh hop's two ends (the one hop's: test_on_node_telemetry.py)


def annotated(pod_a: dict | None = None, pod_b: dict | None = None) -> ClusterView:
    objects = []
    for name, ip, annotations in (("pod-a", A_IP, pod_a), ("pod-b", B_IP, pod_b)):
        obj = pod_object(name, ip)
        obj["metadata"]["annotations"] = annotations or {}
        objects.append(obj)
    return ClusterView(objects)


def http1_requests(port: int, paths: list[str], user_agent: str = "telemetry-test") -> list[str]:
    code = f"""
import http.client
conn = http.client.HTTPConnection("127.0.0.1", {port}, timeout=10)
for path in {paths!r}:
    conn.request("GET", path, headers={{"Host": "pod-b.bench:8080", "User-Agent": {user_agent!r}}})
    response = conn.getresponse()
    response.read()
    print(response.status)
"""
    return [sys.executable, "-c", code]


def h2_requests(port: int, paths: list[str]) -> list[str]:
    code = f"""
import subprocess
import sys
import time
sys.path.insert(0, {TESTS!r})
from h2_client import H2Client
client = H2Client("127.0.0.1", {port})
for path in {paths!r}:
    (response,) = client.wait(client.request("GET", path, authority="pod-b.bench:8081"))
    print(response.status)
client.close()
"""
    return [sys.executable, "-c", code]


ECHO_TRACE_PORT = 8090
# An app in pod B that answers each request with the traceparent it received.
ECHO_TRACE = f"""
import http.server
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = (self.headers.get("traceparent") or "").encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("{B_IP}", {ECHO_TRACE_PORT}), Handler).serve_forever()
"""


async def run_pair(settings, view: ClusterView, clients, lines: int = 0, spans: int = 0,
                   echo_trace: bool = False) -> list[str]:
    """Start the pair, give it `view`, run each (kind, argv-maker) client in pod A; the outputs.
    Before stopping, wait (at most 10 s) for `lines` access log lines and `spans` spans to be
    recorded: the client has its last response before the inbound hop has counted it (HTTP/2
    counts at the stream's end, in a task that runs after the bytes went on)."""
    pair = await PodPair(settings).start()
    outputs, echo = [], None
    try:
        if echo_trace:
            echo = subprocess.Popen(["ip", "netns", "exec", pair.names[1], sys.executable, "-c", ECHO_TRACE],
                                    stdin=subprocess.DEVNULL)
            for _ in range(100):
                if pair._listening(ECHO_TRACE_PORT):
                    break
                await asyncio.sleep(0.05)
        pair.proxy.update_view(view)
        for kind, argv in clients:
            _, port = pair.aim(kind)
            result = await pair.run_in_a_async(argv(port), timeout=60)
            assert result.returncode == 0, result.stderr
            outputs.append(result.stdout)
        telemetry = pair.proxy.telemetry
        exporter = telemetry.tracer.exporter if telemetry.tracer else None
        for _ in range(100):
            logged = telemetry.access_log.written + len(telemetry.access_log.entries)
            traced = exporter.exported + exporter.dropped + len(exporter.spans) if exporter else 0
            if logged >= lines and traced >= spans:
                break
            await asyncio.sleep(0.1)
    finally:
        if echo is not None:
            echo.kill()
            echo.wait()
        await pair.stop()  # writes the queued lines, exports the queued spans
    return outputs


def read_lines(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_access_log_json_both_directions_both_http_versions(tmp_path):
    """Pod A's annotation logs what it sends, pod B's what it receives (from A's proxy, over mTLS)."""
    log = tmp_path / "access.log"
    settings = replace(MESH, access_log=str(log))
    paths = ["/", "/status/503?secret=1", "/status/404"]
    outputs = asyncio.run(run_pair(settings, annotated(pod_a={ANNOTATION: "json"}, pod_b={ANNOTATION: "json"}), [
        ("http", lambda port: http1_requests(port, paths)),
        ("h2c", lambda port: h2_requests(port, paths)),
    ], lines=12))
    assert [o.split() for o in outputs] == [["200", "503", "404"]] * 2
    lines = [json.loads(text) for text in read_lines(log)]
    assert all("secret" not in text for text in read_lines(log))
    expected = [("HTTP/1.1", "/", 200), ("HTTP/1.1", "/status/503", 503), ("HTTP/1.1", "/status/404", 404),
                ("HTTP/2", "/", 200), ("HTTP/2", "/status/503", 503), ("HTTP/2", "/status/404", 404)]
    for direction in ("outbound", "inbound"):
        seen = [entry for entry in lines if entry["direction"] == direction]
        assert [(e["version"], e["uri"], e["status"]) for e in seen] == expected, direction
    outbound = next(entry for entry in lines if entry["direction"] == "outbound")
    assert outbound["pod"] == "pod-a" and outbound["namespace"] == "bench"
    assert outbound["destination"] == "pod/bench/pod-b" and outbound["tls"] is True
    assert outbound["client.addr"] == A_IP and outbound["client.id"] == "spiffe://cluster.local/ns/bench/sa/pod-a"
    assert outbound["host"] == "pod-b.bench:8080" and outbound["user_agent"] == "telemetry-test"
    assert outbound["total_ns"] > 0 and outbound["timestamp"].endswith("Z")
    inbound = next(entry for entry in lines if entry["direction"] == "inbound")
    assert inbound["pod"] == "pod-b" and inbound["destination"] == "pod/bench/pod-b" and inbound["tls"] is True
    assert inbound["client.addr"] == A_IP and inbound["client.id"] == "spiffe://cluster.local/ns/bench/sa/pod-a"
    assert inbound["host"] == "pod-b.bench:8080" and inbound["user_agent"] == "telemetry-test"


def test_access_log_apache_to_stderr_and_none_without_the_annotation(tmp_path, capfd):
    settings = replace(MESH, access_log="stderr")
    asyncio.run(run_pair(settings, annotated(pod_a={ANNOTATION: "apache"}), [
        ("http", lambda port: http1_requests(port, ["/", "/status/500"]))], lines=2))
    lines = [text for text in capfd.readouterr().err.splitlines() if '"GET http://pod-b.bench:8080' in text]
    assert len(lines) == 2
    assert lines[0].startswith(f"{A_IP} spiffe://cluster.local/ns/bench/sa/pod-a - [")
    assert lines[0].endswith('"GET http://pod-b.bench:8080/ HTTP/1.1" 200')
    assert lines[1].endswith('"GET http://pod-b.bench:8080/status/500 HTTP/1.1" 500')

    log = tmp_path / "none.log"
    asyncio.run(run_pair(replace(MESH, access_log=str(log)), annotated(pod_b={"unrelated": "x"}), [
        ("http", lambda port: http1_requests(port, ["/"]))]))
    assert read_lines(log) == []  # no annotation: no line, not even a file


CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def traced_requests(port: int, flags: list[str]) -> list[str]:
    """One request per entry: with a traceparent of those flags, or none (""); prints each body."""
    code = f"""
import http.client
conn = http.client.HTTPConnection("127.0.0.1", {port}, timeout=10)
for flags in {flags!r}:
    headers = {{"traceparent": "00-{CLIENT_TRACE}-{CLIENT_SPAN}-" + flags}} if flags else {{}}
    conn.request("GET", "/status/" + ("503" if flags == "01" else "200"), headers=headers)
    print(conn.getresponse().read().decode())
"""
    return [sys.executable, "-c", code]


def test_sampled_requests_are_spans_at_a_real_collector(tmp_path):
    """A client's sampled trace is continued (same trace, its span as parent), an unsampled one is
    carried on unsampled, and with a rate of 0 a new trace is started unsampled; the access log
    names each request's trace."""
    from otel_collector import Collector

    log = tmp_path / "access.log"
    with Collector() as collector:
        settings = replace(MESH, access_log=str(log), trace_collector=collector.url, trace_sampling=0.0)
        outputs = asyncio.run(run_pair(settings, annotated(pod_a={ANNOTATION: "json"}), [
            ("http", lambda port: traced_requests(port, ["01", "00", "", "01"])),
            (ECHO_TRACE_PORT, lambda port: traced_requests(port, ["01"]))], lines=5, spans=6, echo_trace=True))
        collector.wait_for_spans(6)
        time.sleep(0.5)
        spans = collector.spans()
    # The app behind B's hop got the request as the child of B's inbound span, in the client's trace.
    echoed = outputs[1].strip()
    to_echo = [s for s in spans if s["attributes"]["nodeagent.route"].endswith(f":{ECHO_TRACE_PORT}")]
    inbound_echo = next(s for s in to_echo if s["Kind"] == "Server")
    assert echoed == f"00-{CLIENT_TRACE}-{inbound_echo['ID']}-01"
    assert inbound_echo["Parent ID"] == next(s for s in to_echo if s["Kind"] == "Client")["ID"]
    spans = [s for s in spans if s not in to_echo]
    outbound = [s for s in spans if s["attributes"]["nodeagent.direction"] == "outbound"]
    inbound = [s for s in spans if s["attributes"]["nodeagent.direction"] == "inbound"]
    assert len(outbound) == 2
    for span in outbound:
        assert span["Trace ID"] == CLIENT_TRACE and span["Parent ID"] == CLIENT_SPAN and span["Kind"] == "Client"
        assert span["Status code"] == "Error" and span["Name"] == "GET pod/bench/pod-b:8080"
        assert span["attributes"] == {
            "nodeagent.direction": "outbound", "nodeagent.pod": "bench/pod-a",
            "nodeagent.source.workload": "bench/app/pod-a",
            "nodeagent.source.identity": "spiffe://cluster.local/ns/bench/sa/pod-a",
            "nodeagent.destination": "pod/bench/pod-b", "nodeagent.destination.workload": "bench/app/pod-b",
            "nodeagent.destination.identity": "spiffe://cluster.local/ns/bench/sa/pod-b",
            "nodeagent.route": "pod/bench/pod-b:8080", "nodeagent.tls": True, "http.request.method": "GET",
            "url.path": "/status/503", "server.address": "127.0.0.1:15001", "network.protocol.version": "1.1",
            "http.response.status_code": 503}
    assert len({span["ID"] for span in outbound}) == 2  # a span id of its own per request
    # B's hop is the child of A's: the request carried A's hop as its parent
    assert sorted(s["Parent ID"] for s in inbound) == sorted(s["ID"] for s in outbound)
    for span in inbound:
        assert span["Trace ID"] == CLIENT_TRACE and span["Kind"] == "Server" and span["Status code"] == "Error"
        assert span["Name"] == "GET pod/bench/pod-b:8080"
        assert span["attributes"] == {
            "nodeagent.direction": "inbound", "nodeagent.pod": "bench/pod-b",
            "nodeagent.source.workload": "bench/app/pod-a",
            "nodeagent.source.identity": "spiffe://cluster.local/ns/bench/sa/pod-a",
            "nodeagent.destination": "pod/bench/pod-b", "nodeagent.destination.workload": "bench/app/pod-b",
            "nodeagent.destination.identity": "spiffe://cluster.local/ns/bench/sa/pod-b",
            "nodeagent.route": "pod/bench/pod-b:8080", "nodeagent.tls": True, "http.request.method": "GET",
            "url.path": "/status/503", "server.address": "127.0.0.1:15001", "network.protocol.version": "1.1",
            "http.response.status_code": 503}
    assert len(spans) == 4
    lines = [json.loads(text) for text in read_lines(log) if '"outbound"' in text][:4]
    trace_ids = [line["trace_id"] for line in lines]
    assert trace_ids[:2] == [CLIENT_TRACE, CLIENT_TRACE] and trace_ids[3] == CLIENT_TRACE
    assert len(trace_ids[2]) == 32 and trace_ids[2] not in (CLIENT_TRACE, "0" * 32)


def test_new_traces_at_a_sampling_rate_of_one_h2(tmp_path):
    from otel_collector import Collector

    with Collector() as collector:
        settings = replace(MESH, trace_collector=collector.url, trace_sampling=1.0)
        asyncio.run(run_pair(settings, annotated(), [("h2c", lambda port: h2_requests(port, ["/", "/status/404"]))],
                             spans=4))
        collector.wait_for_spans(4)
        time.sleep(0.5)
        every = collector.spans()
        spans = [s for s in every if s["attributes"]["nodeagent.direction"] == "outbound"]
    assert len(spans) == 2 and len(every) == 4
    assert all(s["Parent ID"] == "" and s["attributes"]["network.protocol.version"] == "2" for s in spans)
    assert sorted(s["attributes"]["http.response.status_code"] for s in spans) == [200, 404]
    assert len({s["Trace ID"] for s in spans}) == 2
    inbound = [s for s in every if s["attributes"]["nodeagent.direction"] == "inbound"]
    assert {(s["Trace ID"], s["Parent ID"]) for s in inbound} == {(s["Trace ID"], s["ID"]) for s in spans}
