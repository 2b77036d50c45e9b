"""Edges: who talks to whom, with which identities, over mutual TLS or not: pure.

An agent knows two sides of its pods' traffic, both already in its metrics:
- outbound, at the client's proxy: series labelled by the source pod, `peer` (`svc/<ns>/<name>`,
  `pod/<ns>/<name>` or `external`) and `tls`. The source's identity is its pod's
  ServiceAccount; with tls the destination proved the identity of the pod the request went to
  (mesh.py checks it on every hop), so the server's identity follows from the peer in the view:
  a Service's endpoint pods, or the pod;
- inbound, at the server's proxy: series labelled by the destination pod, `peer` (the identity
  the client's certificate proved, or `unauthenticated`) and `tls`.

`agent_edges` turns one agent's samples into edges between workloads (observe/workloads.py),
each seen from one side; `merge` joins the reports of every agent: an edge between two meshed
workloads is counted at the client (where requests to a Service are known) and marked
`verified` when the server's proxy saw the same client identity; inbound edges no client side
reported (unmeshed clients, agents not read) are kept as the server saw them. A Service of several
workloads (a canary) is `svc/<name>` at the client and each workload at its servers: a server
edge whose identity the client side named behind that Service is the same traffic, counted once.

Counts are totals since the agents started: requests and responses (HTTP), connections opened
and open (TCP), bytes read from and written to the client side (counted when a connection
closes). Cardinality: one edge per (source workload, destination, tls) that carried traffic.
"""

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

from nodeagent.identity import naming
from nodeagent.observe.workloads import Workload, of_pod

UNMESHED = "unmeshed"
EXTERNAL = "external"
COUNTED = {"request_total": "requests", "tcp_open_total": "connections", "tcp_open_connections": "open",
           "tcp_read_bytes_total": "bytes_read", "tcp_write_bytes_total": "bytes_written"}


@dataclass
class Edge:
    src_namespace: str  # "" for an unmeshed client
    src: str  # the source workload ("deploy/web"), "unmeshed", or "sa/<name>" when an identity has several
    client_id: str  # the identity the client presented over mTLS; "" without
    dst_namespace: str  # "" for external
    dst: str  # the destination workload, "svc/<name>" when a Service has several, or "external"
    server_id: str  # the identity the server proved over mTLS ("," between several); "" without
    tls: bool
    seen_by: str  # "client" (its proxy's outbound) or "server" (inbound)
    verified: bool = False  # both proxies saw this client identity on this edge
    requests: float = 0.0
    successes: float = 0.0
    failures: float = 0.0
    connections: float = 0.0
    open: float = 0.0
    bytes_read: float = 0.0
    bytes_written: float = 0.0

    def key(self) -> tuple:
        return (self.src_namespace, self.src, self.client_id, self.dst_namespace, self.dst, self.server_id,
                self.tls, self.seen_by)

    def add(self, other: "Edge") -> None:
        for name in ("requests", "successes", "failures", "connections", "open", "bytes_read", "bytes_written"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Destination:
    namespace: str
    name: str
    identities: tuple[str, ...] = field(default=())


class Resolver:
    """Peers and identities to workloads, in one cluster view."""

    def __init__(self, view, trust_domain: str):
        self.view, self.trust_domain = view, trust_domain
        self._services: dict[str, list] = {}
        self._by_identity: dict[str, set[Workload]] | None = None

    def identity(self, pod) -> str:
        return naming.of_pod(pod.namespace, pod.service_account, self.trust_domain).uri

    def _service_pods(self, key: str) -> list:
        if key not in self._services:
            service = self.view.services.get(key)
            pods = {}
            if service is not None:
                for port in service.ports:
                    for endpoint in self.view.endpoints(service, port):
                        if endpoint.pod is not None:
                            pods[endpoint.pod.key] = endpoint.pod
            self._services[key] = list(pods.values())
        return self._services[key]

    def destination(self, peer: str) -> _Destination:
        kind, _, key = peer.partition("/")
        namespace, _, name = key.partition("/")
        if kind == "pod":
            pod = self.view.pods.get(key)
            if pod is None:
                return _Destination(namespace, f"pod/{name}")
            return _Destination(namespace, of_pod(pod).name, (self.identity(pod),) if self.view.meshed(pod) else ())
        if kind == "svc":
            pods = self._service_pods(key)
            workloads = {of_pod(p).name for p in pods}
            identities = tuple(sorted({self.identity(p) for p in pods if self.view.meshed(p)}))
            return _Destination(namespace, workloads.pop() if len(workloads) == 1 else f"svc/{name}", identities)
        return _Destination("", EXTERNAL)

    def source(self, client_id: str) -> tuple[str, str]:
        """(namespace, workload) of a client identity: the one meshed workload running as it,
        else `sa/<name>`."""
        if self._by_identity is None:
            self._by_identity = defaultdict(set)
            for pod in self.view.pods.values():
                if self.view.meshed(pod):
                    self._by_identity[self.identity(pod)].add(of_pod(pod))
        try:
            parsed = naming.parse(client_id)
        except naming.IdentityError:
            return "", client_id
        workloads = self._by_identity.get(client_id, set())
        if len(workloads) == 1:
            return parsed.namespace, next(iter(workloads)).name
        return parsed.namespace, f"sa/{parsed.service_account}"


def agent_edges(samples: list[tuple[str, dict, float]], view, trust_domain: str) -> list[Edge]:
    """One agent's edges from its metric samples (name, labels, value) and its cluster view."""
    resolver = Resolver(view, trust_domain)
    secured_http = _secured_http(samples)
    edges: dict[tuple, Edge] = {}
    for name, labels, value in samples:
        attribute = COUNTED.get(name)
        if attribute is None and name != "response_total":
            continue
        direction, peer = labels.get("direction"), labels.get("peer")
        pod = view.pods.get(f"{labels.get('namespace')}/{labels.get('pod')}")
        if peer is None or pod is None or direction not in ("outbound", "inbound"):
            continue
        tls = labels.get("tls") == "true" or (direction == "outbound" and name.startswith("tcp_")
                                               and (labels["namespace"], labels["pod"], peer) in secured_http)
        edge = _edge(direction, pod, peer, tls, resolver)
        edge = edges.setdefault(edge.key(), edge)
        if attribute is not None:
            setattr(edge, attribute, getattr(edge, attribute) + value)
        elif labels.get("classification") == "failure":
            edge.failures += value
        else:
            edge.successes += value
    return sorted(edges.values(), key=Edge.key)


def _secured_http(samples: list[tuple[str, dict, float]]) -> set[tuple[str, str, str]]:
    """(namespace, pod, peer) whose outbound requests all went over mTLS. The TCP series of an
    outbound HTTP connection say tls=false (it is the app's plaintext connection to its proxy;
    each request's hop decides mTLS), so its connections and bytes join the edge its requests took."""
    seen: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for name, labels, _ in samples:
        if name == "request_total" and labels.get("direction") == "outbound" and "peer" in labels:
            seen[(labels.get("namespace"), labels.get("pod"), labels["peer"])].add(labels.get("tls"))
    return {key for key, tls in seen.items() if tls == {"true"}}


def _edge(direction: str, pod, peer: str, tls: bool, resolver: Resolver) -> Edge:
    own = of_pod(pod)
    if direction == "outbound":
        destination = resolver.destination(peer)
        return Edge(own.namespace, own.name, resolver.identity(pod) if tls else "", destination.namespace,
                    destination.name, ",".join(destination.identities) if tls else "", tls, "client")
    if peer == "unauthenticated" or not tls:
        src_namespace, src = ("", UNMESHED) if peer == "unauthenticated" else resolver.source(peer)
        return Edge(src_namespace, src, "", own.namespace, own.name, "", tls, "server")
    src_namespace, src = resolver.source(peer)
    return Edge(src_namespace, src, peer, own.namespace, own.name, resolver.identity(pod), tls, "server")


def merge(reports: list[list[Edge]]) -> list[Edge]:
    """Every agent's edges as one list: an edge seen by both proxies once (the client's counts,
    `verified`), the server's view where no client reported it."""
    by_key: dict[tuple, Edge] = {}
    for report in reports:
        for edge in report:
            if edge.key() in by_key:
                by_key[edge.key()].add(edge)
            else:
                by_key[edge.key()] = Edge(**edge.as_dict())
    clients = [e for e in by_key.values() if e.seen_by == "client"]
    servers = [e for e in by_key.values() if e.seen_by == "server"]
    # A meshed client's edge, as its server saw it: (client identity, destination workload).
    client_sides = defaultdict(list)
    for edge in clients:
        if edge.tls:
            client_sides[(edge.client_id, edge.dst_namespace, edge.dst)].append(edge)
    # A Service of several workloads is `svc/<name>` at the client, its workload at the server:
    # the client side named the identities behind it, so a server's identity there is a match.
    by_service = defaultdict(list)
    for edge in clients:
        if edge.tls and edge.dst.startswith("svc/"):
            for server_id in edge.server_id.split(","):
                by_service[(edge.client_id, edge.dst_namespace, server_id)].append(edge)
    merged = list(clients)
    for edge in servers:
        matches = None
        if edge.tls:
            matches = (client_sides.get((edge.client_id, edge.dst_namespace, edge.dst))
                       or by_service.get((edge.client_id, edge.dst_namespace, edge.server_id)))
        if matches:
            for match in matches:
                match.verified = True
        else:
            merged.append(edge)
    return sorted(merged, key=Edge.key)


def document(node: str | None, samples: list[tuple[str, dict, float]], view, trust_domain: str,
             enrolled: list) -> dict:
    """What an agent's /edges answers: its enrolled pods (with workload and identity), the number of
    pods of every workload in its cluster view (to say how many are meshed), the workload behind
    each outbound peer its pods reached, and its edges."""
    resolver = Resolver(view, trust_domain)
    sizes = Counter(of_pod(info) for info in view.pods.values())
    pods = [{"pod": info.key, "namespace": info.namespace, "workload": of_pod(info).name,
             "identity": resolver.identity(info), "node": node} for info in sorted(enrolled, key=lambda p: p.key)]
    peers = {}
    for _, labels, _ in samples:
        peer = labels.get("peer")
        if labels.get("direction") == "outbound" and peer and peer not in peers:
            destination = resolver.destination(peer)
            peers[peer] = {"namespace": destination.namespace, "workload": destination.name}
    workloads = [{"namespace": w.namespace, "workload": w.name, "pods": n} for w, n in sorted(sizes.items())]
    return {"node": node, "pods": pods, "workloads": workloads, "peers": peers,
            "edges": [e.as_dict() for e in agent_edges(samples, view, trust_domain)]}


def from_document(document: dict) -> list[Edge]:
    return [Edge(**edge) for edge in document.get("edges", ())]
