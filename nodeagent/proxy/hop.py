"""Which hop a connection (or a request's attempt) takes to its destination, and what the
far end must prove. Pure: facts of the destination in, a Hop out (ztunnel's build_request
is the model; tests/test_hop.py is its table).

| destination | hop |
|---|---|
| a meshed pod, on one of the proxy's own ports (15001, 15006, 4143) | REFUSED: it would reach a proxy listener and loop, or be proxied twice |
| not a pod, or a pod outside the mesh | PLAIN: as addressed, plaintext |
| a meshed pod this proxy serves, on-node plaintext allowed | ON_NODE: one hop, plaintext to the pod's app at its IP, from inside its namespace (as inbound does); the destination's policy is asked with the source's identity (on_node.py) |
| any other meshed pod | MESH: mutual TLS to its mesh port, expecting its ServiceAccount's identity; the tunnel header names the port and the protocol detected |
"""

import enum
from dataclasses import dataclass

from nodeagent.cluster.model import PodInfo
from nodeagent.identity import naming
from nodeagent.ports import MESH_PORT, PROXY_PORTS


class Hint(enum.IntEnum):
    """What the source detected, sent in the tunnel header (the destination answers a
    refusal in the client's language: a 403 for HTTP)."""

    OPAQUE = 0  # not HTTP (detected, or the Service's opaque-ports): forwarded as it comes
    HTTP1 = 1
    H2 = 2
    UNDETECTED = 3  # opened before the client spoke (outbound.Early): the destination detects


class HopKind(enum.Enum):
    MESH = "mesh"
    ON_NODE = "on-node"
    PLAIN = "plain"
    REFUSED = "refused"


@dataclass(frozen=True)
class Hop:
    kind: HopKind
    connect_to: tuple[str, int] | None  # the address the proxy connects to (None: refused)
    port: int  # the destination's port, as the app addressed it (the tunnel header carries it)
    hint: Hint = Hint.OPAQUE
    expected: naming.Identity | None = None  # MESH: what the server must prove
    destination: PodInfo | None = None  # the destination pod, if it is one
    reason: str = ""  # REFUSED: why (a metric label; from a fixed set)

    @property
    def tls(self) -> bool:
        return self.kind is HopKind.MESH


PROXY_PORT_REASON = "destination is a proxy port"


def plan_hop(address: tuple[str, int], destination: PodInfo | None, *, meshed: bool, served_here: bool,
             on_node_plaintext: bool, hint: Hint, trust_domain: str) -> Hop:
    """`address`: where the route points (an endpoint, a pod's IP, or anything else);
    `destination`: the pod at that address, if any; `meshed`: that pod is in the mesh;
    `served_here`: this proxy serves that pod (it is on this node)."""
    ip, port = address
    if destination is None or not meshed:
        return Hop(HopKind.PLAIN, address, port, hint, destination=destination)
    if port in PROXY_PORTS:
        return Hop(HopKind.REFUSED, None, port, hint, destination=destination, reason=PROXY_PORT_REASON)
    if served_here and on_node_plaintext:
        return Hop(HopKind.ON_NODE, (destination.ip, port), port, hint, destination=destination)
    expected = naming.of_pod(destination.namespace, destination.service_account, trust_domain)
    return Hop(HopKind.MESH, (destination.ip, MESH_PORT), port, hint, expected, destination)
