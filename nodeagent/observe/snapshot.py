"""One poll of every agent (its /metrics samples and its /edges document), reduced to what the
console shows: pure.

A workload's golden numbers (success rate, latency, RPS) are those of the traffic *to* it: from
its own pods' inbound HTTP series when the agents count inbound HTTP, else from its clients'
outbound series whose peer is that workload (unmeshed clients are then not seen). Its TCP
connections and mTLS share are always its pods' inbound series. A Service whose endpoints
belong to several workloads cannot be attributed to one: its traffic shows on the clients'
pages only.

Size: one Totals per workload, per namespace and per (workload, destination) its pods reached;
all bounded by the agents' series.
"""

from dataclasses import dataclass, field

from nodeagent.observe import edges as edge_model
from nodeagent.observe.aggregate import Totals, totals_by


def workload_key(namespace: str, workload: str) -> str:
    return f"{namespace}/{workload}"


def namespace_of(key: str) -> str:
    return key.partition("/")[0]


@dataclass
class Snapshot:
    at: float  # when it was taken (monotonic seconds)
    pods: dict[str, dict] = field(default_factory=dict)  # enrolled pod key -> {workload, node, identity}
    sizes: dict[str, int] = field(default_factory=dict)  # workload key -> its pods in the cluster view
    peers: dict[str, str] = field(default_factory=dict)  # outbound peer label -> workload key (one workload)
    workloads: dict[str, Totals] = field(default_factory=dict)  # workload key -> traffic to it
    inbound_http: set[str] = field(default_factory=set)  # workload keys whose HTTP numbers are their own
    outbound: dict[str, dict[str, Totals]] = field(default_factory=dict)  # workload -> destination -> totals
    edges: list = field(default_factory=list)  # merged edges (observe/edges.py)
    errors: list[str] = field(default_factory=list)  # agents that did not answer, and why

    def meshed(self, key: str) -> int:
        return sum(1 for pod in self.pods.values() if workload_key(pod["namespace"], pod["workload"]) == key)

    def namespaces(self) -> dict[str, Totals]:
        out: dict[str, Totals] = {}
        for key in self.sizes:
            out.setdefault(namespace_of(key), Totals())
        for key, totals in self.workloads.items():
            out.setdefault(namespace_of(key), Totals()).add(totals)
        return out

    def pods_of(self, key: str) -> list[str]:
        return sorted(pod for pod, entry in self.pods.items()
                      if workload_key(entry["namespace"], entry["workload"]) == key)


def reduce(at: float, reports: list[tuple[list, dict]], errors: list[str]) -> Snapshot:
    """`reports`: (metric samples, /edges document) of each agent that answered."""
    snapshot = Snapshot(at, errors=list(errors))
    samples = []
    for agent_samples, document in reports:
        samples += agent_samples
        for pod in document.get("pods", ()):
            snapshot.pods[pod["pod"]] = pod
        for entry in document.get("workloads", ()):
            snapshot.sizes[workload_key(entry["namespace"], entry["workload"])] = entry["pods"]
        for peer, destination in document.get("peers", {}).items():
            if destination["namespace"] and not destination["workload"].startswith("svc/"):
                snapshot.peers[peer] = workload_key(destination["namespace"], destination["workload"])
    own = {pod: workload_key(entry["namespace"], entry["workload"]) for pod, entry in snapshot.pods.items()}

    def source(labels: dict) -> str | None:
        return own.get(f"{labels.get('namespace')}/{labels.get('pod')}")

    inbound = totals_by(samples, lambda labels: source(labels) if labels.get("direction") == "inbound" else None)
    by_clients = totals_by(samples, lambda labels: snapshot.peers.get(labels.get("peer", ""))
                           if labels.get("direction") == "outbound" else None)
    for key in set(inbound) | set(by_clients):
        totals = Totals()
        own_http = inbound.get(key)
        if own_http is not None and (own_http.requests or own_http.buckets):
            totals.add_http(own_http)
            snapshot.inbound_http.add(key)
        elif key in by_clients:
            totals.add_http(by_clients[key])
        if key in inbound:
            totals.add_tcp(inbound[key])
        snapshot.workloads[key] = totals
    outbound = totals_by(samples, lambda labels: (source(labels), snapshot.peers.get(labels["peer"], labels["peer"]))
                         if labels.get("direction") == "outbound" and "peer" in labels else None)
    for (src, destination), totals in outbound.items():
        if src is not None:
            snapshot.outbound.setdefault(src, {})[destination] = totals
    snapshot.edges = edge_model.merge([edge_model.from_document(document) for _, document in reports])
    return snapshot
