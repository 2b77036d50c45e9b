"""Access logs (and, below, tracing) through the real proxy: two pods in their own network
namespaces and one real Proxy (benchmarks/podpair.py), real sockets, mutual TLS between the
pods' hops; clients run in pod A. Bounded: a few dozen requests; everything is removed after."""

import asyncio
import json
import os
import sys
from dataclasses import replace

import pytest

from benchmarks.podpair import A_IP, B_IP, PodPair, pod_object
from nodeagent.cluster.model import ClusterView
from nodeagent.proxy.accesslog import ANNOTATION
from nodeagent.settings import DEFAULT

pytestmark = [pytest.mark.privileged, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces)")]

TESTS = os.path.dirname(os.path.abspath(__file__))


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
import sys
sys.path.insert(0, {TESTS!r})
from h2_client import H2Client
client = H2Client("127.0.0.1", {port})
for path in {paths!r}:
    (response,) = client.wait(client.request("GET", path, authority="pod-b.bench:8081"))
    print(response.status)
client.close()
"""
    return [sys.executable, "-c", code]


async def run_pair(settings, view: ClusterView, clients) -> list[str]:
    """Start the pair, give it `view`, run each (kind, argv-maker) client in pod A; the outputs."""
    pair = await PodPair(settings).start()
    outputs = []
    try:
        pair.proxy.update_view(view)
        for kind, argv in clients:
            _, port = pair.aim(kind)
            result = await pair.run_in_a_async(argv(port), timeout=60)
            assert result.returncode == 0, result.stderr
            outputs.append(result.stdout)
    finally:
        await pair.stop()  # writes the queued lines
    return outputs


def read_lines(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_access_log_json_for_an_annotated_pod_both_http_versions(tmp_path):
    log = tmp_path / "access.log"
    settings = replace(DEFAULT, access_log=str(log))
    paths = ["/", "/status/503?secret=1", "/status/404"]
    outputs = asyncio.run(run_pair(settings, annotated(pod_a={ANNOTATION: "json"}), [
        ("http", lambda port: http1_requests(port, paths)),
        ("h2c", lambda port: h2_requests(port, paths)),
    ]))
    assert [o.split() for o in outputs] == [["200", "503", "404"]] * 2
    lines = [json.loads(text) for text in read_lines(log)]
    outbound = [entry for entry in lines if entry["direction"] == "outbound"]
    assert [(e["version"], e["uri"], e["status"]) for e in outbound] == [
        ("HTTP/1.1", "/", 200), ("HTTP/1.1", "/status/503", 503), ("HTTP/1.1", "/status/404", 404),
        ("HTTP/2", "/", 200), ("HTTP/2", "/status/503", 503), ("HTTP/2", "/status/404", 404)]
    first = outbound[0]
    assert first["pod"] == "pod-a" and first["namespace"] == "bench"
    assert first["destination"] == "pod/bench/pod-b" and first["tls"] is True
    assert first["client.addr"] == A_IP and first["client.id"].endswith("/ns/bench/sa/pod-a")
    assert first["host"] == "pod-b.bench:8080" and first["user_agent"] == "telemetry-test"
    assert first["total_ns"] > 0 and first["timestamp"].endswith("Z")
    assert all("secret" not in text for text in read_lines(log))


def test_access_log_apache_to_stderr_and_none_without_the_annotation(tmp_path, capfd):
    settings = replace(DEFAULT, access_log="stderr")
    asyncio.run(run_pair(settings, annotated(pod_a={ANNOTATION: "apache"}), [
        ("http", lambda port: http1_requests(port, ["/", "/status/500"]))]))
    lines = [text for text in capfd.readouterr().err.splitlines() if '"GET http://pod-b.bench:8080' in text]
    assert len(lines) == 2
    assert lines[0].startswith(f"{A_IP} spiffe://cluster.local/ns/bench/sa/pod-a - [")
    assert lines[0].endswith('"GET http://pod-b.bench:8080/ HTTP/1.1" 200')
    assert lines[1].endswith('"GET http://pod-b.bench:8080/status/500 HTTP/1.1" 500')

    log = tmp_path / "none.log"
    asyncio.run(run_pair(replace(DEFAULT, access_log=str(log)), annotated(pod_b={"unrelated": "x"}), [
        ("http", lambda port: http1_requests(port, ["/"]))]))
    assert read_lines(log) == []  # no annotation: no line, not even a file
