"""Pure arithmetic for stat and top: histogram quantiles, per-destination
rates between two scrapes, and tap events rolled up by route."""

import math
from collections import defaultdict
from dataclasses import dataclass, field


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus's histogram_quantile: `buckets` are (upper bound, cumulative count), +Inf last."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    buckets = sorted(buckets)
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # beyond the last finite bucket: its bound is the best estimate
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return buckets[-1][0]


@dataclass
class Totals:
    requests: float = 0.0
    successes: float = 0.0
    buckets: dict = field(default_factory=lambda: defaultdict(float))  # upper bound -> cumulative count
    open_connections: float = 0.0
    connections: float = 0.0  # opened
    secured: float = 0.0  # of those, over mTLS

    def add(self, other: "Totals") -> None:
        self.add_http(other)
        self.add_tcp(other)

    def add_http(self, other: "Totals") -> None:
        self.requests += other.requests
        self.successes += other.successes
        for bound, count in other.buckets.items():
            self.buckets[bound] += count

    def add_tcp(self, other: "Totals") -> None:
        self.open_connections += other.open_connections
        self.connections += other.connections
        self.secured += other.secured


def totals_by(samples: list[tuple[str, dict, float]], key) -> dict:
    """Traffic summed per `key(labels)` (None: not counted), over whatever labels the key leaves out."""
    out: dict = defaultdict(Totals)
    for name, labels, value in samples:
        if name not in COUNTED:
            continue
        group = key(labels)
        if group is None:
            continue
        totals = out[group]
        if name == "response_total":
            totals.requests += value
            if labels.get("classification") == "success":
                totals.successes += value
        elif name == "response_latency_ms_bucket":
            totals.buckets[float(labels["le"])] += value
        elif name == "tcp_open_connections":
            totals.open_connections += value
        else:
            totals.connections += value
            if labels.get("tls") == "true":
                totals.secured += value
    return out


COUNTED = frozenset(("response_total", "response_latency_ms_bucket", "tcp_open_connections", "tcp_open_total"))


def totals_by_destination(samples: list[tuple[str, dict, float]]) -> dict[str, Totals]:
    """Outbound traffic summed over pods, nodes and tls, per destination (`peer`)."""
    return totals_by(samples, lambda labels: labels.get("peer") if labels.get("direction") == "outbound" else None)


@dataclass(frozen=True)
class StatRow:
    destination: str
    success_rate: float | None
    rps: float
    p50: float | None
    p95: float | None
    p99: float | None
    open_connections: float
    mtls: float | None = None  # the share of connections opened over mTLS (in the window, else ever)


def stat_rows(before: dict[str, Totals], after: dict[str, Totals], seconds: float) -> list[StatRow]:
    rows = []
    for destination in sorted(after):
        a, b = after[destination], before.get(destination, Totals())
        requests = a.requests - b.requests
        buckets = [(bound, a.buckets[bound] - b.buckets.get(bound, 0.0)) for bound in a.buckets]
        opened = a.connections - b.connections
        rows.append(StatRow(
            destination,
            (a.successes - b.successes) / requests if requests > 0 else None,
            requests / seconds if seconds > 0 else 0.0,
            histogram_quantile(0.50, buckets), histogram_quantile(0.95, buckets), histogram_quantile(0.99, buckets),
            a.open_connections,
            (a.secured - b.secured) / opened if opened > 0 else a.secured / a.connections if a.connections else None))
    return rows


@dataclass
class RouteTotals:
    count: int = 0
    successes: int = 0
    best_ms: float = math.inf
    worst_ms: float = 0.0
    last_ms: float = 0.0


def ends(event: dict) -> tuple[str, str]:
    """(source, destination) of a tap event. The event's pod is the one whose proxy saw it: the
    client outbound (to a peer: `svc/ns/name`, `pod/ns/name`, `external`), the server inbound
    (from a peer: the client's identity or `unauthenticated`)."""
    pod = f"{event['namespace']}/{event['pod']}"
    return (event["destination"], pod) if event.get("direction") == "inbound" else (pod, event["destination"])


def roll_up(events: list[dict]) -> list[tuple[tuple, RouteTotals]]:
    """Tap events of requests by (source, destination, method, path), busiest first."""
    routes: dict[tuple, RouteTotals] = defaultdict(RouteTotals)
    for e in events:
        if e.get("kind") == "tls":
            continue  # a passed-through TLS connection has no route, status or latency
        totals = routes[(*ends(e), e["method"], e["path"])]
        totals.count += 1
        totals.successes += e["status"] < 500
        totals.best_ms = min(totals.best_ms, e["latency_ms"])
        totals.worst_ms = max(totals.worst_ms, e["latency_ms"])
        totals.last_ms = e["latency_ms"]
    return sorted(routes.items(), key=lambda item: (-item[1].count, item[0]))
