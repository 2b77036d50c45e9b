"""The proxy's Prometheus metrics, named and labelled as linkerd2-proxy's
where Linkerd has them, so that existing dashboards work.

Labels and their cardinality (bounded by the cluster, never by traffic):
- direction: inbound | outbound
- namespace, pod: the meshed pod on this node the traffic belongs to
- peer: outbound, the destination: `svc/<ns>/<name>`, `pod/<ns>/<name>` or `external`
  (never an address: external destinations collapse into one value);
  inbound, the client's mesh identity (a ServiceAccount) or `unauthenticated`
- tls: true | false (mutual TLS between proxies on the hop)
- status_code (HTTP status), classification (success | failure: 5xx, errors, and gRPC's
  server-error statuses: see classify.py)
- reason: from a fixed set in the code (errors, refusals)
Every series of a pod is removed when the pod leaves the node or the mesh.
"""

import time
from bisect import bisect_left
from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

# linkerd2-proxy's response_latency_ms buckets.
LATENCY_BUCKETS_MS = (1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500, 1000, 2000, 3000, 4000, 5000,
                      10000, 20000, 30000, 40000, 50000)
TRAFFIC = ("direction", "namespace", "pod", "peer", "tls")
LATENCY_LE = tuple(floatToGoString(float(bound)) for bound in LATENCY_BUCKETS_MS) + ("+Inf",)
SNI_LABELS_PER_POD = 100
SNI_NONE, SNI_OTHER = "(none)", "(other)"


class ConnectionStats:
    """One connection's counters: opened on creation, closed exactly once."""

    __slots__ = ("metrics", "labels", "read", "written", "spliced", "closed")

    def __init__(self, metrics: "Metrics", labels: tuple):
        self.metrics, self.labels = metrics, labels
        self.read = self.written = 0
        self.spliced = 0  # of read + written: bytes a kernel splice carried past the proxy
        self.closed = False
        metrics.child(metrics.tcp_open_total, labels).inc()
        metrics.child(metrics.tcp_open_connections, labels).inc()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        m = self.metrics
        m.child(m.tcp_open_connections, self.labels).dec()
        m.child(m.tcp_close_total, self.labels).inc()
        m.child(m.tcp_read_bytes_total, self.labels).inc(self.read)
        m.child(m.tcp_write_bytes_total, self.labels).inc(self.written)
        if self.spliced:
            m.child(m.tcp_spliced_bytes_total, self.labels).inc(self.spliced)


class RequestStats:
    """The HTTP series of one (direction, pod, peer, tls): requests, responses by status and
    classification, latency to the head. Counted in plain numbers, on the event loop's thread
    (no lock and no call into prometheus_client per request: those were four or more calls and
    a lock per count), and exposed at each scrape by `RequestSeries`."""

    __slots__ = ("labels", "requests", "responses", "buckets", "latency_sum", "created")

    def __init__(self, labels: tuple):
        self.labels = labels
        self.requests = 0
        self.responses: dict[tuple, list] = {}  # (status, failed) -> [count, created]
        self.buckets = [0] * len(LATENCY_LE)  # per bucket of LATENCY_BUCKETS_MS, then +Inf; not cumulative
        self.latency_sum = 0.0
        self.created = time.time()

    def request(self) -> None:
        self.requests += 1

    def response(self, status: int, started: float, failure: bool | None = None, head_at: float | None = None
                 ) -> None:
        """A response, counted when it is classified: at its head for HTTP/1, at its end for
        HTTP/2 (gRPC's status is in the trailers). `failure` None: a 5xx is one. Latency is
        to the head (`head_at`, now if not given)."""
        key = (status, status >= 500 if failure is None else failure)
        counted = self.responses.get(key)
        if counted is None:
            counted = self.responses[key] = [0, time.time()]
        counted[0] += 1
        latency_ms = ((head_at or time.monotonic()) - started) * 1000
        self.buckets[bisect_left(LATENCY_BUCKETS_MS, latency_ms)] += 1  # le: the first bound >= it
        self.latency_sum += latency_ms


class RequestSeries:
    """The collector of every RequestStats: `request_total`, `response_total` and
    `response_latency_ms`, exposed as prometheus_client's Counter and Histogram would (the
    same names, labels, cumulative buckets and `_created` samples). Bounded as the other
    series: one RequestStats per label set, removed with its pod."""

    REQUEST = ("request", "HTTP requests sent (outbound) or received (inbound)")
    RESPONSE = ("response", "HTTP responses")
    LATENCY = ("response_latency_ms", "Time to a response's head, in ms")

    def __init__(self):
        self.series: dict[tuple, RequestStats] = {}

    def stats(self, labels: tuple) -> RequestStats:
        stats = self.series.get(labels)
        if stats is None:
            stats = self.series[labels] = RequestStats(labels)
        return stats

    def forget_pod(self, namespace: str, pod: str) -> int:
        doomed = [labels for labels in self.series if labels[1] == namespace and labels[2] == pod]
        for labels in doomed:
            del self.series[labels]
        return len(doomed)

    def describe(self):
        return [CounterMetricFamily(*self.REQUEST, labels=TRAFFIC),
                CounterMetricFamily(*self.RESPONSE, labels=(*TRAFFIC, "status_code", "classification")),
                HistogramMetricFamily(*self.LATENCY, labels=TRAFFIC)]

    def collect(self):
        requests, responses, latency = self.describe()
        for labels, stats in list(self.series.items()):
            requests.add_metric(labels, stats.requests, created=stats.created)
            for (status, failed), (count, created) in list(stats.responses.items()):
                responses.add_metric((*labels, str(status), "failure" if failed else "success"), count, created=created)
            cumulative, buckets = 0, []
            for le, count in zip(LATENCY_LE, stats.buckets):
                cumulative += count
                buckets.append((le, cumulative))
            latency.add_metric(labels, buckets, stats.latency_sum)
            latency.add_sample(f"{latency.name}_created", dict(zip(TRAFFIC, labels)), stats.created)
        return [requests, responses, latency]


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.request_series = RequestSeries()  # request_total, response_total, response_latency_ms
        r.register(self.request_series)
        self.tcp_open_total = Counter("tcp_open", "TCP connections opened", TRAFFIC, registry=r)
        self.tcp_close_total = Counter("tcp_close", "TCP connections closed", TRAFFIC, registry=r)
        self.tcp_open_connections = Gauge("tcp_open_connections", "TCP connections open", TRAFFIC, registry=r)
        self.tcp_read_bytes_total = Counter("tcp_read_bytes", "Bytes read from clients", TRAFFIC, registry=r)
        self.tcp_write_bytes_total = Counter("tcp_write_bytes", "Bytes written to clients", TRAFFIC, registry=r)
        self.tcp_spliced_bytes_total = Counter("tcp_spliced_bytes", "Of the bytes read and written: those the "
                                               "kernel carried past the proxy (fast path)", TRAFFIC, registry=r)
        self.tcp_errors_total = Counter("tcp_errors", "Connections the proxy could not serve",
                                        ("direction", "namespace", "pod", "reason"), registry=r)
        self.http_errors_total = Counter("http_errors", "HTTP responses the proxy itself wrote",
                                         ("direction", "namespace", "pod", "status_code", "reason"), registry=r)
        self.protocol_detected_total = Counter("protocol_detected", "Protocols detected on connections",
                                               ("direction", "namespace", "pod", "protocol"), registry=r)
        self.inbound_authorization_total = Counter("inbound_authorization", "Inbound authorization decisions",
                                                   ("namespace", "pod", "decision", "tls"), registry=r)
        self.http2_flood_total = Counter("http2_flood", "HTTP/2 peers over a flood limit or the stream limit "
                                         "(GOAWAY ENHANCE_YOUR_CALM; 'streams': a stream refused)",
                                         ("direction", "namespace", "pod", "reason"), registry=r)
        self.retries_total = Counter("retries", "Retries sent", ("namespace", "pod", "peer"), registry=r)
        self.retry_budget_exhausted_total = Counter("retry_budget_exhausted", "Retries refused by the budget",
                                                    ("namespace", "pod", "peer"), registry=r)
        self.endpoint_ejections_total = Counter("endpoint_ejections", "Endpoints ejected by failure accrual",
                                                ("peer",), registry=r)
        self.limit_exceeded_total = Counter("limit_exceeded", "Connections, TLS handshakes, detections and HTTP/2 "
                                            "streams refused because the pod (or the node) reached a limit",
                                            ("direction", "namespace", "pod", "limit"), registry=r)
        self.tls_handshake_failures_total = Counter("tls_handshake_failures", "Mutual TLS handshakes refused",
                                                    ("direction", "reason"), registry=r)
        self.tls_handshakes_total = Counter("tls_handshakes", "Mutual TLS handshakes done (the peer's identity "
                                            "proven): full, or a session resumed (no certificate signatures)",
                                            ("direction", "resumed"), registry=r)
        self.event_loop_late_ticks_total = Counter("event_loop_late_ticks", "Probes of the event loop (every 20 ms) "
                                                   "that came over 5 ms late", registry=r)
        self.event_loop_handshake_cpu_ratio = Gauge("event_loop_handshake_cpu_ratio", "CPU seconds the process's "
                                                    "mutual-TLS handshakes took per second, over the last 0.25 s "
                                                    "window (their rates are cut only from 0.05, the loop late)",
                                                    registry=r)
        self.handshake_rate_share = Gauge("handshake_rate_share", "The share of its handshake rate a pod gets "
                                          "while its handshakes make the loop late (1: not cut; pods ever cut)",
                                          ("direction", "namespace", "pod"), registry=r)
        self.handshake_rate_contended_refusals_total = Counter(
            "handshake_rate_contended_refusals", "Handshakes refused over a pod's rate while that rate was cut "
            "(also in limit_exceeded_total)", ("direction", "namespace", "pod"), registry=r)
        self.tls_sni_total = Counter("tls_sni", "TLS connections passed through, by the server name asked for "
                                     f"(the first {SNI_LABELS_PER_POD} names per pod; then '{SNI_OTHER}')",
                                     ("direction", "namespace", "pod", "sni"), registry=r)
        self._sni_seen: dict[str, set] = defaultdict(set)  # pod key -> names with a series of their own
        self.access_log_dropped_total = Counter("access_log_dropped", "Access log lines dropped: the queue toward the "
                                                "writer was full, or the destination failed", registry=r)
        self.trace_spans_exported_total = Counter("trace_spans_exported", "Spans the collector accepted", registry=r)
        self.trace_spans_dropped_total = Counter("trace_spans_dropped", "Spans dropped: the queue toward the "
                                                 "exporter was full, or their batch failed", registry=r)
        self.trace_export_failures_total = Counter("trace_export_failures", "Batches of spans the collector "
                                                   "refused or that could not be sent", registry=r)
        self.identity_cert_expiration_timestamp_seconds = Gauge(
            "identity_cert_expiration_timestamp_seconds", "When each workload certificate expires", ("identity",),
            registry=r)
        self._series: dict[str, set] = defaultdict(set)  # pod key -> (metric, label values) it created
        # (metric, label values) -> its child: labels() validates and locks on every call, and a
        # new connection asked for six or more. As many entries as series (`forget_pod` drops a
        # pod's), so bounded as they are.
        self._children: dict[tuple, object] = {}

    def child(self, metric, labels: tuple):
        """metric.labels(*labels), remembered under its pod for `forget_pod`."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            pod_key = self._pod_key(metric, labels)
            if pod_key:
                self._series[pod_key].add(key)
            found = self._children[key] = metric.labels(*labels)
        return found

    @staticmethod
    def _pod_key(metric, labels: tuple) -> str | None:
        names = metric._labelnames
        if "namespace" in names and "pod" in names:
            return f"{labels[names.index('namespace')]}/{labels[names.index('pod')]}"
        return None

    def forget_pod(self, pod_key: str) -> int:
        """Remove every series of a departed pod; how many."""
        self._sni_seen.pop(pod_key, None)
        series = self._series.pop(pod_key, set())
        for metric, labels in series:
            self._children.pop((metric, labels), None)
            try:
                metric.remove(*labels)
            except KeyError:
                pass
        return len(series) + self.request_series.forget_pod(*pod_key.split("/", 1))

    # --- shorthands for the proxy ---

    def connection(self, direction: str, pod, peer: str, tls: bool) -> ConnectionStats:
        return ConnectionStats(self, (direction, pod.info.namespace, pod.info.name, peer, str(tls).lower()))

    def requests(self, direction: str, pod, peer: str, tls: bool) -> RequestStats:
        return self.request_series.stats((direction, pod.info.namespace, pod.info.name, peer, str(tls).lower()))

    def tcp_error(self, direction: str, pod, reason: str) -> None:
        self.child(self.tcp_errors_total, (direction, pod.info.namespace, pod.info.name, reason)).inc()

    def http_error(self, direction: str, pod, status: int, reason: str) -> None:
        self.child(self.http_errors_total, (direction, pod.info.namespace, pod.info.name, str(status), reason)).inc()

    def limit_exceeded(self, direction: str, pod, limit: str) -> None:
        self.child(self.limit_exceeded_total, (direction, pod.info.namespace, pod.info.name, limit)).inc()

    def handshake_failed(self, direction: str, reason: str) -> None:
        self.tls_handshake_failures_total.labels(direction, reason).inc()

    def handshake_done(self, direction: str, resumed: bool) -> None:
        self.tls_handshakes_total.labels(direction, str(resumed).lower()).inc()

    def http2_flood(self, direction: str, pod, flood) -> None:
        self.child(self.http2_flood_total, (direction, pod.info.namespace, pod.info.name, flood.value)).inc()

    def detected(self, direction: str, pod, protocol: str) -> None:
        self.child(self.protocol_detected_total, (direction, pod.info.namespace, pod.info.name, protocol)).inc()

    def authorization(self, pod, allowed: bool, tls: bool) -> None:
        self.child(self.inbound_authorization_total, (pod.info.namespace, pod.info.name,
                                                      "allow" if allowed else "deny", str(tls).lower())).inc()

    def tls_sni(self, direction: str, pod, sni: str | None) -> None:
        """Server names are chosen by apps: bounded per pod, so a scanner cannot blow up the series."""
        name = sni or SNI_NONE
        seen = self._sni_seen[pod.key]
        if name not in seen:
            if len(seen) >= SNI_LABELS_PER_POD:
                name = SNI_OTHER
            else:
                seen.add(name)
        self.child(self.tls_sni_total, (direction, pod.info.namespace, pod.info.name, name)).inc()

    def retry(self, pod, peer: str, allowed: bool) -> None:
        metric = self.retries_total if allowed else self.retry_budget_exhausted_total
        self.child(metric, (pod.info.namespace, pod.info.name, peer)).inc()
