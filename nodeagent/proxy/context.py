"""What each stage of the proxy is given: the pod it serves, and narrow, typed handles on what
the node's pods share. Stages see only their own deps (OutboundDeps, InboundDeps), never the
Proxy that assembles them (server.py), so what a stage reads and changes is in its imports.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nodeagent.cluster.model import PodInfo
from nodeagent.identity import naming
from nodeagent.proxy.limits import Quota
from nodeagent.proxy.metrics import Metrics
from nodeagent.proxy.problems import ProblemLog
from nodeagent.proxy.source_share import SourceShares
from nodeagent.proxy.tap import TapHub
from nodeagent.proxy.telemetry import Telemetry

if TYPE_CHECKING:  # the stages' deps, named for readers and checkers (importing them here would cycle)
    from nodeagent.proxy.authorizer import Authorizer
    from nodeagent.proxy.connection import ConnectionTable
    from nodeagent.proxy.connector import Connector
    from nodeagent.proxy.directory import Directory
    from nodeagent.proxy.fastpath import Splicer
    from nodeagent.proxy.h2upstream import H2Pool
    from nodeagent.proxy.upstream import Pool


@dataclass(eq=False)
class PodContext:
    """An enrolled pod as this proxy process serves it."""

    info: PodInfo
    netns_fd: int
    cookie: int  # its network namespace's cookie (the data path's key)
    slot: int
    identity: naming.Identity
    quota: Quota  # what it holds of its limits (proxy/limits.py)
    servers: list = field(default_factory=list)
    # inbound mesh handshakes in progress per client address (source_share.py)
    handshakes_by_source: SourceShares = field(default_factory=SourceShares)

    @property
    def netns_path(self) -> str:
        # The fd keeps the namespace alive and names it, whatever happens to the pod's processes.
        return f"/proc/self/fd/{self.netns_fd}"

    @property
    def key(self) -> str:
        return self.info.key


@dataclass(frozen=True)
class Observers:
    """Where every stage reports: metrics, the tap, the rate-limited problem log, and access logs."""

    metrics: Metrics
    tap: TapHub
    problems: ProblemLog
    telemetry: Telemetry

    async def guarded(self, stage: Awaitable, direction: str, pod: PodContext, clean_up: Callable[[], None]) -> None:
        """Run one connection's stage so that a bug in it ends that connection (`clean_up`),
        logged and counted, never the proxy. (A cancellation is not an Exception: it passes.)"""
        try:
            await stage
        except Exception as e:
            self.problems.exception(direction, e, f"{direction} connection of {pod.key}")
            self.metrics.tcp_error(direction, pod, "proxy error")
            clean_up()


@dataclass(frozen=True)
class Pools:
    """Connections to endpoints, per (pod, endpoint): HTTP/1 idle ones, HTTP/2 shared ones."""

    http1: Pool
    http2: H2Pool


@dataclass(frozen=True)
class Timeouts:
    """How long the proxy waits on a peer at each stage (the per-Service ones are annotations)."""

    detect_s: float = 10.0  # the client's first bytes (with a partial prefix too); then it is opaque
    handshake_s: float = 10.0  # a mutual-TLS handshake and the tunnel header after it
    client_hello_s: float = 2.0  # inbound mesh: the ClientHello's first bytes (a mesh client sends it at once)
    app_connect_s: float = 1.0  # inbound: the pod's own app
    deny_detect_s: float = 1.0  # a refused client, to learn whether it speaks HTTP (for a 403)
    inbound_idle_s: float = 3600.0  # an inbound opaque connection with no byte either way (outbound: per Service)


@dataclass(frozen=True)
class OutboundDeps:
    original_destination: Callable[[int, int], tuple[str, int] | None]  # (netns cookie, client port)
    directory: Directory  # the view, and per-Service endpoints, config, budget
    connector: Connector  # hops and the connections that carry them
    connections: ConnectionTable
    authorizer: Authorizer  # destination policy, for on-node hops
    splicer: Splicer  # kernel splices, if on
    pools: Pools  # HTTP/1 and HTTP/2 connections to endpoints
    observers: Observers
    timeouts: Timeouts


@dataclass(frozen=True)
class InboundDeps:
    connections: ConnectionTable
    authorizer: Authorizer
    server_context: Callable[[PodContext], object]  # the pod's TLS server context (its current certificate)
    splicer: Splicer
    app_pools: Pools  # HTTP connections to the pods' own apps (inbound HTTP), apart from the outbound ones
    observers: Observers
    timeouts: Timeouts
