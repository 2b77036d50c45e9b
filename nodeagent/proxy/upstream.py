"""Connections from a pod to an endpoint: opened inside the pod's network
namespace (the destination sees the pod's own address) and registered with the
data path before they connect, so that it never captures them (by socket cookie:
a mark would not do, any process in a pod can set one). HTTP/1 connections are
pooled per (pod, endpoint).
"""

import asyncio
import enum
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httptools

from nodeagent import netns
from nodeagent.identity import naming
from nodeagent.ports import MESH_PORT
from nodeagent.proxy.limits import Limit

POOL_IDLE_S = 90.0
POOL_MAX_IDLE = 64  # idle connections kept per (pod, endpoint)
POOL_MAX_IDLE_PER_POD = 256  # idle connections kept per pod, all its endpoints together
SWEEP_S = 10.0  # idle connections are closed POOL_IDLE_S to POOL_IDLE_S + SWEEP_S after their last use
PENDING_MAX = 64 * 1024  # response bytes read before the client's side is attached; then the endpoint waits
# The data path's registration of this process's sockets (Datapath.register_proxy_socket),
# set once by the process's Proxy; None: nothing to tell.
_register: Callable[[socket.socket], None] | None = None


def register_sockets_with(register: Callable[[socket.socket], None] | None) -> None:
    global _register
    _register = register


@dataclass(frozen=True)
class Tunnel:
    """How to reach a meshed destination pod: its mesh port, with mutual TLS."""

    pod_ip: str
    port: int
    hint: int
    context: object  # the source workload's client ssl.SSLContext
    expected: naming.Identity
    sessions: object = None  # mesh.SessionCache: resumable sessions per (context, server)
    quota: object = None  # the source pod's limits.Quota: its handshakes in progress are bounded
    on_handshake: object = None  # called with `resumed` once a handshake is done (tls_handshakes_total)


class HandshakeLimit(ConnectionRefusedError):
    """The source pod has its limit of mutual-TLS handshakes in progress, or is over its rate of
    new ones for longer than MAX_WAIT_S (`limit` says which). The pod's own limit, whatever the
    endpoint: another attempt would meet it again (attempts.py does not retry it)."""

    retryable = False

    def __init__(self, message: str, limit: Limit = Limit.HANDSHAKES):
        super().__init__(message)
        self.limit = limit


async def open_socket(netns_path: str | None, address: tuple[str, int], timeout_s: float) -> socket.socket:
    """A connected socket from inside `netns_path` (None: this process's own namespace)."""
    if netns_path is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    else:
        with netns.entered(netns_path):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if netns_path is not None and _register is not None:
            _register(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, address), timeout_s)
    except BaseException:
        sock.close()
        raise
    return sock


async def _wait_turn(quota, loop) -> None:
    """The source pod's turn for a new handshake (its `handshake-rate`, pacing.py): at once, after
    a wait, or HandshakeLimit if it is over its rate for too long."""
    turn = quota.handshake_turn("outbound", loop.time())
    if turn is None:
        raise HandshakeLimit("the pod is over its rate of new mutual-TLS handshakes", Limit.HANDSHAKE_RATE)
    if turn > 0:
        await asyncio.sleep(turn)


async def _handshake_slot(quota, loop, timeout_s: float) -> None:
    """One of the source pod's mutual-TLS handshakes in progress (its `handshakes` limit): at once,
    or in turn when one ends (a burst of new pooled connections waits rather than failing), within
    `timeout_s`; HandshakeLimit if too many wait already or none came in time."""
    granted = loop.create_future()

    def grant() -> bool:
        if granted.done():  # its waiter gave up: the slot goes to the next
            return False
        granted.set_result(None)
        return True

    taken = quota.take_or_queue(Limit.HANDSHAKES, grant)
    if taken:
        return
    if taken is None:
        raise HandshakeLimit("the pod's limit of mutual-TLS handshakes in progress is reached, and as many wait")
    # Not asyncio.wait_for: on 3.11 it swallows a cancellation that meets a grant.
    timer = loop.call_later(timeout_s, lambda: granted.done() or granted.set_exception(
        HandshakeLimit(f"no mutual-TLS handshake of the pod ended within {timeout_s:g} s to make room")))
    try:
        await granted
    except BaseException:
        quota.withdraw(Limit.HANDSHAKES, grant)
        if granted.done() and not granted.cancelled() and granted.exception() is None:
            quota.give(Limit.HANDSHAKES)  # granted just as it was cancelled: pass it on
        raise
    finally:
        timer.cancel()


async def connect(netns_path: str | None, address: tuple[str, int], timeout_s: float, factory,
                  tunnel: Tunnel | None = None) -> tuple[asyncio.Transport, asyncio.Protocol]:
    """A connection from the pod to `address`: plain, or through a mutual-TLS
    tunnel to the destination pod's mesh port when `tunnel` says so."""
    from nodeagent.proxy import contention, mesh

    loop = asyncio.get_running_loop()
    if tunnel is None:
        sock = await open_socket(netns_path, address, timeout_s)
        return await loop.create_connection(factory, sock=sock)
    if tunnel.quota is not None:
        await _wait_turn(tunnel.quota, loop)
        await _handshake_slot(tunnel.quota, loop, timeout_s)
    try:
        sock = await open_socket(netns_path, (tunnel.pod_ip, MESH_PORT), timeout_s)
        transport, protocol = await loop.create_connection(factory, sock=sock)
        tls = await mesh.client_handshake(transport, protocol, tunnel.context, tunnel.expected, tunnel.port,
                                          tunnel.hint, timeout_s, tunnel.sessions, tunnel.pod_ip, tunnel.on_handshake,
                                          contention.charger(tunnel.quota, "outbound"))
    finally:
        if tunnel.quota is not None:
            tunnel.quota.give(Limit.HANDSHAKES)
    protocol.transport = tls  # start_tls hands the protocol a new transport without calling connection_made
    return tls, protocol


class Awaited:
    """A response's head and end as futures, for a coroutine that awaits them (http1's general
    path); the fast path listens to the reader's callbacks itself."""

    __slots__ = ("head", "done")

    def __init__(self, loop):
        self.head: asyncio.Future = loop.create_future()
        self.done: asyncio.Future = loop.create_future()

    def response_head(self, conn, status: int) -> None:
        if not self.head.done():  # cancelled: the task is gone (and the connection with it)
            self.head.set_result(status)

    def response_done(self, conn) -> None:
        if not self.done.done():
            self.done.set_result(True)

    def response_failed(self, conn, exc: BaseException) -> None:
        for future in (self.head, self.done):
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: a waiter still gets it, nothing is logged


class Response(enum.Enum):
    """Where one upstream connection is in the response to the request last written on it."""

    IDLE = "idle"  # not yet used, or in a pool: no request is out, so any byte from the endpoint is unsolicited
    HEAD = "awaiting the head"
    BODY = "relaying the body"
    DONE = "complete"


class ResponseReader(asyncio.Protocol):
    """One upstream HTTP/1 connection: parses responses (framing only) and passes their raw
    bytes to a sink once the head has been seen. What happens to a response is told to the
    request's listener (`expect`): `response_head(conn, status)` at the final head,
    `response_done(conn)` at its end, `response_failed(conn, exc)` if the connection fails
    before that. The sink's owner pauses this connection's reading while the client is slow
    (backpressure)."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.idle_since = time.monotonic()
        self.writable = asyncio.Event()  # the request's body may be written (our write buffer is low)
        self.writable.set()
        self.loop = asyncio.get_running_loop()  # once: each lookup costs a getpid() in Python 3.11
        self.sent = self.received = 0  # bytes, for a hop that counts them (on_node.py)
        self.on_lost: Callable[["ResponseReader"], None] | None = None
        self.parser = None
        self.at_boundary = False  # the parser ended the last response: it can parse the next one
        self.listener = None
        self.pending = bytearray()  # raw bytes read before a sink was attached
        self.reading = True  # False while paused (`pause`): a slow client, or PENDING_MAX unsent
        self.expect(None, None)
        self.state = Response.IDLE  # until a request is written

    def expect(self, method: str | None, listener) -> None:
        """A request was written: parse the response to it, telling `listener` (see the class)."""
        self.method = method
        self.listener = listener
        self.state = Response.HEAD
        if not self.at_boundary:  # after a HEAD (whose body the parser awaits) or an interim response
            self.parser = httptools.HttpResponseParser(self)
        self.at_boundary = False
        self.pending.clear()
        self.sink: asyncio.Transport | None = None
        self.counter = None  # the client connection's stats: bytes written to the client
        self.status = 0
        self.keep_alive = True
        self.eof_delimited = False

    def connection_made(self, transport):
        self.transport = transport

    def send(self, data: bytes) -> None:
        """A request's bytes toward the endpoint."""
        self.sent += len(data)
        self.transport.write(data)

    def data_received(self, data):
        self.received += len(data)
        if self.state is Response.IDLE:  # no response of ours (a stray head would be taken for the next one's)
            self.transport.abort()
            return
        if self.sink is not None:
            self.sink.write(data)
            if self.counter is not None:
                self.counter.written += len(data)
        else:
            self.pending += data
            if len(self.pending) > PENDING_MAX:
                self.pause()  # attach() resumes
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # 101: the bytes after the head belong to the upgraded protocol
        except httptools.HttpParserError as e:
            self._fail(ConnectionError(f"malformed response: {e}"))

    # httptools callbacks
    def on_message_begin(self):
        self.at_boundary = False
        # A message after the response we asked for: the connection is not reused (a CONNECT's
        # 2xx is followed by the tunnel's bytes, whatever they look like).
        if (self.state is Response.DONE or self.state is Response.IDLE) and self.method != "CONNECT":
            self.transport.abort()

    def on_headers_complete(self):
        self.status = self.parser.get_status_code()
        if 100 <= self.status < 200 and self.status != 101:
            return  # informational: the final head follows
        self.keep_alive = self.parser.should_keep_alive()
        if self.state is Response.HEAD:
            self.state = Response.BODY
            self.listener.response_head(self, self.status)
        if self.method == "HEAD" or self.status in (101, 204, 304) or (self.method == "CONNECT" and self.status < 300):
            self._complete()  # no body (a CONNECT's 2xx: what follows is the tunnel's)

    def on_message_complete(self):
        if 100 <= self.status < 200 and self.status != 101:
            # Pass the informational response on and wait for the final one: the same parser
            # goes on (a new one would not see the rest of this read, the final head's start).
            return
        self.at_boundary = self.status != 101
        self._complete()

    def _complete(self):
        if self.state is Response.BODY:
            self.state = Response.DONE
            self.listener.response_done(self)

    def eof_received(self):
        if self.state is Response.BODY:
            self.eof_delimited = True  # a body delimited by the connection's end
            self.keep_alive = False
            self._complete()
        return False

    def _fail(self, exc: Exception):
        if self.state is Response.HEAD or self.state is Response.BODY:
            self.state = Response.DONE
            self.listener.response_failed(self, exc)
        if self.transport:
            self.transport.abort()

    def forsake(self, abort: bool = True) -> None:
        """The request's owner gives the connection up mid-response (a timeout, a retry, its client
        gone): nothing more is told, and the connection ends (aborted: its state is unknown)."""
        self.state = Response.DONE
        if abort:
            self.transport.abort()
        else:
            self.transport.close()

    def connection_lost(self, exc):
        self.writable.set()  # a writer waiting for room learns of the loss from the write
        self._fail(exc or ConnectionError("upstream closed the connection"))
        if self.on_lost is not None:
            self.on_lost(self)

    def pause_writing(self):
        self.writable.clear()

    def resume_writing(self):
        self.writable.set()

    def attach(self, sink: asyncio.Transport, counter=None, closing: bool = False) -> None:
        """Send what was read so far, and everything after, to the client. `closing`: the
        client's connection ends after this response, so its head must say so (the
        upstream's own connection stays open for the pool)."""
        pending = self.pending
        if closing:
            head_end = pending.find(b"\r\n\r\n")
            if head_end >= 0 and b"\r\nconnection: close" not in bytes(pending[:head_end]).lower():
                pending[head_end:head_end] = b"\r\nconnection: close"
        if pending:
            sink.write(bytes(pending))  # a copy: a transport may keep what it could not send yet
            if counter is not None:
                counter.written += len(pending)
            pending.clear()
        self.sink, self.counter = sink, counter
        if not self.reading:
            self.resume()

    def pause(self) -> None:
        """Stop reading the endpoint (backpressure) until `resume`."""
        if self.reading:
            self.reading = False
            self.transport.pause_reading()

    def resume(self) -> None:
        if not self.reading and not self.transport.is_closing():
            self.reading = True
            self.transport.resume_reading()

    def reusable(self) -> bool:
        return self.keep_alive and self.transport is not None and not self.transport.is_closing()


class Pool:
    """Idle HTTP/1 connections per (pod netns cookie, endpoint address). A key whose list
    empties is dropped, so the pool's size is its idle connections, never its history.
    Bounded per key (POOL_MAX_IDLE), per pod over all its endpoints (POOL_MAX_IDLE_PER_POD: a
    one-hop connection holds a share of its destination pod's) and in time (POOL_IDLE_S, swept
    every SWEEP_S while anything is idle, traffic or not). Draining, nothing is kept."""

    def __init__(self):
        self._idle: dict[tuple, list[ResponseReader]] = {}
        self._per_pod: dict[int, int] = {}  # cookie -> its idle connections, all endpoints
        self._sweeper: asyncio.TimerHandle | None = None
        self.draining = False

    def _count(self, cookie: int, delta: int) -> None:
        count = self._per_pod.get(cookie, 0) + delta
        if count > 0:
            self._per_pod[cookie] = count
        else:
            self._per_pod.pop(cookie, None)

    def take(self, cookie: int, address: tuple[str, int]) -> ResponseReader | None:
        """An idle connection to `address` still fit for a request, or None."""
        idle = self._idle.get((cookie, address))
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            self._count(cookie, -1)
            if not idle:
                del self._idle[(cookie, address)]
            if conn.reusable() and now - conn.idle_since < POOL_IDLE_S:
                return conn
            conn.transport.close()
        return None

    async def acquire(self, netns_path: str, cookie: int, address: tuple[str, int], timeout_s: float,
                      opener: Callable[[], Awaitable[ResponseReader]] | None = None) -> tuple[ResponseReader, bool]:
        """(a connection, whether it was reused). `opener` opens a new one, through the hop it
        plans (called only then: a reused connection plans no hop); by default, a plain
        connection from `netns_path`."""
        conn = self.take(cookie, address)
        if conn is not None:
            return conn, True
        if opener is not None:
            return await opener(), False
        _, conn = await connect(netns_path, address, timeout_s, ResponseReader)
        return conn, False

    def release(self, cookie: int, address: tuple[str, int], conn: ResponseReader) -> None:
        key = (cookie, address)
        if (conn.reusable() and not self.draining and len(self._idle.get(key, ())) < POOL_MAX_IDLE
                and self._per_pod.get(cookie, 0) < POOL_MAX_IDLE_PER_POD):
            conn.sink = conn.counter = conn.listener = None
            conn.state, conn.idle_since = Response.IDLE, time.monotonic()
            if not conn.reading:
                conn.resume()  # paused for a slow client: idle, it must see a close
            self._idle.setdefault(key, []).append(conn)
            self._count(cookie, 1)
            if self._sweeper is None:
                self._sweeper = conn.loop.call_later(SWEEP_S, self._sweep)
        elif conn.transport:
            conn.transport.close()

    def _sweep(self) -> None:
        """Close what sat idle POOL_IDLE_S (or was lost); again in SWEEP_S while anything is idle."""
        self._sweeper = None
        oldest = time.monotonic() - POOL_IDLE_S
        for key in list(self._idle):
            kept = []
            for conn in self._idle[key]:
                if conn.reusable() and conn.idle_since > oldest:
                    kept.append(conn)
                else:
                    conn.transport.close()
                    self._count(key[0], -1)
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]
        if self._idle:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_S, self._sweep)

    def _close_where(self, doomed: Callable[[tuple], bool]) -> None:
        for key in [k for k in self._idle if doomed(k)]:
            idle = self._idle.pop(key)
            self._count(key[0], -len(idle))
            for conn in idle:
                conn.transport.close()

    def adopt(self, cookie: int, address: tuple[str, int], sock_transport: asyncio.Transport) -> None:
        """Give the pool a fresh connection opened for another purpose (the eager connect)."""
        conn = ResponseReader()
        sock_transport.set_protocol(conn)
        conn.connection_made(sock_transport)
        conn.reading = sock_transport.is_reading()
        self.release(cookie, address, conn)

    def forget_pod(self, cookie: int) -> None:
        self._close_where(lambda key: key[0] == cookie)

    def forget_addresses(self, keep: set[tuple[str, int]]) -> None:
        """Close idle connections to addresses that are no longer endpoints of anything."""
        self._close_where(lambda key: key[1] not in keep)

    def drain(self) -> None:
        """The proxy is stopping: idle connections are closed now, busy ones once their response is
        done (released, not kept): none holds a drain open (a one-hop one is its destination's
        inbound connection, which has no drain of its own)."""
        self.draining = True
        self._close_where(lambda key: True)

    def size(self) -> int:
        return sum(len(idle) for idle in self._idle.values())
