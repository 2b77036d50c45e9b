"""Server names of passed-through TLS are app-chosen labels: bounded per pod."""

from types import SimpleNamespace

from nodeagent.agent.merge import families_of
from nodeagent.proxy.metrics import SNI_LABELS_PER_POD, SNI_NONE, SNI_OTHER, Metrics


def pod(name: str):
    return SimpleNamespace(key=f"default/{name}", info=SimpleNamespace(namespace="default", name=name))


def sni_series(metrics: Metrics) -> dict[str, float]:
    return {labels["sni"]: value for _, _, _, samples in families_of(metrics.registry)
            for name, labels, value in samples if name == "tls_sni_total"}


def test_each_name_counts_until_the_pod_has_its_share_then_the_rest_is_other():
    metrics, client = Metrics(), pod("client")
    for i in range(SNI_LABELS_PER_POD + 5):
        metrics.tls_sni("outbound", client, f"host{i}.example")
    metrics.tls_sni("outbound", client, "host0.example")  # a known name keeps its own series
    metrics.tls_sni("outbound", client, None)
    series = sni_series(metrics)
    assert series["host0.example"] == 2
    assert series[SNI_OTHER] == 6  # five new names past the share, and the nameless hello
    assert SNI_NONE not in series and len(series) == SNI_LABELS_PER_POD + 1


def test_a_hello_without_a_name_is_counted_as_none_and_a_departed_pod_starts_over():
    metrics, client = Metrics(), pod("client")
    metrics.tls_sni("outbound", client, None)
    assert sni_series(metrics) == {SNI_NONE: 1}
    metrics.forget_pod(client.key)
    assert sni_series(metrics) == {}
    metrics.tls_sni("outbound", client, "db.example")
    assert sni_series(metrics) == {"db.example": 1}
