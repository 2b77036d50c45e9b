"""Inbound: connections to an enrolled pod, in two ways.

- Plaintext, steered by sk_lookup onto the proxy's inbound listener in the
  pod (clients outside the mesh): getsockname() is the original destination.
- Mutual TLS on the pod's mesh port (other proxies): the client's identity is
  proven, and the tunnel header names the destination port.

Either way the pod's policy decides (policy/authz.py); a refused HTTP client
(HTTP/1 or HTTP/2) gets a 403, anything else is closed. An allowed connection reaches the app on
the pod's IP at that port, from inside the pod (the kernel routes it over lo;
sk_lookup leaves it alone): an app listening on 127.0.0.1 only stays out of
reach from outside the pod, as without a mesh. The app connection opens as soon as the
connection is allowed, so a server that speaks first is heard at once.
"""

import asyncio
import functools
import ssl

from nodeagent.policy.authz import Client
from nodeagent.proxy import mesh
from nodeagent.proxy.detect import NEED_MORE, Protocol, detect
from nodeagent.proxy.errors import REASON_HEADER
from nodeagent.proxy.h2peer import H2Peer, goaway
from nodeagent.proxy.relay import READ_AHEAD_MAX, Holding, nodelay, splice_held
from nodeagent.proxy.tls import handshake
from nodeagent.proxy.upstream import open_socket

APP_CONNECT_TIMEOUT_S = 1.0
HANDSHAKE_TIMEOUT_S = 10.0
DENY_DETECT_S = 1.0  # how long a refused client may take to show it speaks HTTP (for a 403)

FORBIDDEN = (b"HTTP/1.1 403 Forbidden\r\nnodeagent-proxy-error: unauthorized\r\ncontent-type: text/plain\r\n"
             b"content-length: 13\r\nconnection: close\r\n\r\nunauthorized\n")


class _Inbound(asyncio.Protocol):
    """What both ways share: buffering until the splice, the policy, the app connection."""

    def __init__(self, proxy, pod):
        self.proxy, self.pod = proxy, pod
        self.buffer = bytearray()
        self.eof = False
        self.transport = None
        self.task = None
        self._more = asyncio.Event()
        self._open = False
        self.kernel = None  # a KernelSplice carrying the app's replies

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
            self._closed()

    def _opened(self):
        nodelay(self.transport)
        self._open = True
        self.proxy.open_connections += 1
        self.stats = None  # counted once the client is known (its identity labels the series)

    def _closed(self, relay=None):
        if not self._open:
            return
        self._open = False
        self.proxy.track_inbound(self, False)
        self.proxy.open_connections -= 1
        carried = self.kernel.end() if self.kernel else {}
        if self.stats is not None:
            if relay is not None:
                self.stats.read += relay.bytes_in + carried.get(id(relay), 0)
                self.stats.written += relay.peer.bytes_in + carried.get(id(relay.peer), 0)
                self.stats.spliced += sum(carried.values())
            self.stats.close()

    async def _admit(self, transport, port: int, identity: str | None) -> None:
        peer_ip = transport.get_extra_info("peername")[0]
        self.stats = self.proxy.metrics.connection("inbound", self.pod, identity or "unauthenticated",
                                                   identity is not None)
        self.port, self.client = port, Client(peer_ip, identity)
        decision = self.proxy.authorize(self.pod, port, self.client)
        if not decision.allowed:
            await self._refuse(transport)
            return
        self.admitted = transport
        self.proxy.track_inbound(self, True)
        try:
            sock = await open_socket(self.pod.netns_path, (self.pod.info.ip, port), APP_CONNECT_TIMEOUT_S)
            _, app = await asyncio.get_running_loop().create_connection(Holding, sock=sock)
        except (OSError, asyncio.TimeoutError):
            self.proxy.metrics.tcp_error("inbound", self.pod, "app connect failed")
            self._closed()
            transport.abort()
            return
        if identity is None:  # plaintext both ways: the kernel may carry the app's replies
            self.kernel = self.proxy.kernel_splice(transport, self.pod.cookie, app.transport, self.pod.cookie)
        pair = splice_held(transport, bytes(self.buffer), self.eof, app, on_close=self._closed)
        if not transport.is_reading() and not transport.is_closing():
            transport.resume_reading()  # the relay's flow control takes over
        if self.kernel is not None:
            self.kernel.attach(pair)

    def revoke(self) -> None:
        """The pod's policy no longer admits this client: end the connection."""
        self.admitted.abort()

    async def _refuse(self, transport) -> None:
        """403 for a client that speaks HTTP/1, a close for anything else."""
        try:
            while detect(bytes(self.buffer)) is NEED_MORE and not self.eof:
                self._more.clear()
                await asyncio.wait_for(self._more.wait(), DENY_DETECT_S)
        except asyncio.TimeoutError:
            pass
        found = detect(bytes(self.buffer))
        protocol = None if found is NEED_MORE else found.protocol
        self.stats.read += len(self.buffer)
        self._closed()
        if protocol is Protocol.H2:
            refusal = H2Refusal(lambda: self.proxy.metrics.http_error("inbound", self.pod, 403, "unauthorized"),
                                functools.partial(self.proxy.metrics.http2_flood, "inbound", self.pod))
            transport.set_protocol(refusal)
            refusal.connection_made(transport)
            refusal.data_received(bytes(self.buffer))
            return
        if protocol is Protocol.HTTP1:
            transport.write(FORBIDDEN)
            self.stats.written += len(FORBIDDEN)
            self.proxy.metrics.http_error("inbound", self.pod, 403, "unauthorized")
        transport.close()


class H2Refusal(H2Peer):
    """A refused HTTP/2 client hears 403 on each request it sent, then GOAWAY: requests it
    sends later open a new connection, which is authorized afresh."""

    def __init__(self, on_refused, report=None):
        super().__init__(report=report)
        self.on_refused = on_refused
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport):
        super().connection_made(transport)
        self.timer = asyncio.get_running_loop().call_later(DENY_DETECT_S, goaway, self)

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
        self.transport = transport
        self._opened()
        port = transport.get_extra_info("sockname")[1]
        self.task = asyncio.get_running_loop().create_task(self._admit(transport, port, None))


class MeshAccept(_Inbound):
    """Mutual TLS from another proxy, on the pod's mesh port."""

    def connection_made(self, transport):
        self.transport = transport
        self.raw_bytes = bytearray()  # what arrives before the handshake starts: the ClientHello
        self.in_tls = False
        self._opened()
        self.task = asyncio.get_running_loop().create_task(self._serve(transport))

    def data_received(self, data):
        if self.in_tls:
            super().data_received(data)
        else:
            self.raw_bytes += data

    async def _serve(self, raw):
        self.in_tls = True  # from here on the handshake owns the raw bytes, and we get plaintext
        try:
            context = self.proxy.server_context(self.pod)
            tls = await handshake(raw, self, context, True, HANDSHAKE_TIMEOUT_S, initial=bytes(self.raw_bytes))
        except (ssl.SSLError, OSError, asyncio.TimeoutError, ValueError) as e:
            reason = mesh.handshake_failure_reason(e)
            self.proxy.handshake_failed("inbound", reason, raw, f"from {raw.get_extra_info('peername')}: {reason}")
            self._closed()
            raw.abort()
            return
        self.transport = tls
        try:
            while len(self.buffer) < mesh.HEADER.size:
                if self.eof:
                    raise mesh.TunnelError("closed before the tunnel header")
                self._more.clear()
                await asyncio.wait_for(self._more.wait(), HANDSHAKE_TIMEOUT_S)
            port, _hint = mesh.decode_header(bytes(self.buffer))
        except (mesh.TunnelError, asyncio.TimeoutError):
            self.proxy.metrics.tcp_error("inbound", self.pod, "bad tunnel header")
            self._closed()
            tls.abort()
            return
        del self.buffer[:mesh.HEADER.size]
        await self._admit(tls, port, mesh.peer_identity(tls))
