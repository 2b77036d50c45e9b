"""HTTP/1.x between a pod and its destination, one request at a time.

Requests are parsed (httptools, in C) and re-sent to an endpoint chosen per
request; responses pass through as raw bytes once their head is seen, so a
body is never copied into Python objects beyond the kernel's reads. Retries
follow proxy/retry.py (connect failures always, when the body is still whole;
configured statuses and lost connections only for safe requests), bounded by
the retry limit and the Service's retry budget. Errors the proxy writes carry
a `nodeagent-proxy-error` header with the reason.

Memory is bounded both ways (backpressure):
- request bodies: at most BODY_HIGH_WATER bytes wait in the proxy; past it the
  client is not read until the endpoint has taken them (and the endpoint's
  connection is written only while its own buffer is below the high-water mark);
- responses: while the client's write buffer is above its high-water mark, the
  endpoint's connection is not read;
- pipelined requests: at most MAX_QUEUED_REQUESTS read ahead.
A request timeout (timeout.nodeagent.io/request) bounds the whole exchange:
before the response's head it is a 504; after it, both connections are cut.
"""

import asyncio
import collections
import enum
import time
from dataclasses import dataclass, field

import httptools

from nodeagent.proxy.attempts import Outcome, run_attempts
from nodeagent.proxy.errors import error_response
from nodeagent.proxy.exchange1 import Exchange
from nodeagent.proxy.relay import splice
from nodeagent.proxy.retry import Failure, RequestFacts, Retries, Verdict
from nodeagent.proxy.upstream import Awaited

MAX_HEAD_BYTES = 64 * 1024
HEAD_READ_TIMEOUT_S = 10.0  # slowloris: a request head must arrive within this
KEEPALIVE_IDLE_S = 60.0
DRAIN_IDLE_S = 2.0  # draining: a keep-alive connection idle this long is closed (a client may race it)
MAX_QUEUED_REQUESTS = 64  # pipelined requests read ahead of the one being served
BODY_HIGH_WATER = 256 * 1024  # request body bytes held before the client is paused
BODY_LOW_WATER = 64 * 1024
COALESCE_BYTES = 16 * 1024  # body bytes sent with the head in one write: a TLS record's worth
NOTHING_TRIED: frozenset = frozenset()
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection"})


class Pause(enum.Enum):
    """Why the client is not being read (reading resumes when no reason is left)."""

    PIPELINE = "pipelined requests queued"
    BODY = "request body queued"


@dataclass
class Request:
    method: str = ""
    url: bytearray = field(default_factory=bytearray)
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    version: str = "1.1"
    keep_alive: bool = True
    upgrade: bool = False
    chunked: bool = False
    has_body: bool = False
    expect_continue: bool = False  # `Expect: 100-continue`: the client sends its body after our 100
    continued: bool = False  # that 100 was written
    body: asyncio.Queue | None = None  # with a body: its chunks, then None (bounded by bytes)
    started: float = 0.0
    span: object = None  # this hop's trace span (telemetry.py), when tracing is on
    far_span: object = None  # on the one hop, the destination's span (target.py `sending`)
    verbatim: bool = True  # no connection-level or Expect header: the head may go upstream as the client sent it
    resume: tuple | None = None  # begun on the fast path: (its Retries, addresses tried, a choice made)

    def head(self) -> bytes:
        """The head for the upstream. Connection-level headers are the client's hop's,
        not the upstream's: the pooled upstream connection stays open whatever the client
        asked of its own (an upgrade keeps them: it is the upstream that must switch)."""
        lines = [f"{self.method} ".encode() + bytes(self.url) + f" HTTP/{self.version}\r\n".encode()]
        lines += [name + b": " + value + b"\r\n" for name, value in self.headers
                  if self.upgrade or self.version != "1.1" or name.lower() not in HOP_BY_HOP]
        return b"".join(lines) + b"\r\n"

    def facts(self) -> RequestFacts:
        return RequestFacts(self.method, self.has_body, self.upgrade)


class Http1Server(asyncio.Protocol):
    """The client side of an HTTP/1 connection. `target` decides where each
    request goes (see target.HttpTarget); `initial` are bytes read during
    detection.

    Per request nothing is scheduled: a whole request (no body, no upgrade) with nothing queued
    ahead of it and a pooled connection at hand is served in callbacks (exchange1.py, the fast
    path); any other goes to the connection's one task through a deque (and a future while it
    waits). One timer per connection (`_tick`) enforces both the head deadline and the
    keep-alive idle bound."""

    def __init__(self, target, initial: bytes = b"", stats=None, on_close=None,
                 keepalive_idle_s: float | None = None):
        self.target = target
        self.keepalive_idle_s = KEEPALIVE_IDLE_S if keepalive_idle_s is None else keepalive_idle_s
        self.initial = initial
        self.stats = stats  # the connection's ConnectionStats (bytes from and to the client)
        self.on_close = on_close
        self.parser = httptools.HttpRequestParser(self)
        self.requests: collections.deque[Request | None] = collections.deque()  # None: no more
        self.waiter: asyncio.Future | None = None  # the task waits for the next request
        self.current: Request | None = None
        self.reading_head = True  # between requests, or inside a request's head
        self.head_bytes = 0
        self.head_tail = b""
        self.as_read: bytes | None = None  # the read being parsed, when it is exactly one request head
        self.head_since = 0.0  # loop time the current head began
        self.idle_since = 0.0  # loop time the task began to wait for a request
        self.transport: asyncio.Transport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task | None = None
        self.upgraded = False
        self.upgrade_bytes: bytearray | None = None  # client bytes after an Upgrade request's head
        self.closing = False
        self.timer: asyncio.TimerHandle | None = None
        self.paused: set[Pause] = set()
        self.body_queued = 0  # request body bytes read from the client, not yet sent on
        self.responding = None  # the upstream connection whose response is being relayed
        self.client_slow = False  # our write buffer toward the client is above its high-water mark
        self.draining = False  # the proxy is stopping: the next response says `Connection: close`
        self.exchange = Exchange(self)  # the fast path's request in flight, if any (exchange.request)

    # --- reading requests ---

    def connection_made(self, transport):
        self.transport = transport
        self.loop = asyncio.get_running_loop()  # once: each lookup costs a getpid() in Python 3.11
        self.head_since = self.idle_since = self.loop.time()
        self.task = self.loop.create_task(self._serve())
        self.timer = self.loop.call_at(self.head_since + HEAD_READ_TIMEOUT_S, self._tick)
        if self.initial:
            self.data_received(self.initial)

    def _tick(self):
        """The connection's deadlines: a head begun HEAD_READ_TIMEOUT_S ago and still not
        whole is a 408; a wait for the next request KEEPALIVE_IDLE_S long (DRAIN_IDLE_S while
        draining) ends the connection.
        Checked at the earliest moment either could be due (a head can begin at any time, so
        at least every HEAD_READ_TIMEOUT_S)."""
        self.timer = None
        if self.closing:
            return
        now = self.loop.time()
        due = now + HEAD_READ_TIMEOUT_S
        if self.reading_head and self.head_bytes:
            if now >= self.head_since + HEAD_READ_TIMEOUT_S:
                self._reject(408, "request head not received in time")
                return
            due = self.head_since + HEAD_READ_TIMEOUT_S
        elif self.waiter is not None and self.exchange.request is None:
            if now >= self.idle_since + self._idle_bound():
                self._next(None)
                return
            due = min(due, self.idle_since + self._idle_bound())
        self.timer = self.loop.call_at(due, self._tick)

    def _pause(self, reason: Pause) -> None:
        if not self.paused:
            self.transport.pause_reading()
        self.paused.add(reason)

    def _resume(self, reason: Pause) -> None:
        if reason in self.paused:
            self.paused.discard(reason)
            if not self.paused and not self.transport.is_closing():
                self.transport.resume_reading()

    def data_received(self, data):
        if self.stats is not None:
            self.stats.read += len(data)
        if self.closing:
            return
        if self.upgrade_bytes is not None:
            self.upgrade_bytes += data  # for the upgraded protocol, once the upstream agrees
            if len(self.upgrade_bytes) > BODY_HIGH_WATER:
                self._pause(Pause.BODY)  # the splice resumes it
            return
        if self.reading_head:
            # Count only the head: up to the blank line, which may straddle two reads.
            tail = self.head_tail
            end = (tail + data).find(b"\r\n\r\n") if tail else data.find(b"\r\n\r\n")
            if not self.head_bytes and end + 4 == len(data) and not data.startswith(b"\r\n"):
                self.as_read = data  # one whole head from its first byte: it may go upstream as it came
            self.head_bytes += len(data) if end < 0 else max(end + 4 - len(tail), 0)
            self.head_tail = data[-3:]
            if self.head_bytes > MAX_HEAD_BYTES:
                self._reject(431, "request head too large")
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # The head is complete; what follows belongs to the upgraded protocol.
            self.upgrade_bytes = bytearray(data[upgrade.args[0]:])
        except httptools.HttpParserError as e:
            self._reject(400, f"malformed request: {e}")
            return
        finally:
            self.as_read = None
        if len(self.requests) >= MAX_QUEUED_REQUESTS:
            self._pause(Pause.PIPELINE)

    def _next(self, request: Request | None) -> None:
        """A request for the task (None: no more), now if it waits (and no fast exchange is in
        flight), else in turn."""
        self.requests.append(request)
        if self.exchange.request is None:
            self._wake()

    def _wake(self) -> None:
        """The waiting task takes the next queued request."""
        waiter = self.waiter
        if waiter is not None and self.requests:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(self.requests.popleft())

    def on_message_begin(self):
        self.current = Request()
        self.head_since = self.loop.time()

    def on_url(self, url):
        self.current.url += url

    def on_header(self, name, value):
        self.current.headers.append((name, value))
        lowered = name.lower()
        if lowered in HOP_BY_HOP or lowered == b"expect":
            self.current.verbatim = False
        if lowered == b"expect" and value.strip().lower() == b"100-continue":
            # Answered here when the body is wanted (as hyper does); the endpoint's own 100 would
            # wait in its pending bytes while we wait for a body the client holds back.
            self.current.headers.pop()
            self.current.expect_continue = True
        elif lowered == b"transfer-encoding" and b"chunked" in value.lower():
            self.current.chunked = True
        elif lowered == b"content-length" and value.strip() not in (b"0", b""):
            self.current.has_body = True

    def on_headers_complete(self):
        request = self.current
        request.method = self.parser.get_method().decode()
        request.version = self.parser.get_http_version()
        request.keep_alive = self.parser.should_keep_alive()
        request.upgrade = self.parser.should_upgrade()
        request.has_body = request.has_body or request.chunked
        request.expect_continue = request.expect_continue and request.version == "1.1" and request.has_body
        if request.has_body:
            request.body = asyncio.Queue()
        self.reading_head, self.head_bytes, self.head_tail = False, 0, b""
        if (self.waiter is None or self.requests or self.exchange.request is not None or request.has_body
                or request.upgrade or request.method == "CONNECT" or not self._fast(request)):
            self._next(request)

    def on_body(self, body):
        if self.current.body is None:  # a body the head did not announce (llhttp would not pass one)
            self.current.has_body, self.current.body = True, asyncio.Queue()
        self.current.body.put_nowait(bytes(body))
        self.body_queued += len(body)
        if self.body_queued > BODY_HIGH_WATER:
            self._pause(Pause.BODY)

    def on_message_complete(self):
        if self.current.body is not None:
            self.current.body.put_nowait(None)
        self.current = None
        self.reading_head = True

    def eof_received(self):
        self.closing = True
        self._next(None)
        return True

    def connection_lost(self, exc):
        self.closing = True
        if self.timer:
            self.timer.cancel()
        if self.exchange.request is not None:
            self.exchange.abandon()
        if self.task and not self.upgraded:
            self.task.cancel()
        if self.on_close and not self.upgraded:
            self.on_close()

    # --- the client's side is slow: so is our reading of the endpoint ---

    def pause_writing(self):
        self.client_slow = True
        if self.responding is not None and not self.responding.transport.is_closing():
            self.responding.pause()

    def resume_writing(self):
        self.client_slow = False
        if self.responding is not None:
            self.responding.resume()

    def _write(self, data: bytes) -> None:
        if self.stats is not None:
            self.stats.written += len(data)
        self.transport.write(data)

    def _reject(self, status: int, reason: str):
        self.target.count_error(status, reason)
        self.closing = True
        if not self.transport.is_closing():
            self._write(error_response(status, reason))
            self.transport.close()
        if self.task:
            self.task.cancel()

    # --- serving requests, in order ---

    async def _serve(self):
        try:
            while True:
                request = await self._next_request()
                if request is None:
                    break  # the client is done, or the keep-alive connection sat idle
                if len(self.requests) < MAX_QUEUED_REQUESTS // 2:
                    self._resume(Pause.PIPELINE)
                keep_going = await self._handle(request)
                if not keep_going or not request.keep_alive or self.upgraded:
                    break
        except asyncio.CancelledError:
            return
        except Exception as e:  # never let one connection's bug take the proxy down
            self.target.count_error(502, f"proxy error: {type(e).__name__}")
            self.target.observers.problems.exception("http1", e, "HTTP/1 connection")
            self.transport.abort()
            return
        if not self.upgraded and not self.transport.is_closing():
            self.transport.close()

    async def _next_request(self) -> Request | None:
        """The next request, or None after the idle bound of nothing (`_tick` ends the wait)."""
        if self.requests:
            return self.requests.popleft()
        self.idle_since = self.loop.time()
        self.waiter = self.loop.create_future()
        self._arm_idle()
        return await self.waiter

    def _idle_bound(self) -> float:
        return DRAIN_IDLE_S if self.draining else self.keepalive_idle_s

    def _arm_idle(self) -> None:
        """The timer fires by the end of the idle wait (it usually does already: see _tick)."""
        due = self.idle_since + self._idle_bound()
        if self.timer is not None and self.timer.when() > due:
            self.timer.cancel()
            self.timer = self.loop.call_at(due, self._tick)

    def drain(self) -> None:
        """The proxy is stopping: the next response carries `Connection: close` and the connection
        ends after it; one waiting for a request ends after DRAIN_IDLE_S without one (a response
        already on its way went out without the header: the client's next request gets it)."""
        self.draining = True
        if self.waiter is not None:
            self.idle_since = self.loop.time()
            self._arm_idle()

    # --- the fast path (exchange1.py) ---

    def _fast(self, request: Request) -> bool:
        """Serve a whole request in callbacks if a pooled connection to the endpoint chosen for it
        is at hand; if not, it goes to the task with what was decided (its Retries, the choice)."""
        target = self.target
        request.started = time.monotonic()
        retries = target.retries(request.facts(), request)
        choice = target.choose(NOTHING_TRIED)
        conn = None if isinstance(choice, str) else target.pooled(choice[1])
        if conn is None:
            request.resume = (retries, set(), None if isinstance(choice, str) else choice)
            return False
        target.sending(request, choice[1])
        # The head as the client sent it unless something in it changes (a connection-level
        # header dropped, a trace context rewritten): rebuilt, it costs a list and a join.
        as_read = self.as_read if request.verbatim and request.span is None and request.far_span is None else None
        self.exchange.start(request, retries, conn, *choice, as_read or request.head())
        return True

    def exchange_ended(self, keep: bool) -> None:
        """The fast path's exchange is over; `keep`: the connection serves on."""
        if not keep:
            self.requests.appendleft(None)
        elif not self.requests:
            self.idle_since = self.loop.time()
        self._wake()

    def exchange_resumed(self, request: Request) -> None:
        """The fast path's request goes on in the task (a retry)."""
        self.requests.appendleft(request)
        self._wake()

    # --- the general path: the task ---

    async def _handle(self, request: Request) -> bool:
        """Serve one request; False if the client connection must close."""
        tried, first = set(), None
        if request.resume is None:
            request.started = time.monotonic()
            retries = self.target.retries(request.facts(), request)
        else:
            (retries, tried, first), request.resume = request.resume, None

        async def acquire(address):
            conn, _ = await self.target.acquire(address)
            return conn

        async def attempt(conn, endpoint, address) -> Outcome:
            return await self._exchange(request, retries, conn, endpoint, address)

        async def answer(status: int, reason: str, address) -> Outcome:
            if request.expect_continue and not request.continued:
                request.keep_alive = False  # its body was never asked for: it cannot be skipped
            else:
                await self._drain_body(request)
            request.keep_alive = request.keep_alive and not self.draining
            self.write_error(status, reason, request, address)
            return Outcome.DONE if request.keep_alive else Outcome.CLOSE

        return await run_attempts(self.target, retries, acquire, attempt, answer, tried, first) is Outcome.DONE

    def remaining(self, request: Request) -> float | None:
        deadline = self.target.request_timeout_s
        return None if deadline is None else max(deadline - (time.monotonic() - request.started), 0.001)

    async def _exchange(self, request: Request, retries: Retries, conn, endpoint, address) -> Outcome:
        """Send the request on `conn` and relay the response."""
        target = self.target
        awaited = Awaited(self.loop)
        conn.expect(request.method, awaited)
        target.sending(request, address)
        token = target.request_started(endpoint, address)
        try:
            if request.has_body:
                await self._stream_body(request, conn)
            else:
                conn.send(request.head())
            remaining = self.remaining(request)
            status = await (awaited.head if remaining is None
                            else asyncio.wait_for(asyncio.shield(awaited.head), remaining))
        except asyncio.TimeoutError:
            conn.transport.abort()
            target.request_finished(endpoint, token, None)
            self.write_error(504, "request timeout", request, address)
            return Outcome.CLOSE
        except (ConnectionError, OSError):
            target.request_finished(endpoint, token, None)
            if retries.decide(Failure.LOST) is Verdict.RETRY:
                return Outcome.RETRY
            self.write_error(502, "upstream failed", request, address)
            return Outcome.CLOSE
        except asyncio.CancelledError:
            self._abandon(conn, endpoint, token)
            raise
        if retries.wants_status(status) and retries.decide(Failure.STATUS, status) is Verdict.RETRY:
            target.request_finished(endpoint, token, status)
            conn.transport.close()  # the discarded response's body is not read
            return Outcome.RETRY
        target.count_response(request, status, address)
        if request.upgrade and (status == 101 or (request.method == "CONNECT" and 200 <= status < 300)):
            return self._upgrade(conn, endpoint, token, status)
        if request.upgrade:
            request.keep_alive = False  # refused upgrade: bytes sent after it are not HTTP we can trust
        request.keep_alive = request.keep_alive and not self.draining  # closing=True adds the header
        self.responding = conn
        conn.attach(self.transport, self.stats, closing=not request.keep_alive)
        if self.client_slow:
            conn.pause()  # the client has not taken the last response yet
        try:
            remaining = self.remaining(request)
            await (awaited.done if remaining is None else asyncio.wait_for(asyncio.shield(awaited.done), remaining))
        except asyncio.TimeoutError:
            target.request_finished(endpoint, token, None)
            target.count_cut("request timeout mid-response")
            conn.transport.abort()
            self.transport.abort()  # the head is out: cutting the connection is the only way to say it
            return Outcome.CLOSE
        except (ConnectionError, OSError):
            target.request_finished(endpoint, token, None)
            self.transport.abort()  # the response was cut short: so is the client's
            return Outcome.CLOSE
        except asyncio.CancelledError:
            self._abandon(conn, endpoint, token)
            raise
        finally:
            self.responding = None
        target.request_finished(endpoint, token, status)
        target.release(address, conn)
        return Outcome.CLOSE if conn.eof_delimited else Outcome.DONE

    def _abandon(self, conn, endpoint, token) -> None:
        """The client went away (or was cut) mid-exchange: the endpoint's connection is in an
        unknown state, so it is closed, never pooled nor left open (a pod resetting requests to
        an endpoint that never answers would otherwise leak one connection each time)."""
        conn.transport.abort()
        self.target.request_abandoned(endpoint, token)

    def _upgrade(self, conn, endpoint, token, status) -> Outcome:
        """101 Switching Protocols (or a 2xx to CONNECT): from here the two connections are spliced."""
        self.upgraded = True
        self.target.request_finished(endpoint, token, status)
        self._write(bytes(conn.pending))  # the 101 head and anything after it
        conn.pending.clear()
        # The splice replaces `conn` as the endpoint's protocol, so conn.connection_lost never
        # runs: what its loss would end (a one-hop inbound Connection) is ended with the relay.
        lost, conn.on_lost = conn.on_lost, None
        splice(self.transport, conn.transport, a_first=bytes(self.upgrade_bytes or b""),
               on_close=lambda client_side: self._relay_closed(client_side, conn, lost))
        self.paused.clear()
        for transport in (self.transport, conn.transport):
            if not transport.is_reading() and not transport.is_closing():
                transport.resume_reading()
        return Outcome.CLOSE

    def _relay_closed(self, client_side, conn, lost) -> None:
        if self.stats is not None:
            self.stats.read += client_side.bytes_in
            self.stats.written += client_side.peer.bytes_in
        if lost is not None:  # the endpoint's side closes with the client's (the relay closes both)
            conn.sent += client_side.bytes_in
            conn.received += client_side.peer.bytes_in
            lost(conn)
        if self.on_close:
            self.on_close()

    def _took(self, size: int) -> None:
        self.body_queued -= size
        if self.body_queued < BODY_LOW_WATER:
            self._resume(Pause.BODY)

    def _framed(self, request: Request, chunk: bytes | None) -> bytes:
        """A body chunk as the endpoint is sent it (None: the body's end)."""
        if not request.chunked:
            return chunk or b""
        return b"0\r\n\r\n" if chunk is None else b"%x\r\n" % len(chunk) + chunk + b"\r\n"

    async def _stream_body(self, request: Request, conn) -> None:
        """The head and the body: what of the body is here already, up to COALESCE_BYTES, goes
        in the head's write (one write, one TLS record where it fits); the rest as it comes,
        while the endpoint takes it. Never waits for body bytes before the head is out (a
        client may wait for a 100 Continue: it is sent now, when the body is wanted)."""
        if request.expect_continue and not request.continued:
            request.continued = True
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body, out = request.body, [request.head()]
        chunk, size = b"", 0
        while size < COALESCE_BYTES and not body.empty():
            chunk = body.get_nowait()
            out.append(self._framed(request, chunk))
            if chunk is None:
                break
            self._took(len(chunk))
            size += len(chunk)
        conn.send(b"".join(out))
        if chunk is None:
            return
        while (chunk := await body.get()) is not None:
            self._took(len(chunk))
            if not conn.writable.is_set():
                await conn.writable.wait()  # the endpoint is slow: the client waits (paused above)
                if conn.transport.is_closing():
                    raise ConnectionError("upstream closed while the request body was sent")
            conn.send(self._framed(request, chunk))
        if request.chunked:
            conn.send(self._framed(request, None))

    async def _drain_body(self, request: Request) -> None:
        if request.has_body:
            while (chunk := await request.body.get()) is not None:
                self._took(len(chunk))

    def write_error(self, status: int, reason: str, request: Request, address) -> None:
        self.target.count_error(status, reason)
        self.target.count_response(request, status, address)
        if not self.transport.is_closing():
            self._write(error_response(status, reason, close=not request.keep_alive))
