"""Outbound: a pod's connection, captured by connect4, accepted in the pod.

accept -> original destination (the data path) -> route -> detect -> HTTP/1
(per-request balancing) or opaque (per-connection balancing).

Server-speaks-first: unless the client has spoken within EAGER_CONNECT_DELAY_S
of the accept, the upstream connection is opened in parallel with detection.
If the server's bytes arrive before the client's, the connection is opaque
and the banner reaches the client as soon as it is read: nothing waits for a
detection timeout (the banner is at most a few milliseconds later than
without a mesh). A client that speaks HTTP/1 within the delay, as HTTP
clients do, opens no upstream of its own: its requests go over pooled
connections, so a new client connection costs no new mutual-TLS handshake.
If it spoke later, the early connection becomes a pooled connection.
"""

import asyncio
import functools
import time

from nodeagent.proxy.detect import MAX_PREFIX, NEED_MORE, Protocol, detect
from nodeagent.proxy.classify import failed
from nodeagent.proxy.http1 import Http1Server
from nodeagent.proxy.http2 import Http2Server
from nodeagent.proxy.relay import READ_AHEAD_MAX, Holding, close_when_idle, nodelay, splice_held
from nodeagent.proxy.routing import ToPod, ToService, route
from nodeagent.proxy.service_config import DEFAULT
from nodeagent.identity import naming
from nodeagent.proxy import mesh
from nodeagent.proxy.tap import request_event, tls_event
from nodeagent.proxy.upstream import connect, open_socket
from nodeagent.policy.authz import Client

CONNECT_ATTEMPTS = 3  # opaque TCP: endpoints tried before the client is reset
EAGER_CONNECT_DELAY_S = 0.003


class OutboundAccept(asyncio.Protocol):
    def __init__(self, proxy, pod):
        self.proxy, self.pod = proxy, pod
        self.buffer = bytearray()
        self.decided = False
        self.transport = None
        self.upstream: asyncio.Task | None = None
        self.early: Holding | None = None
        self.endpoint = None  # (endpoint state or None, address) of the early upstream
        self.tls = False  # whether the early upstream is a mutual-TLS hop
        self.client_eof = False
        self.stats = None  # the client connection's counters, made once the hop (mTLS or not) is known
        self.finished = False
        self.adopting = False
        self._timer: asyncio.TimerHandle | None = None
        self.upstream_cookie = pod.cookie  # the namespace the upstream socket lives in
        self.on_node: OnNodeInbound | None = None  # the destination's side of an on-node hop
        self.kernel = None  # a KernelSplice carrying part of the bytes
        self.refused = False  # the on-node destination's policy refused us
        self.opaque = False  # decided: opaque (the bytes wait here for the splice)

    def connection_made(self, transport):
        self.transport = transport
        nodelay(transport)
        peer_port = transport.get_extra_info("peername")[1]
        original = self.proxy.datapath.original_destination(self.pod.cookie, peer_port)
        if original is None:
            self.proxy.metrics.tcp_error("outbound", self.pod, "no original destination")
            transport.abort()
            return
        if self.proxy.open_connections >= self.proxy.max_connections:
            self.proxy.metrics.tcp_error("outbound", self.pod, "connection limit")
            transport.abort()
            return
        self.proxy.open_connections += 1
        self.original = original
        self.decision = route(self.proxy.view, *original)
        self.peer = peer_label(self.decision)
        self.config = self.proxy.config_for(self.decision)
        if original[1] in self.config.opaque_ports:
            self._decide(Protocol.OPAQUE)
        else:
            self._timer = asyncio.get_running_loop().call_later(EAGER_CONNECT_DELAY_S, self._start_connect)

    def _start_connect(self):
        if self.upstream is None:
            self.upstream = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self):
        """Open the upstream at once, trying other endpoints if a connect fails."""
        tried: set = set()
        for _ in range(CONNECT_ATTEMPTS):
            target = self._pick(tried)
            if target is None:
                return None
            state, address, destination = target
            tried.add(address)
            holding = Holding()
            local = self.proxy.on_node(destination)
            tunnel = None
            try:
                if local is not None:
                    transport = await self._connect_on_node(local, address[1], holding)
                    if transport is None:
                        return None
                else:
                    # The protocol is not known yet: the hint says opaque, the destination detects for itself.
                    tunnel = self.proxy.tunnel_to(self.pod, destination, address[1], mesh.HINT_OPAQUE)
                    transport, _ = await connect(self.pod.netns_path, address, self.config.connect_timeout_s,
                                                 lambda: holding, tunnel)
            except naming.IdentityError:
                # The pod left the mesh (its identity went with it) while this connection was set up.
                self.proxy.metrics.tcp_error("outbound", self.pod, "no identity")
                return None
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
            self.tls = tunnel is not None
            self.early = holding
            holding.on_event = self._upstream_event
            if holding.buffer or holding.eof or holding.lost:
                self._upstream_event()  # it spoke while the connection was being set up
            return transport
        return None

    async def _connect_on_node(self, local, port: int, holding: Holding):
        """Plaintext on the node: the destination pod's policy is asked with our pod's identity
        (the kernel told us which pod this connection is from), and its app is reached at its
        IP from inside it, as the mesh hop would; no byte leaves the kernel. None if refused."""
        client = Client(self.pod.info.ip, self.pod.identity.uri)
        if not self.proxy.authorize(local, port, client).allowed:
            self.refused = True  # counted if the connection turns out opaque (HTTP goes the mesh way: a 403)
            return None
        sock = await open_socket(local.netns_path, (local.info.ip, port), self.config.connect_timeout_s)
        transport, _ = await asyncio.get_running_loop().create_connection(lambda: holding, sock=sock)
        self.upstream_cookie = local.cookie
        self.on_node = OnNodeInbound(self.proxy, local, port, client, transport)
        return transport

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
            self.proxy.handshake_failed("outbound", error.reason, None, str(error))
        self.proxy.metrics.tcp_error("outbound", self.pod, "connect failed")

    # --- detection ---

    def data_received(self, data):
        self.buffer += data
        if self.decided:
            if self.opaque and len(self.buffer) >= READ_AHEAD_MAX:
                self.transport.pause_reading()  # until the splice: the client waits, nothing piles up
            return
        found = detect(bytes(self.buffer))
        if found is NEED_MORE and len(self.buffer) < MAX_PREFIX:
            return
        if found and found.protocol is Protocol.TLS:
            self._record_sni(found.sni)
        self._decide(found.protocol if found else Protocol.OPAQUE)

    def eof_received(self):
        self.client_eof = True
        if not self.decided:
            self._decide(Protocol.OPAQUE)
        return True

    def _upstream_event(self):
        """The server spoke (or closed) before the client: server-speaks-first, opaque."""
        if not self.decided:
            self._decide(Protocol.OPAQUE)

    def _record_sni(self, sni: str | None) -> None:
        """TLS from the app passes through opaque; the server name it asked for is what
        operators can see of it: a bounded metric label and a tap event."""
        self.proxy.metrics.tls_sni("outbound", self.pod, sni)
        self.proxy.tap.publish(lambda: tls_event("outbound", self.pod, self.peer, sni))

    def _decide(self, protocol: Protocol):
        self.decided = True
        self.proxy.metrics.detected("outbound", self.pod, protocol.value)
        if self._timer:
            self._timer.cancel()
        if protocol in (Protocol.HTTP1, Protocol.H2):
            asyncio.get_running_loop().create_task(self._as_http(protocol))
        else:
            self.opaque = True
            self._start_connect()
            asyncio.get_running_loop().create_task(self._as_opaque())

    async def _as_opaque(self):
        upstream = await self.upstream
        if upstream is None or self.transport.is_closing():
            if upstream is None:
                self.proxy.metrics.tcp_error("outbound", self.pod, "refused by policy" if self.refused else "no endpoint")
            else:
                upstream.close()
                if self.on_node is not None:
                    self.on_node.close(len(self.buffer), 0)
            self._done()
            self.transport.abort()  # TCP has no error page: a reset
            return
        self._count_open()
        if self.early.lost:  # it spoke and hung up before the splice: deliver, then close
            self.transport.write(bytes(self.early.buffer))
            self.stats.written += len(self.early.buffer)
            if self.on_node is not None:
                self.on_node.close(len(self.buffer), len(self.early.buffer))
            self._done()
            self.transport.close()
            return
        if not self.tls:
            self.kernel = self.proxy.kernel_splice(self.transport, self.pod.cookie, self.early.transport,
                                                   self.upstream_cookie)
        pair = splice_held(self.transport, bytes(self.buffer), self.client_eof, self.early,
                           on_close=self._relay_closed)
        if not self.transport.is_reading() and not self.transport.is_closing():
            self.transport.resume_reading()
        if self.kernel is not None:
            self.kernel.attach(pair)
        close_when_idle(pair, self.config.idle_timeout_s, self.kernel.moved if self.kernel else None)

    def _relay_closed(self, client_side):
        carried = self.kernel.end() if self.kernel else {}
        read = client_side.bytes_in + carried.get(id(client_side), 0)
        written = client_side.peer.bytes_in + carried.get(id(client_side.peer), 0)
        self.stats.read += read
        self.stats.written += written
        self.stats.spliced += sum(carried.values())
        if self.on_node is not None:
            self.on_node.close(read, written, sum(carried.values()))
        self._done()

    def _count_open(self):
        if self.stats is None:
            self.stats = self.proxy.metrics.connection("outbound", self.pod, self.peer, self.tls)

    def _done(self):
        if self.finished:
            return
        self.finished = True
        self.proxy.open_connections -= 1
        self._count_open()
        self.stats.close()
        state = self.endpoint[0] if self.endpoint and not self.adopting else None
        if state is not None:
            state.connections -= 1
            self.endpoint = None

    async def _as_http(self, protocol: Protocol):
        # An early upstream still being set up must not hold the first request back (a burst
        # of new connections would queue behind each other's handshakes): it joins the pool
        # when it is ready, and requests use whatever the pool has meanwhile.
        self.adopting = self.upstream is not None  # from here the early upstream belongs to the pool
        h2 = protocol is Protocol.H2
        if self.adopting:
            adopt = functools.partial(self._adopt, h2=h2)
            if self.upstream.done():
                adopt(self.upstream)
            else:
                self.upstream.add_done_callback(adopt)
        if self.transport.is_closing():
            self._done()
            return
        self._count_open()
        target = HttpTarget(self.proxy, self.pod, self.decision, self.config, self.peer)
        server = (Http2Server if h2 else Http1Server)(target, bytes(self.buffer), self.stats, on_close=self._done)
        self.transport.set_protocol(server)
        server.connection_made(self.transport)

    def _adopt(self, task: asyncio.Task, h2: bool) -> None:
        """The early upstream becomes a pooled connection, if it is a clean one (an HTTP/2
        server may have sent its SETTINGS already: those are the pooled connection's)."""
        upstream = None if task.cancelled() or task.exception() else task.result()
        if upstream is None or self.endpoint is None:
            return
        state, address = self.endpoint
        if state is not None:
            state.connections -= 1
        self.endpoint = None
        if self.on_node is not None:
            self.on_node.close(0, 0)
            upstream.close()  # requests go over the mesh's pooled connections, with their metrics
        elif self.early.eof or self.early.lost or (self.early.buffer and not h2):
            upstream.close()  # it spoke before any request: not a clean HTTP/1 connection
        elif h2:
            self.proxy.h2pool.adopt(self.pod.cookie, address, upstream, bytes(self.early.buffer),
                                    report=functools.partial(self.proxy.metrics.http2_flood, "outbound", self.pod))
        else:
            self.proxy.pool.adopt(self.pod.cookie, address, upstream)

    def connection_lost(self, exc):
        if self.decided or not hasattr(self, "original"):
            return  # the task serving the decision owns the rest (or nothing was counted)
        if self._timer:
            self._timer.cancel()
        if self.upstream:
            self.upstream.cancel()
            if self.early and self.early.transport:
                self.early.transport.close()
        if self.on_node is not None:
            self.on_node.close(len(self.buffer), 0)
        self._done()


class OnNodeInbound:
    """The destination pod's half of an on-node hop: counted as its inbound connection and
    revoked, like a mesh connection, when the pod's policy stops admitting the client."""

    def __init__(self, proxy, pod, port: int, client: Client, upstream: asyncio.Transport):
        self.proxy, self.pod, self.port, self.client, self.upstream = proxy, pod, port, client, upstream
        self.stats = proxy.metrics.connection("inbound", pod, client.identity, False)
        self.closed = False
        proxy.track_inbound(self, True)

    def revoke(self) -> None:
        self.upstream.abort()

    def close(self, client_bytes: int, app_bytes: int, spliced: int = 0) -> None:
        if self.closed:
            return
        self.closed = True
        self.proxy.track_inbound(self, False)
        self.stats.read += client_bytes
        self.stats.written += app_bytes
        self.stats.spliced += spliced
        self.stats.close()


def peer_label(decision) -> str:
    if isinstance(decision, ToService):
        return f"svc/{decision.service.key}"
    if isinstance(decision, ToPod):
        return f"pod/{decision.pod.key}"
    return "external"


class HttpTarget:
    """Where the requests of one client connection go, and what is counted."""

    def __init__(self, proxy, pod, decision, config, peer: str):
        self.proxy, self.pod, self.decision, self.peer = proxy, pod, decision, peer
        self.config = config if isinstance(decision, ToService) else DEFAULT
        self.retry_limit = self.config.retry_limit
        self.request_timeout_s = self.config.request_timeout_s
        self.endpoints = proxy.endpoints_for(decision) if isinstance(decision, ToService) else None
        self.budget = proxy.budget_for(decision)
        self._stats: dict = {}  # tls -> RequestStats, made on first use
        self._meshed_view, self._meshed_cache = None, {}

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

    def _tunnel(self, address, hint: int):
        return self.proxy.tunnel_to(self.pod, self._pod_at(address), address[1], hint)

    async def acquire(self, address):
        """An HTTP/1 connection to `address` of its own, (connection, reused)."""
        return await self.proxy.pool.acquire(self.pod.netns_path, self.pod.cookie, address,
                                             self.config.connect_timeout_s, self._tunnel(address, mesh.HINT_HTTP1))

    async def acquire_h2(self, address):
        """An HTTP/2 connection to `address` with room for one more stream."""
        return await self.proxy.h2pool.acquire(self.pod.netns_path, self.pod.cookie, address,
                                               self.config.connect_timeout_s, self._tunnel(address, mesh.HINT_H2),
                                               report=self.count_http2_refusal)

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
            self.proxy.metrics.endpoint_ejections_total.labels(self.peer).inc()

    def connect_failed(self, state, exc):
        if state is not None:
            self._failed(state)
        if isinstance(exc, mesh.TunnelError):
            self.proxy.handshake_failed("outbound", exc.reason, None, str(exc))
        self.proxy.metrics.tcp_error("outbound", self.pod, "connect failed")

    def new_request(self):
        """Once per request, however many attempts it takes: what the retry budget grows by."""
        self.budget.deposit()

    def may_retry(self) -> bool:
        allowed = self.budget.withdraw()
        self.proxy.metrics.retry(self.pod, self.peer, allowed)
        return allowed

    def retries_status(self, status: int) -> bool:
        return self.config.retries_status(status)

    def _meshed(self, address) -> bool:
        """Whether requests to `address` go over mutual TLS (for labels), cached per view."""
        if self._meshed_view is not self.proxy.view:
            self._meshed_view, self._meshed_cache = self.proxy.view, {}
        if address not in self._meshed_cache:
            pod = self._pod_at(address)
            self._meshed_cache[address] = pod is not None and self.proxy.view.meshed(pod)
        return self._meshed_cache[address]

    def _requests(self, tls: bool):
        if tls not in self._stats:
            self._stats[tls] = self.proxy.metrics.requests("outbound", self.pod, self.peer, tls)
        return self._stats[tls]

    def request_started(self, state, address):
        self._requests(self._meshed(address)).request()
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
        tls = address is not None and self._meshed(address)
        self._requests(tls).response(status, request.started, failure, getattr(request, "head_at", None))
        self.proxy.tap.publish(lambda: request_event("outbound", self.pod, self.peer, request, status, tls))

    def count_http2_refusal(self, flood):
        """An HTTP/2 peer (the client, or an endpoint) went over its budget (h2budget.Flood)."""
        self.proxy.metrics.http2_flood("outbound", self.pod, flood)

    def count_error(self, status, reason):
        self.proxy.metrics.http_error("outbound", self.pod, status, reason)
