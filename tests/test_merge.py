"""The agent's processes' metrics, merged: pure values in, pure values out."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.agent.merge import Merged, families_of, merge


def registry_with(requests: int, open_now: int, latencies: list[float]):
    r = CollectorRegistry()
    counter = Counter("request", "Requests", ("pod",), registry=r)
    gauge = Gauge("tcp_open_connections", "Open", ("pod",), registry=r)
    histogram = Histogram("response_latency_ms", "Latency", ("pod",), buckets=(1, 10), registry=r)
    counter.labels("a").inc(requests)
    gauge.labels("a").set(open_now)
    for ms in latencies:
        histogram.labels("a").observe(ms)
    return r


def values(families, name, **labels):
    return sum(v for family in families for sample, ls, v in family[3]
               if sample == name and all(ls.get(k) == x for k, x in labels.items()))


def test_series_add_up_across_processes_and_created_keeps_the_earliest():
    main, worker = registry_with(3, 1, [0.5, 5]), registry_with(4, 2, [20])
    merged = merge([families_of(main), families_of(worker)])
    assert values(merged, "request_total", pod="a") == 7
    assert values(merged, "tcp_open_connections", pod="a") == 3
    assert values(merged, "response_latency_ms_count", pod="a") == 3
    assert values(merged, "response_latency_ms_bucket", pod="a", le="1.0") == 1
    assert values(merged, "response_latency_ms_bucket", pod="a", le="+Inf") == 3
    created = [v for f in merged for s, _, v in f[3] if s == "request_created"]
    firsts = [v for f in families_of(main) + families_of(worker) for s, _, v in f[3] if s == "request_created"]
    assert created == [min(firsts)]


def test_a_series_only_one_process_has_is_kept_and_the_exposition_is_valid():
    main, worker = registry_with(1, 0, []), CollectorRegistry()
    Counter("tls_sni", "Names", ("sni",), registry=worker).labels("db").inc()
    registry = CollectorRegistry()
    registry.register(Merged(merge([families_of(main), families_of(worker)])))
    text = generate_latest(registry).decode()
    names = [f.name for f in text_string_to_metric_families(text)]
    assert len(names) == len(set(names))  # each family once
    assert 'tls_sni_total{sni="db"} 1.0' in text and 'request_total{pod="a"} 1.0' in text
