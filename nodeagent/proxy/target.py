"""Where the requests of one client connection go, and what is counted: the HttpTarget that
HTTP/1 and HTTP/2 serve through (one per client connection, for its route).

It chooses endpoints (the Service's balancer), opens or reuses connections to them through
the hop the plan gives (proxy/hop.py, connector.py), starts each request's Retries (its
limit, the Service's budget), and reports requests, responses, retries and errors.
"""

import time
from dataclasses import dataclass

from nodeagent.proxy import mesh, on_node
from nodeagent.proxy.classify import failed
from nodeagent.proxy.connector import HopRefused
from nodeagent.proxy.connection import Phase
from nodeagent.proxy.h2upstream import OnNodeH2Upstream
from nodeagent.proxy.hop import Hint, HopKind
from nodeagent.proxy.limits import Limit
from nodeagent.proxy.retry import RequestFacts, Retries, Verdict
from nodeagent.proxy.routing import ToPod, ToService
from nodeagent.proxy.service_config import DEFAULT
from nodeagent.proxy.tap import request_event
from nodeagent.proxy.target_counts import TargetCounts
from nodeagent.proxy.upstream import HandshakeLimit, ResponseReader


@dataclass(frozen=True)
class HopFacts:
    tls: bool  # mutual TLS on the hop (the `tls` label)
    on_node: tuple | None = None  # ON_NODE: (the destination's PodContext, its inbound RequestStats)
    stats: object = None  # the outbound RequestStats of requests on it (None: not known, NO_HOP)
    far_log: object = None  # ON_NODE: the destination's RequestLog (telemetry.py; None: it asks for none)


NO_HOP = HopFacts(False)


def peer_label(decision) -> str:
    if isinstance(decision, ToService):
        return f"svc/{decision.service.key}"
    if isinstance(decision, ToPod):
        return f"pod/{decision.pod.key}"
    return "external"


class HttpTarget(TargetCounts):
    direction = "outbound"

    def __init__(self, deps, pod, decision, config, peer: str, hint: Hint = Hint.HTTP1):
        self.deps, self.pod, self.decision, self.peer, self.hint = deps, pod, decision, peer, hint
        self.connector, self.pools, self.observers = deps.connector, deps.pools, deps.observers
        self.directory = deps.directory
        self.config = config if isinstance(decision, ToService) else DEFAULT
        self.request_timeout_s = self.config.request_timeout_s
        self.endpoints = deps.directory.endpoints_for(decision) if isinstance(decision, ToService) else None
        self.budget = deps.directory.budget_for(decision)
        self._stats: dict = {}  # tls -> RequestStats, made on first use
        self._hops_view, self._hops = None, {}  # address -> HopFacts, for the current view
        service = decision.service if isinstance(decision, ToService) else None
        route = f"{peer}:{decision.port.port if service is not None else decision.port}"
        # None: no access log and no tracing for this connection's requests
        self.log = deps.observers.telemetry.requests("outbound", pod, peer, route, service, pod_at=self._pod_at)

    # --- each request ---

    def retries(self, facts: RequestFacts, request) -> Retries:
        """A new request (not a retry): the budget grows by it, its retries start, and its trace
        context is set (telemetry.py; before any attempt, so each carries the same)."""
        if self.log is not None:
            self.log.start(request)
        self.budget.deposit()
        return Retries(facts, self.config.retry_limit, self.config.retry_statuses, self.budget, self._count_retry)

    def _count_retry(self, verdict: Verdict) -> None:
        if verdict is Verdict.RETRY or verdict is Verdict.BUDGET:
            self.observers.metrics.retry(self.pod, self.peer, verdict is Verdict.RETRY)

    def choose(self, tried: set):
        """(endpoint state, address) for the next attempt, preferring endpoints not tried yet
        but retrying a tried one rather than none; or why there is none."""
        if self.endpoints is None:
            d = self.decision
            return None, ((d.pod.ip, d.port) if isinstance(d, ToPod) else (d.ip, d.port))
        state = self.endpoints.choose_for_request(tried) or self.endpoints.choose_for_request()
        if state is None:
            return self.endpoints.why_unavailable()
        state.accrual.on_send()
        return state, state.address

    def _pod_at(self, address):
        if isinstance(self.decision, ToService):
            state = self.endpoints.states.get(address)
            return state.endpoint.pod if state else None
        return self.decision.pod if isinstance(self.decision, ToPod) else None

    async def acquire(self, address):
        """An HTTP/1 connection to `address` of its own, (connection, reused)."""
        return await self.pools.http1.acquire(self.pod.netns_path, self.pod.cookie, address,
                                              self.config.connect_timeout_s, lambda: self._open(address))

    async def _open(self, address) -> ResponseReader:
        """A new HTTP/1 connection to `address`, through the hop the plan gives."""
        conn, _ = await self._open_hop(self.connector.plan(address, self._pod_at(address), Hint.HTTP1),
                                       ResponseReader, Phase.HTTP1)
        return conn

    async def _open_hop(self, hop, factory, phase: Phase):
        """A new connection for `hop`. On the node (ON_NODE) the destination's side is done here
        (on_node.py): its policy, its inbound share (the pooled connection is one of its inbound
        connections, ended by a policy change); `factory`'s connection calls `on_lost` at its end.
        (The connection, the destination's inbound Connection or None.)"""
        inbound = on_node.admit(self.deps, self.pod, hop) if hop.kind is HopKind.ON_NODE else None
        try:
            _, conn = await self.connector.open(self.pod, hop, self.config.connect_timeout_s, factory)
        except BaseException:
            if inbound is not None:
                inbound.close()
            raise
        if inbound is not None:
            inbound.enter(phase)
            inbound.hold(conn.transport)
            inbound.revoke = conn.transport.abort
            conn.on_lost = lambda lost: inbound.close(lost.sent, lost.received)
        return conn, inbound

    async def _open_on_node_h2(self, hop):
        """A shared HTTP/2 connection to the destination's app, from its namespace (the one hop);
        it drains as the destination's inbound connection it is."""
        conn, inbound = await self._open_hop(hop, OnNodeH2Upstream, Phase.HTTP2)
        inbound.drains_with(conn.drain)
        return conn.transport, conn

    def pooled_h2(self, address):
        """A pooled HTTP/2 connection to `address` with room for one more stream, or None (then
        `acquire_h2` opens one)."""
        return self.pools.http2.ready(self.pod.cookie, address)

    async def acquire_h2(self, address):
        """An HTTP/2 connection to `address` with room for one more stream (ON_NODE: opened as
        `_open_on_node_h2`)."""
        hop = self.connector.plan(address, self._pod_at(address), Hint.H2)
        on_node_hop = hop.kind is HopKind.ON_NODE
        return await self.pools.http2.acquire(
            self.pod.netns_path, self.pod.cookie, address, self.config.connect_timeout_s,
            None if on_node_hop else self.connector.tunnel(self.pod, hop), report=self.count_http2_refusal,
            opener=(lambda: self._open_on_node_h2(hop)) if on_node_hop else None)

    def pooled(self, address):
        """An idle pooled HTTP/1 connection to `address`, or None (then `acquire` opens one)."""
        return self.pools.http1.take(self.pod.cookie, address)

    def release(self, address, conn):
        self.pools.http1.release(self.pod.cookie, address, conn)

    # --- HTTP/2 streams: the pod's share ---

    stream_limit = Limit.HTTP2_STREAMS

    def take_stream(self) -> bool:
        return self.pod.quota.take(self.stream_limit)

    def give_stream(self) -> None:
        self.pod.quota.give(self.stream_limit)

    # --- what happened ---

    def _failed(self, state):
        ejections = state.accrual.ejections
        state.accrual.on_failure()
        if state.accrual.ejections > ejections:
            self.observers.metrics.endpoint_ejections_total.labels(self.peer).inc()

    def connect_failed(self, state, exc):
        if state is not None and not isinstance(exc, (HopRefused, HandshakeLimit, on_node.OnNodeRefused)):
            self._failed(state)  # the endpoint's fault, not ours or the pod's
        if isinstance(exc, mesh.TunnelError):
            self.observers.metrics.handshake_failed("outbound", exc.reason)
            self.observers.problems.warning("tls", "outbound TLS handshake refused: %s", exc)
        if isinstance(exc, HandshakeLimit):
            self.count_limit(exc.limit.value)
        self.observers.metrics.tcp_error("outbound", self.pod, self.connect_failure_reason(exc))

    @staticmethod
    def connect_failure_reason(exc) -> str:
        if isinstance(exc, (HopRefused, on_node.OnNodeRefused)):
            return exc.reason
        if isinstance(exc, HandshakeLimit):
            return f"{exc.limit.value} limit"
        return "connect failed"

    def _hop(self, address) -> HopFacts:
        """What the hop to `address` means for the counts, cached per view."""
        view = self.directory.view
        if self._hops_view is not view:
            self._hops_view, self._hops = view, {}
        facts = self._hops.get(address)
        if facts is None:
            hop = self.connector.plan(address, self._pod_at(address), self.hint)
            inbound = far_log = None
            if hop.kind is HopKind.ON_NODE:
                local = self.directory.served(hop.destination)
                source = self.pod.identity.uri
                inbound = (local, self.observers.metrics.requests("inbound", local, source, False))
                # What the far end of a mesh hop records (app_target.AppTarget): its access log, its spans.
                far_log = self.observers.telemetry.requests("inbound", local, f"pod/{local.key}",
                                                            f"pod/{local.key}:{hop.port}", client_addr=self.pod.info.ip,
                                                            client_id=source)
            tls = hop.kind is HopKind.MESH
            facts = self._hops[address] = HopFacts(tls, inbound, self._requests(tls), far_log)
        return facts

    def sending(self, request, address) -> None:
        """An attempt to `address` is about to go (its head not built yet): on the one hop, the
        destination's span starts here, the child of the source's, as a mesh hop's far end
        starts it on reading the head (each attempt a span of its own)."""
        far_log = self._hop(address).far_log
        if far_log is not None:
            far_log.start_far(request)

    def _requests(self, tls: bool):
        stats = self._stats.get(tls)
        if stats is None:
            stats = self._stats[tls] = self.observers.metrics.requests("outbound", self.pod, self.peer, tls)
        return stats

    def request_started(self, state, address):
        hop = self._hop(address)
        hop.stats.request()
        if hop.on_node is not None:
            hop.on_node[1].request()  # the destination's inbound count, as its side of a mesh hop would
        return state.ewma.start() if state is not None else time.monotonic()

    def request_finished(self, state, token, status, grpc_status=None):
        if state is None:
            return
        state.ewma.finish(token)
        if failed(status, grpc_status):
            self._failed(state)
        else:
            state.accrual.on_success()

    def request_abandoned(self, state, token):
        """The client went away mid-request: the latency so far counts, the outcome does not."""
        if state is not None:
            state.ewma.finish(token)

    def count_response(self, request, status, address=None, failure=None):
        """A response to count (and tap): HTTP/1 at its head; HTTP/2 at its end, with
        `failure` from the gRPC status and the head's arrival in `request.head_at`."""
        hop = self._hop(address) if address is not None else NO_HOP
        tls, head_at = hop.tls, getattr(request, "head_at", None)
        (hop.stats or self._requests(tls)).response(status, request.started, failure, head_at)
        if self.log is not None:
            self.log.response(request, status, tls, failure, address)
        tap = self.observers.tap
        if tap.subscriptions:
            tap.publish(lambda: request_event("outbound", self.pod, self.peer, request, status, tls))
        if hop.on_node is not None:  # the destination's side: counted, logged and tapped as inbound
            local, inbound = hop.on_node
            inbound.response(status, request.started, failure, head_at)
            if hop.far_log is not None:
                hop.far_log.response(request, status, False, failure, far=True)
            if tap.subscriptions:
                source = self.pod.identity.uri
                tap.publish(lambda: request_event("inbound", local, source, request, status, False))
