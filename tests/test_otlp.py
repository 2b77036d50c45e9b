"""The span exporter (proxy/otlp.py) against a real OpenTelemetry Collector (tests/otel_collector.py),
and against collectors that are dead or never answer: the proxy's side never waits, and every
span lost is counted. Loopback only; bounded (a few thousand spans, seconds)."""

import socket
import threading
import time

import pytest

from nodeagent.proxy import otlp
from nodeagent.proxy.otlp import (KIND_CLIENT, KIND_SERVER, SpanExporter, SpanRecord, parse_endpoint,
                                  static_attributes)
from otel_collector import Collector, free_port

RESOURCE = (("service.name", "nodeagent"), ("k8s.node.name", "node0"))
STATIC = static_attributes([("nodeagent.direction", "outbound")])
POD = "default/web-0"


def record(i: int = 1, parent: bytes | None = b"\x01" * 8, error: bool = False) -> SpanRecord:
    now = time.time_ns()
    return SpanRecord(i.to_bytes(16, "big"), (i + 7).to_bytes(8, "big"), parent, KIND_CLIENT if i % 2 else KIND_SERVER,
                      f"GET svc/default/api:{i}", now - 5_000_000, now, STATIC, (
                          ("http.response.status_code", 200 + i % 2), ("nodeagent.tls", True)), error)


class Counts:
    def __init__(self):
        self.dropped = self.exported = self.failures = 0

    def exporter(self, url: str) -> SpanExporter:
        def drop(n=1):
            self.dropped += n

        def export(n=1):
            self.exported += n

        def fail(n=1):
            self.failures += n
        return SpanExporter(url, RESOURCE, drop, export, fail)


@pytest.mark.parametrize("url, expected", [
    ("http://collector.tracing:4318", ("collector.tracing", 4318, "/v1/traces")),
    ("http://127.0.0.1:14318/", ("127.0.0.1", 14318, "/v1/traces")),
    ("http://10.0.0.1/otlp/v1/traces", ("10.0.0.1", 4318, "/otlp/v1/traces")),
])
def test_endpoints(url, expected):
    assert parse_endpoint(url) == expected


@pytest.mark.parametrize("url", ["https://c:4318", "c:4318", "http://:4318", "http://c:99999", ""])
def test_endpoints_refused(url):
    with pytest.raises(ValueError):
        parse_endpoint(url)


def test_spans_reach_a_real_collector_with_their_fields():
    counts = Counts()
    with Collector() as collector:
        exporter = counts.exporter(collector.url)
        for i in range(1, 701):  # more than one batch
            exporter.record(record(i, parent=None if i == 2 else b"\x01" * 8, error=i == 3), POD)
        exporter.close(timeout_s=20)
        spans = collector.wait_for_spans(700)
    assert counts.exported == 700 and counts.dropped == 0 and counts.failures == 0
    by_name = {span["Name"]: span for span in spans}
    first = by_name["GET svc/default/api:1"]
    assert first["Trace ID"] == (1).to_bytes(16, "big").hex() and first["ID"] == (8).to_bytes(8, "big").hex()
    assert first["Parent ID"] == "01" * 8 and first["Kind"] == "Client"
    assert first["attributes"] == {"nodeagent.direction": "outbound", "http.response.status_code": 201,
                                   "nodeagent.tls": True}
    assert by_name["GET svc/default/api:2"]["Parent ID"] == "" and by_name["GET svc/default/api:2"]["Kind"] == "Server"
    assert by_name["GET svc/default/api:3"]["Status code"] == "Error"


def test_a_dead_collector_costs_drops_not_waits():
    counts = Counts()
    exporter = counts.exporter(f"http://127.0.0.1:{free_port()}")  # nothing listens
    for i in range(3000):
        exporter.record(record(i), POD)
    exporter.close(timeout_s=10)
    assert counts.exported == 0 and counts.dropped == 3000 and counts.failures >= 1
    assert not exporter._thread.is_alive()


def test_a_collector_that_never_answers_fills_the_queue_and_drops(monkeypatch):
    """Accepts and reads, never answers: the exporter's thread waits out EXPORT_TIMEOUT_S per batch
    while the proxy's side keeps recording at once; beyond the queue, spans are dropped, counted."""
    monkeypatch.setattr(otlp, "EXPORT_TIMEOUT_S", 1.0)
    monkeypatch.setattr(otlp, "QUEUE_SPANS", 600)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                held.append(conn)
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    counts = Counts()
    exporter = counts.exporter(f"http://127.0.0.1:{server.getsockname()[1]}")
    try:
        for i in range(5000):
            exporter.record(record(i), POD)
        assert counts.dropped >= 5000 - 600 - otlp.BATCH_SPANS  # the queue, and at most one batch in flight
        assert counts.exported == 0
    finally:
        exporter.close(timeout_s=10)
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()
    assert counts.dropped == 5000 and counts.failures >= 1 and held


def test_a_pod_flooding_a_stuck_collector_leaves_room_for_the_others(monkeypatch):
    """Half of the queue per pod: a pod's flood drops its own spans; another pod's still queue."""
    monkeypatch.setattr(otlp, "QUEUE_SPANS", 400)
    counts = Counts()
    exporter = counts.exporter(f"http://127.0.0.1:{free_port()}")  # nothing listens; the thread is slow to fail
    exporter._thread = threading.Thread()  # not started: nothing leaves the queue during the flood
    for i in range(2000):
        exporter.record(record(i), "default/flood-0")
    for i in range(50):
        exporter.record(record(i), "default/quiet-0")
    assert exporter.shares.held("default/flood-0") == 200 and exporter.shares.held("default/quiet-0") == 50
    assert counts.dropped == 1800 and len(exporter.spans) == 250


def test_a_new_collector_takes_the_batches_posted_after_it():
    counts = Counts()
    with Collector() as first, Collector() as second:
        exporter = counts.exporter(first.url)
        exporter.record(record(1), POD)
        assert [span["Name"] for span in first.wait_for_spans(1)] == ["GET svc/default/api:1"]
        exporter.retarget(second.url)
        exporter.record(record(2), POD)
        exporter.close(timeout_s=20)
        assert [span["Name"] for span in second.wait_for_spans(1)] == ["GET svc/default/api:2"]
        assert len(first.wait_for_spans(1)) == 1  # nothing more went to the first
    assert counts.exported == 2 and counts.dropped == 0
