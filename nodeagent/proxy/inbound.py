"""Inbound: connections to an enrolled pod, in two ways.

- Plaintext, steered by sk_lookup onto the proxy's inbound listener in the
  pod (clients outside the mesh): getsockname() is the original destination.
- Mutual TLS on the pod's mesh port (other proxies): the client's identity is
  proven, and the tunnel header names the destination port.

Each connection is admitted against the pod's inbound share (proxy/limits.py); a mesh
handshake holds one of the pod's `inbound-handshakes` while it runs (and while it waits for its
turn under the pod's `inbound-handshake-rate`, pacing.py): its clients cannot take the pod's own
`handshakes` as client. A mesh client sends its ClientHello at once, so one that has not sent a
whole ClientHello (client_hello.py) within `client_hello_s` is dropped (an idle or stalled
connection to the mesh port holds a handshake); then the
handshake and the header have a deadline. The proxy's own ports are never a destination (a connection to one
would loop back into the proxy). Then the pod's policy decides (policy/authz.py); a refused
HTTP client (HTTP/1 or HTTP/2) gets a 403, anything else is closed. An allowed connection's
protocol comes from the tunnel header's hint or, for a plaintext client or an early tunnel,
from detection (a client silent for EAGER_S may be waiting for a server that speaks first).
HTTP/1 and HTTP/2 are served per request (app_target.AppTarget: inbound request metrics, a
drain ends them between requests); anything else is forwarded opaquely (forward.py). Either
way the app is reached on the pod's IP at that port, from inside the pod (the kernel routes it
over lo; sk_lookup leaves it alone): an app listening on 127.0.0.1 only stays out of reach from
outside the pod, as without a mesh.
"""

import asyncio
import functools
import ssl
from collections.abc import Awaitable

from nodeagent.policy.authz import Client
from nodeagent.ports import PROXY_PORTS
from nodeagent.proxy import client_hello, contention, mesh
from nodeagent.proxy.client_hello import Hello
from nodeagent.proxy.connection import Direction, Phase, Refused
from nodeagent.proxy.limits import Limit
from nodeagent.proxy.source_share import PER_CLIENT_LIMIT
from nodeagent.proxy.app_target import AppTarget
from nodeagent.proxy.detect import MAX_PREFIX, NEED_MORE, Protocol, detect
from nodeagent.proxy.errors import REASON_HEADER
from nodeagent.proxy.forward import forward
from nodeagent.proxy.h2peer import H2Peer, goaway
from nodeagent.proxy.hop import Hint
from nodeagent.proxy.http1 import KEEPALIVE_IDLE_S, Http1Server
from nodeagent.proxy.http2 import Http2Server
from nodeagent.proxy.refusal import refused_at_accept
from nodeagent.proxy.relay import READ_AHEAD_MAX, Holding
from nodeagent.proxy.tls import handshake
from nodeagent.proxy.upstream import POOL_IDLE_S, open_socket

MESH_KEEPALIVE_IDLE_S = POOL_IDLE_S + 30  # idle mesh tunnels are the source pool's to close
EAGER_S = 0.003  # a plaintext client that has not spoken by then may wait for its server to speak first
# What the source proxy detected, as its tunnel header says; UNDETECTED (an early connection)
# and any hint this version does not know are detected here.
HINTED = {Hint.OPAQUE: Protocol.OPAQUE, Hint.HTTP1: Protocol.HTTP1, Hint.H2: Protocol.H2}

FORBIDDEN = (b"HTTP/1.1 403 Forbidden\r\nnodeagent-proxy-error: unauthorized\r\ncontent-type: text/plain\r\n"
             b"content-length: 13\r\nconnection: close\r\n\r\nunauthorized\n")


class _Inbound(asyncio.Protocol):
    """What both ways share: buffering until the splice, the policy, the app connection."""

    def __init__(self, deps, pod):
        self.deps, self.pod = deps, pod
        self.buffer = bytearray()
        self.eof = False
        self.transport = None
        self.task = None
        self.conn = None  # connection.Connection, once admitted
        self._more = asyncio.Event()

    def data_received(self, data):
        self.buffer += data  # only until the splice replaces this protocol
        self._more.set()
        if len(self.buffer) >= READ_AHEAD_MAX:
            self.transport.pause_reading()

    def eof_received(self):
        self.eof = True
        self._more.set()
        return True

    def connection_lost(self, exc):
        self._more.set()
        if self.task and not self.task.done():
            self.task.cancel()
            if self.conn is not None:
                self.conn.close(len(self.buffer), 0)

    def _guarded(self, stage) -> Awaitable:
        return self.deps.observers.guarded(stage, "inbound", self.pod, self._end_after_a_bug)

    def _end_after_a_bug(self) -> None:
        self.transport.abort()
        self.conn.close()

    def _admit_connection(self, transport, phase: Phase) -> bool:
        self.transport = transport
        self.conn = self.deps.connections.admit(self.pod, Direction.INBOUND, phase)
        if self.conn is None:
            transport.abort()  # refused by a limit (counted and logged by the table)
            return False
        self.conn.hold(transport)
        return True

    def _proxy_port(self, transport, port: int) -> bool:
        """A connection to one of the proxy's own ports would reach the proxy again: refused."""
        if port not in PROXY_PORTS:
            return False
        observers = self.deps.observers
        observers.metrics.tcp_error("inbound", self.pod, "destination is a proxy port")
        observers.problems.warning("proxy-port", "pod %s: refused a connection to the proxy's port %d from %s",
                                   self.pod.key, port, transport.get_extra_info("peername"))
        self.conn.close(len(self.buffer), 0)
        transport.abort()
        return True

    async def _admit(self, transport, port: int, identity: str | None, protocol: Protocol | None) -> None:
        """Authorize, then serve: HTTP terminated here (`protocol` from the tunnel header's hint, or
        detected on a plaintext connection when None), anything else forwarded as it comes."""
        deps, conn = self.deps, self.conn
        peer_ip = transport.get_extra_info("peername")[0]
        peer = identity or "unauthenticated"
        conn.label(deps.observers.metrics, peer, identity is not None)
        client = Client(peer_ip, identity)
        decision = deps.authorizer.authorize(self.pod, port, client)
        if not decision.allowed:
            conn.enter(Phase.REFUSING)
            await self._refuse(transport)
            return
        conn.peer, conn.port, conn.revoke = client, port, transport.abort  # a policy change re-asks
        if protocol is None:
            protocol = await self._detect()
        if protocol in (Protocol.HTTP1, Protocol.H2):
            self._serve_http(transport, port, peer, identity is not None, protocol is Protocol.H2)
            return
        try:
            sock = await open_socket(self.pod.netns_path, (self.pod.info.ip, port), deps.timeouts.app_connect_s)
            _, app = await asyncio.get_running_loop().create_connection(Holding, sock=sock)
        except (OSError, asyncio.TimeoutError):
            deps.observers.metrics.tcp_error("inbound", self.pod, "app connect failed")
            conn.close(len(self.buffer), 0)
            transport.abort()
            return
        conn.enter(Phase.OPAQUE)
        conn.hold(app.transport)
        kernel = None
        if identity is None:  # plaintext both ways: the kernel may carry the app's replies
            kernel = deps.splicer.request(transport, self.pod.cookie, app.transport, self.pod.cookie)
        forward(transport, bytes(self.buffer), self.eof, app, idle_s=deps.timeouts.inbound_idle_s, on_close=conn.close, kernel=kernel)
        self.buffer = None

    async def _detect(self) -> Protocol:
        """The client's protocol, from its first bytes (a plaintext client, or a tunnel its
        source opened before the client spoke). One that says nothing within
        EAGER_S may be waiting for a server that speaks first: opaque, and its app is connected at
        once; a partial prefix waits for the detect timeout, then is opaque too."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deps.timeouts.detect_s
        wait_s = EAGER_S
        while True:
            found = detect(bytes(self.buffer)) if self.buffer else NEED_MORE
            if found is not NEED_MORE:
                return found.protocol if found else Protocol.OPAQUE
            if self.eof or len(self.buffer) >= MAX_PREFIX:
                return Protocol.OPAQUE
            self._more.clear()
            try:
                await asyncio.wait_for(self._more.wait(), min(wait_s, max(deadline - loop.time(), 0)))
            except asyncio.TimeoutError:
                return Protocol.OPAQUE
            wait_s = deadline - loop.time()

    def _serve_http(self, transport, port: int, peer: str, tls: bool, h2: bool) -> None:
        """HTTP/1 or HTTP/2 served here, each request to the pod's app (app_target.AppTarget):
        counted as inbound requests, and a drain can end the connection between requests."""
        conn = self.conn
        conn.enter(Phase.HTTP2 if h2 else Phase.HTTP1)
        target = AppTarget(self.deps, self.pod, port, peer, tls, conn.peer.ip)
        initial, self.buffer = bytes(self.buffer), None
        if h2:  # an idle HTTP/2 connection ends with GOAWAY: its client knows what was not served
            server = Http2Server(target, initial, conn.stats, on_close=conn.close)
        else:  # a source proxy's pool keeps a tunnel up to POOL_IDLE_S: closing one sooner races its next request
            keepalive_s = MESH_KEEPALIVE_IDLE_S if tls else KEEPALIVE_IDLE_S
            server = Http1Server(target, initial, conn.stats, on_close=conn.close, keepalive_idle_s=keepalive_s)
        transport.set_protocol(server)
        server.connection_made(transport)
        conn.drains_with(server.drain)  # a draining agent: Connection: close, or GOAWAY
        if self.eof:
            server.eof_received()

    async def _refuse(self, transport) -> None:
        """403 for a client that speaks HTTP/1, a close for anything else."""
        wait_s = self.deps.timeouts.deny_detect_s
        try:
            while detect(bytes(self.buffer)) is NEED_MORE and not self.eof:
                self._more.clear()
                await asyncio.wait_for(self._more.wait(), wait_s)
        except asyncio.TimeoutError:
            pass
        found = detect(bytes(self.buffer))
        protocol = None if found is NEED_MORE else found.protocol
        metrics = self.deps.observers.metrics
        read = len(self.buffer)
        if protocol is Protocol.H2:
            self.conn.close(read, 0)
            refusal = H2Refusal(lambda: metrics.http_error("inbound", self.pod, 403, "unauthorized"), wait_s,
                                functools.partial(metrics.http2_flood, "inbound", self.pod))
            transport.set_protocol(refusal)
            refusal.connection_made(transport)
            refusal.data_received(bytes(self.buffer))
            return
        written = 0
        if protocol is Protocol.HTTP1:
            transport.write(FORBIDDEN)
            written = len(FORBIDDEN)
            metrics.http_error("inbound", self.pod, 403, "unauthorized")
        self.conn.close(read, written)
        transport.close()


class H2Refusal(H2Peer):
    """A refused HTTP/2 client hears 403 on each request it sent, then GOAWAY: requests it
    sends later open a new connection, which is authorized afresh."""

    def __init__(self, on_refused, wait_s: float = 1.0, report=None):
        super().__init__(report=report)
        self.on_refused, self.wait_s = on_refused, wait_s
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport):
        super().connection_made(transport)
        self.timer = asyncio.get_running_loop().call_later(self.wait_s, goaway, self)

    def on_request(self, stream_id: int, headers: list, ended: bool) -> None:
        if self.closed:
            return
        self.on_refused()
        body = b"unauthorized\n"
        self.answer(stream_id, [(b":status", b"403"), (REASON_HEADER.encode(), b"unauthorized"),
                                (b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))], body)
        goaway(self)

    def connection_lost(self, exc):
        if self.timer is not None:
            self.timer.cancel()
        super().connection_lost(exc)


class InboundAccept(_Inbound):
    """Plaintext, steered here by sk_lookup."""

    def connection_made(self, transport):
        if not self._admit_connection(transport, Phase.AUTHORIZING):
            return
        port = transport.get_extra_info("sockname")[1]
        if self._proxy_port(transport, port):
            return
        self.task = asyncio.get_running_loop().create_task(self._guarded(self._admit(transport, port, None, None)))


class MeshAccept(_Inbound):
    """Mutual TLS from another proxy, on the pod's mesh port."""

    def connection_made(self, transport):
        self.raw_bytes = bytearray()  # what arrives before the handshake starts: the ClientHello
        self.in_tls = False
        self.source_hold = None
        over = self.pod.quota.refusing("inbound", asyncio.get_running_loop().time())
        if over is not None:  # over its inbound-handshake-rate: no ClientHello waited for
            refused_at_accept(self.deps.observers, self.pod, "inbound", over, transport)
            return
        if not self._admit_connection(transport, Phase.HANDSHAKING):
            return
        # One client address holds at most a share of the pod's handshakes (source_share.py).
        source = (transport.get_extra_info("peername") or ("?",))[0]
        self.source_hold = self.pod.handshakes_by_source.take(source, self.pod.quota.limits[Limit.INBOUND_HANDSHAKES])
        if self.source_hold is None:
            self.deps.connections.refused(self.conn, Refused(PER_CLIENT_LIMIT))
            self.conn.close(0, 0)
            transport.abort()
            return
        self.task = asyncio.get_running_loop().create_task(self._guarded(self._serve(transport)))

    def connection_lost(self, exc):
        super().connection_lost(exc)
        if self.source_hold is not None:  # a task cancelled before it began never ran its `finally`
            self.source_hold.release()

    def data_received(self, data):
        if self.in_tls:
            super().data_received(data)
        elif len(self.raw_bytes) < READ_AHEAD_MAX:
            self.raw_bytes += data
            self._more.set()
        else:
            self.transport.pause_reading()  # the handshake resumes it

    async def _serve(self, raw):
        try:
            tunnel = await self._handshake(raw)
        finally:
            self.source_hold.release()  # the handshake is over, whichever way: the address's share back
        if tunnel is None:
            return
        tls, port, hint = tunnel
        del self.buffer[:mesh.HEADER.size]
        if self._proxy_port(tls, port):
            return
        await self._admit(tls, port, mesh.peer_identity(tls), HINTED.get(hint))

    async def _handshake(self, raw):
        """The ClientHello, the pod's turn, the handshake and the tunnel header: (the tunnel,
        its port, its hint), or None (refused, closed and counted)."""
        deps = self.deps
        if not await self._hello(raw):
            return None
        # Gone already ("a byte, then close"): it takes no turn of the pod's rate (counted below as
        # a failed handshake, as before).
        if not (self.eof or raw.is_closing()) and not await self._turn(raw):
            return None
        self.in_tls = True  # from here on the handshake owns the raw bytes, and we get plaintext
        try:
            if self.eof or raw.is_closing():  # it closed (before its turn, or while it waited for it)
                raise ConnectionResetError("the peer closed before its TLS handshake began")
            context = deps.server_context(self.pod)
            tls = await handshake(raw, self, context, True, deps.timeouts.handshake_s, initial=bytes(self.raw_bytes),
                                  charge=contention.charger(self.pod.quota, "inbound"))
        except (ssl.SSLError, OSError, asyncio.TimeoutError, ValueError) as e:
            reason = mesh.handshake_failure_reason(e)
            deps.observers.metrics.handshake_failed("inbound", reason)
            deps.observers.problems.warning("tls", "inbound TLS handshake refused from %s: %s",
                                            raw.get_extra_info("peername"), reason)
            self.conn.close(len(self.raw_bytes), 0)
            raw.abort()
            return None
        deps.observers.metrics.handshake_done("inbound", tls.get_extra_info("ssl_object").session_reused)
        self.raw_bytes = None
        self.transport = tls
        try:
            deadline = asyncio.get_running_loop().time() + deps.timeouts.handshake_s
            while len(self.buffer) < mesh.HEADER.size:
                if self.eof:
                    raise mesh.TunnelError("closed before the tunnel header")
                self._more.clear()
                await asyncio.wait_for(self._more.wait(), max(deadline - asyncio.get_running_loop().time(), 0))
            port, hint = mesh.decode_header(bytes(self.buffer))
            self.conn.enter(Phase.AUTHORIZING)  # gives the handshake back to the pod's share
        except (mesh.TunnelError, asyncio.TimeoutError):
            deps.observers.metrics.tcp_error("inbound", self.pod, "bad tunnel header")
            self.conn.close(len(self.buffer), 0)
            tls.abort()
            return None
        return tls, port, hint

    async def _hello(self, raw) -> bool:
        """The whole ClientHello, within `client_hello_s`: a client silent or stalled halfway is
        dropped before it takes a turn, and gives back the pod's handshake it holds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deps.timeouts.client_hello_s
        try:
            while client_hello.received(bytes(self.raw_bytes)) is Hello.PARTIAL and not self.eof:
                self._more.clear()
                await asyncio.wait_for(self._more.wait(), max(deadline - loop.time(), 0))
        except asyncio.TimeoutError:
            self.deps.observers.metrics.handshake_failed("inbound", "no ClientHello")
            self.deps.observers.problems.warning("tls-hello", "pod %s: mesh connection from %s dropped: no whole "
                                                 "ClientHello in %.1f s (%d bytes of one)", self.pod.key,
                                                 raw.get_extra_info("peername"), self.deps.timeouts.client_hello_s,
                                                 len(self.raw_bytes))
            self.conn.close(len(self.raw_bytes), 0)  # a part of a ClientHello was read
            raw.abort()
            return False
        return True

    async def _turn(self, raw) -> bool:
        """The pod's turn for a new handshake as server (its `inbound-handshake-rate`, pacing.py):
        the client waits for it, holding one of the pod's `inbound-handshakes`; refused if it is too far off."""
        loop = asyncio.get_running_loop()
        turn = self.pod.quota.handshake_turn("inbound", loop.time())
        if turn is None:
            self.deps.connections.refused(self.conn, Refused(Limit.INBOUND_HANDSHAKE_RATE.value))
            self.conn.close(len(self.raw_bytes), 0)
            raw.abort()
            return False
        if turn > 0:
            await asyncio.sleep(turn)
        if raw.is_closing():  # the client gave up meanwhile
            self.conn.close(len(self.raw_bytes), 0)
            return False
        return True
