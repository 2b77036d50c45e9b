"""Metrics.child: a series' child looked up once, then reused; a departed pod's series removed
and, if its traffic comes again, started over from zero."""

from nodeagent.agent.merge import families_of
from nodeagent.proxy.metrics import Metrics
from test_metrics_sni import pod


def opened(metrics: Metrics) -> dict[str, float]:
    return {labels["pod"]: value for _, _, _, samples in families_of(metrics.registry)
            for name, labels, value in samples if name == "tcp_open_total"}


def test_a_connections_series_is_looked_up_once_and_counts_every_connection():
    metrics, client = Metrics(), pod("client")
    labels = ("outbound", "default", "client", "svc/default/web", "true")
    assert metrics.child(metrics.tcp_open_total, labels) is metrics.child(metrics.tcp_open_total, labels)
    for _ in range(3):
        metrics.connection("outbound", client, "svc/default/web", True).close()
    assert opened(metrics) == {"client": 3}


def test_a_departed_pods_series_are_removed_and_start_over():
    metrics, client, other = Metrics(), pod("client"), pod("other")
    metrics.connection("outbound", client, "external", False).close()
    metrics.connection("outbound", other, "external", False).close()
    assert metrics.forget_pod(client.key) >= 5  # open, open connections, close, read and written bytes
    assert opened(metrics) == {"other": 1}
    metrics.connection("outbound", client, "external", False)
    assert opened(metrics) == {"client": 1, "other": 1}  # a new series, not the removed one's count
