"""The request metrics counted in plain numbers (metrics.RequestSeries) are exposed exactly as
prometheus_client's own Counter and Histogram expose the same observations."""

import re

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from nodeagent.proxy.metrics import LATENCY_BUCKETS_MS, TRAFFIC, Metrics

OBSERVED = [  # (labels, status, failure, latency ms); latencies on and between the bounds, and beyond the last
    (("outbound", "ns", "a", "svc/ns/b", "true"), 200, None, 0.5),
    (("outbound", "ns", "a", "svc/ns/b", "true"), 200, None, 1.0),
    (("outbound", "ns", "a", "svc/ns/b", "true"), 503, None, 42.0),
    (("outbound", "ns", "a", "svc/ns/b", "true"), 200, True, 50000.0),
    (("outbound", "ns", "a", "svc/ns/b", "true"), 200, None, 99999.0),
    (("inbound", "ns", "b", "spiffe://x", "false"), 404, None, 7.5),
]


class Pod:
    def __init__(self, namespace, name):
        self.info = type("Info", (), {"namespace": namespace, "name": name})()


def reference(observed) -> bytes:
    r = CollectorRegistry()
    requests = Counter("request", "HTTP requests sent (outbound) or received (inbound)", TRAFFIC, registry=r)
    responses = Counter("response", "HTTP responses", (*TRAFFIC, "status_code", "classification"), registry=r)
    latency = Histogram("response_latency_ms", "Time to a response's head, in ms", TRAFFIC,
                        buckets=LATENCY_BUCKETS_MS, registry=r)
    for labels, status, failure, ms in observed:
        requests.labels(*labels).inc()
        failed = status >= 500 if failure is None else failure
        responses.labels(*labels, str(status), "failure" if failed else "success").inc()
        latency.labels(*labels).observe(ms)
    return generate_latest(r)


def ours(observed) -> tuple[Metrics, bytes]:
    metrics = Metrics()
    for labels, status, failure, ms in observed:
        stats = metrics.requests(labels[0], Pod(labels[1], labels[2]), labels[3], labels[4] == "true")
        stats.request()
        stats.response(status, 0.0, failure, head_at=ms / 1000)
    return metrics, generate_latest(metrics.registry)


def families(exposition: bytes, names: tuple) -> list[str]:
    """The exposition's lines of these families, `_created` values blanked (they are clock times)."""
    lines = exposition.decode().splitlines()
    kept = [line for line in lines if any(re.match(rf"(# \w+ )?{name}[_{{ ]", line) for name in names)]
    return [re.sub(r"(_created\{.*\}) .*", r"\1 T", line) for line in kept]


def test_request_metrics_are_exposed_as_prometheus_client_would():
    names = ("request", "response", "response_latency_ms")
    _, exposed = ours(OBSERVED)
    assert families(exposed, names) == families(reference(OBSERVED), names)
    outbound = [line for line in exposed.decode().splitlines() if "_bucket" in line and "outbound" in line]
    assert [line.split()[-1] for line in outbound if 'le="50000.0"' in line or 'le="+Inf"' in line] == ["4.0", "5.0"]


def test_the_same_labels_share_one_series_and_a_departed_pod_takes_its_series_along():
    metrics, _ = ours(OBSERVED)
    first = metrics.requests("outbound", Pod("ns", "a"), "svc/ns/b", True)
    assert first is metrics.requests("outbound", Pod("ns", "a"), "svc/ns/b", True) and first.requests == 5
    metrics.forget_pod("ns/a")
    exposed = generate_latest(metrics.registry).decode()
    assert 'pod="a"' not in exposed and 'pod="b"' in exposed
