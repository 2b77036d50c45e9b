"""Outbound: a pod's connection, captured by connect4, accepted in the pod.

accept -> original destination (the data path) -> route -> detect -> HTTP/1
(per-request balancing) or opaque (per-connection balancing).

Server-speaks-first: the upstream connection is opened at accept time, in
parallel with detection. If the server's bytes arrive before the client's,
the connection is opaque and the banner reaches the client as soon as it is
read: nothing waits for a detection timeout. If the client speaks HTTP/1
first, that early connection becomes the first pooled connection to its
endpoint. The cost: every outbound connection opens its upstream at once,
as a plain TCP proxy would.
"""

import asyncio
import time

from nodeagent.proxy.detect import MAX_PREFIX, NEED_MORE, Protocol, detect
from nodeagent.proxy.errors import error_response
from nodeagent.proxy.http1 import Http1Server
from nodeagent.proxy.relay import Holding, splice_held
from nodeagent.proxy.routing import Passthrough, ToPod, ToService, route
from nodeagent.proxy.service_config import DEFAULT
from nodeagent.proxy import mesh
from nodeagent.proxy.upstream import connect

CONNECT_ATTEMPTS = 3  # opaque TCP: endpoints tried before the client is reset


class OutboundAccept(asyncio.Protocol):
    def __init__(self, proxy, pod):
        self.proxy, self.pod = proxy, pod
        self.buffer = bytearray()
        self.decided = False
        self.transport = None
        self.upstream: asyncio.Task | None = None
        self.early: Holding | None = None
        self.endpoint = None
        self.client_eof = False

    def connection_made(self, transport):
        self.transport = transport
        self.proxy.stats.open_connections += 1
        peer_port = transport.get_extra_info("peername")[1]
        original = self.proxy.datapath.original_destination(self.pod.cookie, peer_port)
        if original is None:
            self.proxy.stats.inc("tcp_errors", direction="outbound", reason="no original destination")
            transport.abort()
            return
        self.original = original
        self.decision = route(self.proxy.view, *original)
        self.config = self.proxy.config_for(self.decision)
        self.proxy.stats.inc("tcp_open", direction="outbound", pod=self.pod.key, dst=self.dst_label)
        if self.proxy.stats.open_connections > self.proxy.max_connections:
            self.proxy.stats.inc("tcp_errors", direction="outbound", reason="connection limit")
            transport.abort()
            return
        self.upstream = asyncio.get_running_loop().create_task(self._connect())
        if original[1] in self.config.opaque_ports:
            self._decide(Protocol.OPAQUE)

    @property
    def dst_label(self) -> str:
        d = self.decision
        if isinstance(d, ToService):
            return f"svc/{d.service.key}"
        if isinstance(d, ToPod):
            return f"pod/{d.pod.key}"
        return "external"

    async def _connect(self):
        """Open the upstream at once, trying other endpoints if a connect fails."""
        tried: set = set()
        for _ in range(CONNECT_ATTEMPTS):
            target = self._pick(tried)
            if target is None:
                return None
            state, address, destination = target
            tried.add(address)
            # The protocol is not known yet: the hint says opaque, the destination detects for itself.
            tunnel = self.proxy.tunnel_to(self.pod, destination, address[1], mesh.HINT_OPAQUE)
            holding = Holding()
            try:
                transport, _ = await connect(self.pod.netns_path, address, self.config.connect_timeout_s,
                                             lambda: holding, tunnel)
            except (OSError, asyncio.TimeoutError) as e:
                if state is not None:
                    state.accrual.on_failure()
                self._count_connect_failure(e)
                if state is None:
                    return None
                continue
            if state is not None:
                state.connections += 1
            self.endpoint = (state, address)
            self.early = holding
            holding.on_event = self._upstream_event
            if holding.buffer or holding.eof or holding.lost:
                self._upstream_event()  # it spoke while the connection was being set up
            return transport
        return None

    def _pick(self, tried):
        """(endpoint state or None, address, destination pod or None), or None."""
        d = self.decision
        if isinstance(d, ToService):
            state = self.proxy.endpoints_for(d).choose_for_connection(tried)
            return (state, state.address, state.endpoint.pod) if state else None
        if len(tried):
            return None
        if isinstance(d, ToPod):
            return None, (d.pod.ip, d.port), d.pod
        return None, (d.ip, d.port), None

    def _count_connect_failure(self, error):
        if isinstance(error, mesh.TunnelError):
            self.proxy.handshake_failed("outbound", str(error), None)
        self.proxy.stats.inc("tcp_errors", direction="outbound", reason="connect failed")

    # --- detection ---

    def data_received(self, data):
        if self.decided:
            self.buffer += data
            return
        self.buffer += data
        found = detect(bytes(self.buffer))
        if found is NEED_MORE and len(self.buffer) < MAX_PREFIX:
            return
        self._decide(found.protocol if found else Protocol.OPAQUE, found.sni if found else None)

    def eof_received(self):
        self.client_eof = True
        if not self.decided:
            self._decide(Protocol.OPAQUE)
        return True

    def _upstream_event(self):
        """The server spoke (or closed) before the client: server-speaks-first, opaque."""
        if not self.decided:
            self._decide(Protocol.OPAQUE)

    def _decide(self, protocol: Protocol, sni: str | None = None):
        self.decided = True
        self.proxy.stats.inc("detected", direction="outbound", protocol=protocol.value)
        if protocol is Protocol.HTTP1:
            asyncio.get_running_loop().create_task(self._as_http1())
        else:
            asyncio.get_running_loop().create_task(self._as_opaque())

    async def _as_opaque(self):
        upstream = await self.upstream
        if upstream is None:
            self.proxy.stats.inc("tcp_errors", direction="outbound", reason="no endpoint")
            self.transport.abort()  # TCP has no error page: a reset
            return
        if self.early.lost:  # it spoke and hung up before the splice: deliver, then close
            self.transport.write(bytes(self.early.buffer))
            self._closed(self.endpoint[0])
            self.transport.close()
            return
        state = self.endpoint[0]
        splice_held(self.transport, bytes(self.buffer), self.client_eof, self.early,
                    on_close=lambda _: self._closed(state))

    def _closed(self, state):
        self.proxy.stats.open_connections -= 1
        self.proxy.stats.inc("tcp_close", direction="outbound", pod=self.pod.key)
        if state is not None:
            state.connections -= 1

    async def _as_http1(self):
        self.transport.pause_reading()
        upstream = await self.upstream
        state = self.endpoint[0] if self.endpoint else None
        if upstream is not None:
            if state is not None:
                state.connections -= 1
            if self.early.buffer or self.early.eof or self.early.lost:
                upstream.close()  # it spoke before any request: not a clean HTTP/1 connection
            else:
                self.proxy.pool.adopt(self.pod.cookie, self.endpoint[1], upstream)
        target = HttpTarget(self.proxy, self.pod, self.decision, self.config)
        server = Http1Server(target, bytes(self.buffer))
        self.transport.set_protocol(server)
        server.connection_made(self.transport)
        self.transport.resume_reading()

    def connection_lost(self, exc):
        if not self.decided:
            self.proxy.stats.open_connections -= 1
            if self.upstream:
                self.upstream.cancel()
                if self.early and self.early.transport:
                    self.early.transport.close()


class HttpTarget:
    """Where the requests of one client connection go, and what is counted."""

    def __init__(self, proxy, pod, decision, config):
        self.proxy, self.pod, self.decision = proxy, pod, decision
        self.config = config if isinstance(decision, ToService) else DEFAULT
        self.retry_limit = self.config.retry_limit
        self.request_timeout_s = self.config.request_timeout_s
        self.endpoints = proxy.endpoints_for(decision) if isinstance(decision, ToService) else None
        self.budget = proxy.budget_for(decision)
        self.dst = decision.service.key if isinstance(decision, ToService) else (
            decision.pod.key if isinstance(decision, ToPod) else f"{decision.ip}:{decision.port}")

    def choose(self, tried: set):
        """(endpoint state, address) for the next attempt, preferring endpoints not
        tried yet but retrying a tried one rather than none; or why there is none."""
        if self.endpoints is None:
            d = self.decision
            return None, ((d.pod.ip, d.port) if isinstance(d, ToPod) else (d.ip, d.port))
        state = self.endpoints.choose_for_request(tried) or self.endpoints.choose_for_request()
        if state is None:
            return self.endpoints.why_unavailable()
        state.accrual.on_send()
        return state, state.address

    async def acquire(self, address):
        tunnel = self.proxy.tunnel_to(self.pod, self._pod_at(address), address[1], mesh.HINT_HTTP1)
        return await self.proxy.pool.acquire(self.pod.netns_path, self.pod.cookie, address,
                                             self.config.connect_timeout_s, tunnel)

    def _pod_at(self, address):
        if isinstance(self.decision, ToService):
            state = self.endpoints.states.get(address)
            return state.endpoint.pod if state else None
        return self.decision.pod if isinstance(self.decision, ToPod) else None

    def release(self, address, conn):
        self.proxy.pool.release(self.pod.cookie, address, conn)

    def _failed(self, state):
        ejections = state.accrual.ejections
        state.accrual.on_failure()
        if state.accrual.ejections > ejections:
            self.proxy.stats.inc("endpoint_ejections", dst=self.dst)

    def connect_failed(self, state, exc):
        if state is not None:
            self._failed(state)
        if isinstance(exc, mesh.TunnelError):
            self.proxy.handshake_failed("outbound", str(exc), None)
        self.proxy.stats.inc("tcp_errors", direction="outbound", reason="connect failed")

    def may_retry(self) -> bool:
        allowed = self.budget.withdraw()
        self.proxy.stats.inc("retries" if allowed else "retry_budget_exhausted", dst=self.dst)
        return allowed

    def retries_status(self, status: int) -> bool:
        return self.config.retries_status(status)

    def new_request(self):
        """Once per request, however many attempts it takes: what the retry budget grows by."""
        self.budget.deposit()

    def request_started(self, state):
        self.proxy.stats.inc("request_total", direction="outbound", pod=self.pod.key, dst=self.dst)
        return state.ewma.start() if state is not None else time.monotonic()

    def request_finished(self, state, token, status):
        if state is None:
            return
        state.ewma.finish(token)
        if status is None or status >= 500:
            self._failed(state)
        else:
            state.accrual.on_success()

    def response_started(self, request, status):
        self.proxy.stats.inc("response_total", direction="outbound", pod=self.pod.key, dst=self.dst,
                             status_code=str(status), classification="success" if status < 500 else "failure")

    def count_error(self, status, reason):
        self.proxy.stats.inc("http_errors", direction="outbound", status_code=str(status), reason=reason)
