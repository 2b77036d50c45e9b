"""Inbound authorization decisions: pure.

Modes (as Linkerd's default-inbound-policy):
- all-unauthenticated: anyone (the default, like Linkerd)
- all-authenticated: only clients with a mesh identity (mTLS) of this trust domain
- cluster-authenticated: only clients with a mesh identity of this trust domain, from the
  cluster's networks (Linkerd's meaning: authenticated and in-cluster, both)
- cluster-unauthenticated: anyone from the cluster's networks
- deny: no one

"Authenticated" means a proven SPIFFE ID of this mesh's trust domain: a certificate from a
trusted issuer naming another trust domain is not a member of this mesh for the modes (a
port's list may still name it explicitly).

Per pod, annotation `config.nodeagent.io/default-inbound-policy` overrides
the agent's default. Per port, `authz.nodeagent.io/<port>` lists the mesh
identities allowed on that port ("*" for any identity of this trust domain); a listed
port admits nothing else, whatever the mode.
"""

import ipaddress
from dataclasses import dataclass, field
from enum import Enum

from nodeagent.identity.naming import DEFAULT_TRUST_DOMAIN

POLICY_ANNOTATION = "config.nodeagent.io/default-inbound-policy"
PORT_ANNOTATION_PREFIX = "authz.nodeagent.io/"


class Mode(Enum):
    ALL_UNAUTHENTICATED = "all-unauthenticated"
    ALL_AUTHENTICATED = "all-authenticated"
    CLUSTER_AUTHENTICATED = "cluster-authenticated"
    CLUSTER_UNAUTHENTICATED = "cluster-unauthenticated"
    DENY = "deny"


@dataclass(frozen=True)
class PodPolicy:
    mode: Mode
    port_identities: dict = field(default_factory=dict, hash=False)  # port -> frozenset of URIs or {"*"}


@dataclass(frozen=True)
class Client:
    ip: str
    identity: str | None  # the mesh identity (SPIFFE URI) proven by mTLS, else None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


def parse_mode(text: str) -> Mode:
    try:
        return Mode(text.strip())
    except ValueError:
        raise ValueError(f"unknown inbound policy {text!r}; one of: {', '.join(m.value for m in Mode)}") from None


def pod_policy(annotations: dict, default: Mode) -> tuple[PodPolicy, list[str]]:
    """A pod's policy from its annotations, and messages for what was ignored."""
    errors, mode, ports = [], default, {}
    if POLICY_ANNOTATION in annotations:
        try:
            mode = parse_mode(annotations[POLICY_ANNOTATION])
        except ValueError as e:
            errors.append(f"{POLICY_ANNOTATION}: {e}; using {default.value}")
    for key, value in annotations.items():
        if not key.startswith(PORT_ANNOTATION_PREFIX):
            continue
        port = key[len(PORT_ANNOTATION_PREFIX):]
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            errors.append(f"{key}: not a port")
            continue
        identities = frozenset(x.strip() for x in str(value).split(",") if x.strip())
        bad = [x for x in identities if x != "*" and not x.startswith("spiffe://")]
        if bad:
            errors.append(f"{key}: not SPIFFE IDs: {', '.join(sorted(bad))}; port {port} admits no one")
            identities = frozenset()
        ports[int(port)] = identities
    return PodPolicy(mode, ports), errors


def in_trust_domain(identity: str | None, trust_domain: str) -> bool:
    return identity is not None and identity.startswith(f"spiffe://{trust_domain}/")


def authorize(policy: PodPolicy, port: int, client: Client, cluster_networks: tuple,
              trust_domain: str = DEFAULT_TRUST_DOMAIN) -> Decision:
    member = in_trust_domain(client.identity, trust_domain)
    if port in policy.port_identities:
        allowed = policy.port_identities[port]
        if client.identity is None:
            return Decision(False, f"port {port} requires a mesh identity")
        if client.identity in allowed or ("*" in allowed and member):
            return Decision(True, f"{client.identity} is authorized on port {port}")
        return Decision(False, f"{client.identity} is not authorized on port {port}")
    mode = policy.mode
    if mode is Mode.ALL_UNAUTHENTICATED:
        return Decision(True, mode.value)
    if mode is Mode.DENY:
        return Decision(False, mode.value)
    if mode is Mode.ALL_AUTHENTICATED:
        return Decision(member, mode.value if member else f"{mode.value}: {_who(client)} is not a mesh identity "
                        f"of {trust_domain}")
    in_cluster = any(ipaddress.ip_address(client.ip) in net for net in cluster_networks)
    if mode is Mode.CLUSTER_AUTHENTICATED:
        allowed = member and in_cluster
        return Decision(allowed, mode.value if allowed else f"{mode.value}: {_who(client)} is not an authenticated "
                        "client of the cluster")
    return Decision(in_cluster, mode.value)  # CLUSTER_UNAUTHENTICATED


def _who(client: Client) -> str:
    return client.identity or f"plaintext from {client.ip}"
