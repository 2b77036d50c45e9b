"""Outbound: a pod's connection, captured by connect4, accepted in the pod.

accept -> refused outright while the pod is over a limit (refusal.py) -> admit (the node's and
the pod's limits) -> original destination (the data path)
-> route -> detect -> HTTP/1 or HTTP/2 (per-request balancing, http1.py, http2.py) or
opaque (per-connection balancing, forward.py).

Server-speaks-first: unless the client has spoken within EAGER_CONNECT_DELAY_S
of the accept, the upstream connection is opened in parallel with detection.
If the server's bytes arrive before the client's, the connection is opaque
and the banner reaches the client as soon as it is read: nothing waits for a
detection timeout (the banner is at most a few milliseconds later than
without a mesh). A client that speaks HTTP/1 within the delay, as HTTP
clients do, opens no upstream of its own: its requests go over pooled
connections, so a new client connection costs no new mutual-TLS handshake.
If it spoke later, a plain early connection becomes a pooled connection; a mesh tunnel is
closed (its far end relays it as opaque: see `_adopt`).

A client that sends a partial prefix (or nothing) and waits is treated as
opaque after the detect timeout (10 s, Linkerd's default), so detection never
holds a connection, or the pod's share of detections, for longer.
"""

import asyncio
import enum
import functools
from collections.abc import Awaitable

from nodeagent.identity import naming
from nodeagent.proxy import mesh, on_node
from nodeagent.proxy.attempts import CONNECT_ERRORS
from nodeagent.proxy.connection import Direction, Phase
from nodeagent.proxy.detect import MAX_PREFIX, NEED_MORE, Protocol, detect
from nodeagent.proxy.forward import forward
from nodeagent.proxy.hop import Hint, HopKind
from nodeagent.proxy.http1 import Http1Server
from nodeagent.proxy.http2 import Http2Server
from nodeagent.proxy.refusal import refused_at_accept
from nodeagent.proxy.relay import READ_AHEAD_MAX, Holding
from nodeagent.proxy.routing import ToPod, ToService
from nodeagent.proxy.target import HttpTarget, peer_label
from nodeagent.proxy.tap import tls_event
from nodeagent.proxy.upstream import HandshakeLimit

CONNECT_ATTEMPTS = 3  # opaque TCP: endpoints tried before the client is reset
EAGER_CONNECT_DELAY_S = 0.003


class Early(enum.Enum):
    """The upstream opened before (or while) the protocol is known."""

    NONE = "none"  # not started
    OPENING = "opening"
    OPEN = "open"  # connected (and through the mTLS handshake, for a mesh hop)
    FAILED = "failed"  # no endpoint, every attempt failed, or the on-node policy refused
    GONE = "gone"  # handed to the pool, spliced, or closed


class OutboundAccept(asyncio.Protocol):
    def __init__(self, deps, pod):
        self.deps, self.pod = deps, pod
        self.conn = None  # connection.Connection, once admitted
        self.transport = None
        self.buffer = bytearray()  # what the client sent before its protocol was known
        self.client_eof = False
        self.early_state = Early.NONE
        self.early_task: asyncio.Task | None = None
        self.early: Holding | None = None  # the early upstream, while it waits for the splice
        self.early_hop = None  # its Hop
        self.early_failure = "no endpoint"  # why there is no early upstream (a metric reason)
        self.endpoint = None  # (endpoint state or None, address) the early upstream counts against
        self.on_node = None  # the destination's inbound Connection on an on-node hop
        self._eager_timer: asyncio.TimerHandle | None = None
        self._detect_timer: asyncio.TimerHandle | None = None

    # --- accept ---

    def connection_made(self, transport):
        self.transport = transport
        deps = self.deps
        over = self.pod.quota.refusing("outbound", asyncio.get_running_loop().time())
        if over is not None:
            # Its original destination stays in the kernel's LRU map, unread: two syscalls saved.
            refused_at_accept(deps.observers, self.pod, "outbound", over, transport)
            return
        peer_port = transport.get_extra_info("peername")[1]
        original = deps.original_destination(self.pod.cookie, peer_port)
        if original is None:
            deps.observers.metrics.tcp_error("outbound", self.pod, "no original destination")
            transport.abort()
            return
        self.conn = deps.connections.admit(self.pod, Direction.OUTBOUND, Phase.DETECTING)
        if self.conn is None:
            transport.abort()  # refused by a limit (counted and logged by the table)
            return
        self.conn.hold(transport)
        self.original = original
        self.decision = deps.directory.route(*original)
        self.peer = peer_label(self.decision)
        self.config = deps.directory.config_for(self.decision)
        if original[1] in self.config.opaque_ports:
            self._decide(Protocol.OPAQUE)
            return
        loop = asyncio.get_running_loop()
        self._eager_timer = loop.call_later(EAGER_CONNECT_DELAY_S, self._start_connect)
        self._detect_timer = loop.call_later(deps.timeouts.detect_s, self._detect_timeout)

    # --- detection ---

    def data_received(self, data):
        self.buffer += data
        if self.conn.phase is not Phase.DETECTING:
            if len(self.buffer) >= READ_AHEAD_MAX:
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
        if self.conn.phase is Phase.DETECTING:
            self._decide(Protocol.OPAQUE)
        return True

    def _detect_timeout(self):
        if self.conn.phase is Phase.DETECTING:
            self._decide(Protocol.OPAQUE)  # a partial prefix, or silence: not ours to hold

    def _upstream_spoke(self):
        """The server spoke (or closed) before the client: server-speaks-first, opaque."""
        if self.conn.phase is Phase.DETECTING:
            self._decide(Protocol.OPAQUE)

    def _record_sni(self, sni: str | None) -> None:
        """TLS from the app passes through opaque; the server name it asked for is what
        operators can see of it: a bounded metric label and a tap event."""
        observers = self.deps.observers
        observers.metrics.tls_sni("outbound", self.pod, sni)
        observers.tap.publish(lambda: tls_event("outbound", self.pod, self.peer, sni))

    def _decide(self, protocol: Protocol):
        for timer in (self._eager_timer, self._detect_timer):
            if timer is not None:
                timer.cancel()
        self.deps.observers.metrics.detected("outbound", self.pod, protocol.value)
        loop = asyncio.get_running_loop()
        if protocol in (Protocol.HTTP1, Protocol.H2):
            self.conn.enter(Phase.HTTP2 if protocol is Protocol.H2 else Phase.HTTP1)
            loop.create_task(self._guarded(self._as_http(protocol)))
        else:
            self.conn.enter(Phase.CONNECTING)
            self._start_connect()
            loop.create_task(self._guarded(self._as_opaque()))

    def _guarded(self, stage) -> Awaitable:
        return self.deps.observers.guarded(stage, "outbound", self.pod, self._end_after_a_bug)

    def _end_after_a_bug(self) -> None:
        self.transport.abort()
        if self.early is not None and self.early.transport is not None:
            self.early.transport.abort()
        if not self.conn.closed:
            self._finish(0, 0)

    # --- the upstream, opened early or for opaque bytes ---

    def _start_connect(self):
        if self.early_state is Early.NONE:
            self.early_state = Early.OPENING
            self.early_task = asyncio.get_running_loop().create_task(self._connect())

    def _pick(self, tried: set):
        """(endpoint state or None, address, destination pod or None), or None."""
        d = self.decision
        if isinstance(d, ToService):
            state = self.deps.directory.endpoints_for(d).choose_for_connection(tried)
            return (state, state.address, state.endpoint.pod) if state else None
        if tried:
            return None
        if isinstance(d, ToPod):
            return None, (d.pod.ip, d.port), d.pod
        return None, (d.ip, d.port), None

    async def _connect(self) -> asyncio.Transport | None:
        """Open the upstream at once, trying other endpoints if a connect fails. The protocol is
        not known yet: the hint says so, and the destination detects for itself (a connection
        adopted into a pool later is served per request there too)."""
        deps, tried = self.deps, set()
        for _ in range(CONNECT_ATTEMPTS):
            target = self._pick(tried)
            if target is None:
                break
            state, address, destination = target
            tried.add(address)
            hop = deps.connector.plan(address, destination, Hint.UNDETECTED)
            holding = Holding()
            try:
                if hop.kind is HopKind.ON_NODE and not self._admitted_on_node(hop):
                    self.early_failure = "refused by policy"
                    break
                transport, _ = await deps.connector.open(self.pod, hop, self.config.connect_timeout_s,
                                                         lambda: holding)
            except naming.IdentityError:
                # The pod left the mesh (its identity went with it) while this connection was set up.
                self.early_failure = "no identity"
                break
            except CONNECT_ERRORS as e:
                if self.on_node is not None:
                    self.on_node.close()
                    self.on_node = None
                reason = HttpTarget.connect_failure_reason(e)
                self._count_connect_failure(e, reason, state)
                self.early_failure = reason
                if state is None or reason != "connect failed":
                    break
                continue
            if state is not None:
                state.connections += 1
            self.endpoint, self.early_hop, self.early = (state, address), hop, holding
            self.early_state = Early.OPEN
            holding.on_event = self._upstream_spoke
            if holding.buffer or holding.eof or holding.lost:
                self._upstream_spoke()  # it spoke while the connection was being set up
            return transport
        self.early_state = Early.FAILED
        return None

    def _admitted_on_node(self, hop) -> bool:
        """Plaintext on the node: the destination's side of the hop, done here (on_node.py)."""
        try:
            self.on_node = on_node.admit(self.deps, self.pod, hop)
        except on_node.OnNodeRefused:
            return False  # refused like a mesh connection would be: a reset
        return True

    def _count_connect_failure(self, error, reason: str, state) -> None:
        observers = self.deps.observers
        if state is not None and reason == "connect failed":
            state.accrual.on_failure()
        if isinstance(error, mesh.TunnelError):
            observers.metrics.handshake_failed("outbound", error.reason)
            observers.problems.warning("tls", "outbound TLS handshake refused: %s", error)
        if isinstance(error, HandshakeLimit):
            observers.metrics.limit_exceeded("outbound", self.pod, error.limit.value)
        # Not a tcp_error here: an attempt is not a connection. The client connection is counted
        # once, by _as_opaque, if no attempt succeeds (an HTTP client's early connection that
        # fails is no error of its: its requests go over the pool).

    # --- opaque ---

    async def _as_opaque(self):
        upstream = await self.early_task
        conn = self.conn
        if upstream is None or self.transport.is_closing():
            if upstream is None:
                self.deps.observers.metrics.tcp_error("outbound", self.pod, self.early_failure)
            else:
                upstream.close()
            self._finish(0, 0)
            self.transport.abort()  # TCP has no error page: a reset
            return
        conn.enter(Phase.OPAQUE)
        conn.hold(upstream)
        conn.label(self.deps.observers.metrics, self.peer, self.early_hop.tls)
        self.early_state = Early.GONE
        if self.on_node is not None:
            self.on_node.revoke = upstream.abort
        if self.early.lost:  # it spoke and hung up before the splice: deliver, then close
            self.transport.write(bytes(self.early.buffer))
            self._finish(len(self.buffer), len(self.early.buffer))
            self.transport.close()
            return
        kernel = None
        if not self.early_hop.tls:
            upstream_cookie = self.on_node.pod.cookie if self.on_node is not None else self.pod.cookie
            kernel = self.deps.splicer.request(self.transport, self.pod.cookie, upstream, upstream_cookie)
        forward(self.transport, bytes(self.buffer), self.client_eof, self.early, idle_s=self.config.idle_timeout_s,
                on_close=self._finish, kernel=kernel)
        self.buffer = self.early = None

    def _finish(self, read: int, written: int, spliced: int = 0) -> None:
        """The client connection is done: settle it (once) and what it holds."""
        if self.on_node is not None:
            self.on_node.close(read, written, spliced)  # its inbound side saw the same bytes
            self.on_node = None
        if self.endpoint is not None:
            state = self.endpoint[0]
            if state is not None:
                state.connections -= 1
            self.endpoint = None
        self.conn.close(read, written, spliced)

    # --- HTTP ---

    async def _as_http(self, protocol: Protocol):
        # An early upstream still being set up must not hold the first request back (a burst
        # of new connections would queue behind each other's handshakes): it joins the pool
        # when it is ready, and requests use whatever the pool has meanwhile.
        h2 = protocol is Protocol.H2
        if self.early_task is not None:
            if self.early_task.done():
                self._adopt(self.early_task, h2)
            else:
                self.early_task.add_done_callback(lambda task: self._adopt(task, h2))
        if self.transport.is_closing():
            self.conn.close()
            return
        stats = self.conn.label(self.deps.observers.metrics, self.peer, False)
        target = HttpTarget(self.deps, self.pod, self.decision, self.config, self.peer, Hint.H2 if h2 else Hint.HTTP1)
        server = (Http2Server if h2 else Http1Server)(target, bytes(self.buffer), stats, on_close=self.conn.close)
        self.buffer = None
        self.transport.set_protocol(server)
        server.connection_made(self.transport)
        self.conn.drains_with(server.drain)

    def _adopt(self, task: asyncio.Task, h2: bool) -> None:
        """The early upstream becomes a pooled connection, if it is a clean one (an HTTP/2
        server may have sent its SETTINGS already: those are the pooled connection's)."""
        upstream = None if task.cancelled() or task.exception() else task.result()
        if self.endpoint is not None and self.endpoint[0] is not None:
            self.endpoint[0].connections -= 1  # it is no longer this client connection's
        endpoint, self.endpoint, early, hop = self.endpoint, None, self.early, self.early_hop
        self.early_state, self.early = Early.GONE, None
        if upstream is None:
            return
        pools = self.deps.pools
        if self.on_node is not None:
            self.on_node.close()
            self.on_node = None
            upstream.close()  # requests go over the mesh's pooled connections, with their metrics
        elif early.eof or early.lost or (early.buffer and not h2):
            upstream.close()  # it spoke before any request: not a clean HTTP/1 connection
        elif hop is not None and hop.tls:
            # A mesh tunnel opened before the client spoke: its far end heard nothing within its
            # eager wait and relays it as opaque (server-speaks-first), so it is no HTTP
            # connection there: no per-request policy or metrics, and no clean end when that
            # agent drains (it held a drain to its deadline). Requests go over the pool's tunnels.
            upstream.close()
        elif h2:
            pools.http2.adopt(self.pod.cookie, endpoint[1], upstream, bytes(early.buffer),
                              report=functools.partial(self.deps.observers.metrics.http2_flood, "outbound", self.pod))
        else:
            pools.http1.adopt(self.pod.cookie, endpoint[1], upstream)

    def connection_lost(self, exc):
        if self.conn is None or self.conn.phase is not Phase.DETECTING:
            return  # the stage serving the decision owns the rest (or nothing was admitted)
        for timer in (self._eager_timer, self._detect_timer):
            if timer is not None:
                timer.cancel()
        if self.early_task is not None:
            self.early_task.cancel()
            if self.early is not None and self.early.transport is not None:
                self.early.transport.close()
        self._finish(len(self.buffer), 0)
