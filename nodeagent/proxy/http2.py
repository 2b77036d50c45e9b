"""HTTP/2 between a pod and its destination, per request (h2c prior knowledge, gRPC).

The client's connection is served by the proxy (libnghttp2, h2peer.py); each of its streams is
one `Exchange`: an endpoint is chosen per request (the Service's balancer), the request
goes out as a stream on a pooled HTTP/2 connection to that endpoint (h2upstream.py), and
the response (headers, body, trailers) comes back on the client's stream. Bodies are
forwarded under both connections' flow control (h2peer.py), never gathered.

Retries, within the Service's retry limit and retry budget like HTTP/1's:
- the connection to an endpoint could not be opened, or the endpoint refused the stream
  (REFUSED_STREAM, or above a GOAWAY's last stream): it was not processed, so any request
  is retried, its body replayed, if it was at most REPLAY_MAX;
- a configured status, or a stream lost before its response, for requests safe to repeat
  (idempotent, no body); proxy/retry.py decides, for HTTP/1 too.
Errors the proxy answers itself carry `nodeagent-proxy-error`, as HTTP/1's; a response
cut short after its headers resets the client's stream (HTTP/2 has no other way to say it).
"""

import asyncio
import time
from dataclasses import dataclass, field, replace

from nodeagent.proxy.classify import failed, grpc_status
from nodeagent.proxy.errors import REASON_HEADER
from nodeagent.proxy.h2budget import Flood
from nodeagent.proxy.h2peer import H2Peer, StreamEnd, goaway
from nodeagent.proxy.attempts import Outcome, run_attempts
from nodeagent.proxy.nghttp2 import CodecError, ErrorCodes
from nodeagent.proxy.retry import Failure, RequestFacts, Retries, Verdict

MAX_CONCURRENT_STREAMS = 256  # per client connection, as advertised in SETTINGS
# Request headers are kept for a stream's life (a retry sends them again): all of one
# connection's, by RFC 9113's size (names, values, 32 bytes a field), at most this.
HEADERS_HELD_MAX = 1024 * 1024
# Draining: between the shutdown notice and the GOAWAY with the last stream id, room for a
# round trip (streams the client opened meanwhile are still served).
GOAWAY_NOTICE_S = 1.0


@dataclass
class Request:
    """A request's metadata, as the tap and the metrics see it (HTTP/1's Request has the same fields)."""

    method: str
    url: bytes
    headers: list
    started: float = field(default_factory=time.monotonic)
    head_at: float | None = None  # when the response's headers arrived
    version: str = "2"  # for access logs, as HTTP/1's "1.1"
    span: object = None  # this hop's trace span (telemetry.py), when tracing is on


class StreamFailed(Exception):
    def __init__(self, code: int | None):
        super().__init__(f"stream reset ({code})" if code is not None else "connection lost")
        self.refused = code == ErrorCodes.REFUSED_STREAM


class Http2Server(H2Peer):
    """The client side of an HTTP/2 connection; `target` decides where each request goes
    (outbound.HttpTarget); `initial` are the bytes read during detection (the preface)."""

    def __init__(self, target, initial: bytes = b"", stats=None, on_close=None):
        super().__init__(MAX_CONCURRENT_STREAMS, report=target.count_http2_refusal)
        self.target, self.initial, self.stats, self.on_close = target, initial, stats, on_close
        self.exchanges: dict[int, Exchange] = {}
        self.headers_held = 0
        self._drain_timer: asyncio.TimerHandle | None = None

    def drain(self) -> None:
        """The proxy is stopping: GOAWAY in two steps (RFC 9113, 6.8), a notice that no new
        stream should come, then the last stream id; streams in flight finish, and the
        connection closes once none is left."""
        if self.closed or self.session is None or self._drain_timer is not None:
            return
        self.session.shutdown_notice()
        self.flush()
        self._drain_timer = asyncio.get_running_loop().call_later(GOAWAY_NOTICE_S, self._last_goaway)

    def _last_goaway(self) -> None:
        if self.closed:
            return
        self.going_away = True  # went_idle closes the connection when the last exchange ends
        if not self.exchanges:
            goaway(self)
            return
        self.session.terminate(0)  # GOAWAY NO_ERROR with the last stream id nghttp2 processed
        self.flush()

    def connection_made(self, transport):
        super().connection_made(transport)
        self.went_idle()
        if self.initial:
            self.data_received(self.initial)

    def data_received(self, data):
        if self.stats is not None:
            self.stats.read += len(data)
        super().data_received(data)

    def flush(self) -> None:
        before = self.bytes_written
        super().flush()
        if self.stats is not None:
            self.stats.written += self.bytes_written - before

    def on_request(self, stream_id: int, headers: list, ended: bool) -> None:
        size = self.session.block_size  # header_list_size(headers), counted as they arrived
        if not self.admit(stream_id, size):
            return
        self.not_idle()
        self.headers_held += size
        exchange = Exchange(self, stream_id, headers, ended)
        exchange.headers_size = size
        self.exchanges[stream_id] = exchange
        self.register(exchange.client)
        exchange.task = self.loop.create_task(exchange.serve())
        # A callback, not a `finally` in serve(): a task cancelled before its first step (the
        # client reset the stream in the same read that opened it) never runs its body.
        exchange.task.add_done_callback(lambda _: self.exchange_done(exchange))

    def admit(self, stream_id: int, headers_size: int) -> bool:
        """Whether a new stream may start; a refused one hears REFUSED_STREAM (a client may
        always retry that) and is counted. The connection's own limits: nghttp2 enforces the
        advertised MAX_CONCURRENT_STREAMS on open streams, this on exchanges still in flight,
        and the headers they hold; then the pod's own share of open streams."""
        if len(self.exchanges) >= MAX_CONCURRENT_STREAMS:
            self.refuse(stream_id, Flood.STREAMS)
            return False
        if self.headers_held + headers_size > HEADERS_HELD_MAX:
            self.refuse(stream_id, Flood.HEADERS_HELD)
            return False
        if not self.target.take_stream():  # the pod's share of open streams (limits.py) is used up
            self.target.count_limit(self.target.stream_limit.value)
            self.session.reset(stream_id, ErrorCodes.REFUSED_STREAM)
            self.flush_soon()
            return False
        return True

    def refuse(self, stream_id: int, reason: Flood) -> None:
        self.report(reason)
        self.session.reset(stream_id, ErrorCodes.REFUSED_STREAM)
        self.flush_soon()

    def exchange_done(self, exchange: "Exchange") -> None:
        if self.exchanges.pop(exchange.client.id, None) is not None:
            self.forget(exchange.client.id)
            self.target.give_stream()
            self.headers_held -= exchange.headers_size
            exchange.client.incoming.forget_replay()
        if not self.exchanges:
            self.went_idle()

    def busy(self) -> bool:
        return bool(self.exchanges)

    def on_goaway(self, last_stream_id) -> None:
        if not self.exchanges:
            goaway(self)  # the client is done; in-flight exchanges finish first otherwise

    def protocol_error(self, error: Exception) -> None:
        self.target.count_error(400, f"malformed HTTP/2: {type(error).__name__}")

    def connection_lost(self, exc):
        super().connection_lost(exc)
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        for exchange in list(self.exchanges.values()):
            exchange.cancel()
        if self.on_close:
            self.on_close()


class Exchange:
    """One request and its response: the client's stream, and the endpoint's stream of
    the current attempt."""

    def __init__(self, server: Http2Server, stream_id: int, headers: list, ended: bool):
        self.server, self.target = server, server.target
        method = path = b""
        for name, value in headers:  # pseudo-header fields come first (nghttp2 checked)
            if name[:1] != b":":
                break
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
        self.request = Request(method.decode("latin-1"), path, headers)
        self.headers = headers
        self.bodiless = ended
        self.retries: Retries | None = None
        self.client = StreamEnd(server, stream_id, self, keep_for_replay=True)
        self.upstream: StreamEnd | None = None
        self.head: asyncio.Future | None = None  # the current attempt's response headers
        self.response_ended = False
        self.done: asyncio.Future | None = None  # the response is through (or failed)
        self.task: asyncio.Task | None = None
        self.inflight = None  # (endpoint, balancer token) of the attempt in flight

    # --- events from either connection ---

    def on_response(self, end: StreamEnd, headers: list, ended: bool) -> None:
        if end is self.upstream and not self.head.done():
            self.response_ended = ended
            self.head.set_result(headers)

    def on_informational(self, end: StreamEnd, headers: list) -> None:
        if end is self.upstream:
            self.server.send_headers(self.client.id, headers)  # 100-continue and friends pass through

    def on_reset(self, end: StreamEnd, code: int | None) -> None:
        if end is self.client:  # the client gave up (or its connection is gone)
            self.cancel()
            return
        if end is not self.upstream:
            return  # an earlier attempt's
        if self.client.incoming.dst is end.peer and self.client.incoming.dst_id == end.id:
            self.client.incoming.detach()  # the request's body waits (for a retry, or to be dropped)
        failure = StreamFailed(code)
        if self.head is not None and not self.head.done():
            self.head.set_exception(failure)
        elif self.done is not None and not self.done.done():
            self.done.set_exception(failure)

    def cancel(self) -> None:
        if self.upstream is not None:
            self.upstream.reset()
        if self.task is not None and not self.task.done():
            self.task.cancel()

    # --- the request's life ---

    async def serve(self) -> None:
        try:
            await self._serve()
        except asyncio.CancelledError:
            if self.inflight is not None:  # the client gave up: not the endpoint's failure
                self.target.request_abandoned(*self.inflight)
        except Exception as e:  # never let one stream's bug take the connection down
            self.target.count_error(502, f"proxy error: {type(e).__name__}")
            self.target.observers.problems.exception("http2", e, "HTTP/2 stream")
            self.client.reset(ErrorCodes.INTERNAL_ERROR)

    async def _serve(self) -> None:
        incoming = self.client.incoming
        facts = RequestFacts(self.request.method, has_body=not self.bodiless, replayable=True)
        self.retries = self.target.retries(facts, self.request)

        async def acquire(address):
            if self.retries.used:  # after a RETRY verdict: the body was kept whole (or there is none)
                incoming.rewind()
            conn = await self.target.acquire_h2(address)
            try:
                self.upstream = conn.open_stream(self, self.headers, self._request_complete())
            except CodecError as e:
                raise ConnectionError(f"stream not opened: {e}") from e
            return self.upstream

        async def answer(status: int, reason: str, address) -> Outcome:
            self._answer_error(status, reason, address)
            return Outcome.DONE

        await run_attempts(self.target, self.retries, acquire, self._attempt, answer)

    def _request_complete(self) -> bool:
        """Whether the request is already all here and bodiless: its headers end the stream."""
        incoming = self.client.incoming
        if incoming.ended and not incoming.pending and not incoming.trailers:
            incoming.done = True
            return True
        return False

    def _remaining(self) -> float | None:
        deadline = self.target.request_timeout_s
        return None if deadline is None else max(deadline - (time.monotonic() - self.request.started), 0.001)

    async def _attempt(self, upstream: StreamEnd, endpoint, address) -> Outcome:
        """Send on `upstream` and relay the response."""
        target = self.target
        loop = self.server.loop
        self.head, self.done, self.response_ended = loop.create_future(), loop.create_future(), False
        self.inflight = (endpoint, target.request_started(endpoint, address))
        self.client.outgoing = None
        upstream.outgoing = self.client.incoming
        self.client.incoming.attach(upstream.peer, upstream.id)
        try:
            remaining = self._remaining()
            headers = await (self.head if remaining is None else asyncio.wait_for(asyncio.shield(self.head), remaining))
        except asyncio.TimeoutError:
            upstream.reset()
            self._finished(None)
            self._answer_error(504, "request timeout", address)
            return Outcome.DONE
        except StreamFailed as e:
            self._finished(None)
            if not self.client.incoming.replayable():  # more than REPLAY_MAX of its body went out
                self.retries.request = replace(self.retries.request, replayable=False)
            if self.retries.decide(Failure.REFUSED if e.refused else Failure.LOST) is Verdict.RETRY:
                return Outcome.RETRY
            self._answer_error(502, "upstream failed", address)
            return Outcome.DONE
        status = _status(headers)
        if status is None:  # endpoints' headers are not validated: this one check is ours
            upstream.reset(ErrorCodes.PROTOCOL_ERROR)
            self._finished(None)
            self._answer_error(502, "malformed response", address)
            return Outcome.DONE
        self.request.head_at = time.monotonic()
        if self.retries.wants_status(status) and self.retries.decide(Failure.STATUS, status) is Verdict.RETRY:
            self._finished(status)
            upstream.reset()  # the discarded response's body is not read
            return Outcome.RETRY
        if not self.server.send_headers(self.client.id, headers, end_stream=self.response_ended):
            upstream.reset()  # the client's stream is gone
            target.count_response(self.request, status, address)
            self._finished(status)
            return Outcome.DONE
        if self.response_ended:  # headers only (a gRPC error is often just that)
            self._finish_upstream()
            self._counted(status, grpc_status(headers), address)
            return Outcome.DONE
        response = upstream.incoming
        self.client.outgoing = response
        response.on_done = lambda: self.done.done() or self.done.set_result(None)
        response.attach(self.server, self.client.id)
        try:
            remaining = self._remaining()
            await (self.done if remaining is None else asyncio.wait_for(asyncio.shield(self.done), remaining))
        except asyncio.TimeoutError:
            target.count_response(self.request, status, address, failure=True)
            target.count_cut("request timeout mid-response")
            self._finished(None)
            upstream.reset()
            self.client.reset(ErrorCodes.CANCEL)  # the head is out: a reset is how HTTP/2 says it
            return Outcome.DONE
        except StreamFailed:
            target.count_response(self.request, status, address, failure=True)
            self._finished(None)
            self.client.reset(ErrorCodes.INTERNAL_ERROR)  # cut short: so is the client's
            return Outcome.DONE
        self._finish_upstream()
        self._counted(status, grpc_status(response.trailers), address)
        return Outcome.DONE

    def _counted(self, status: int, grpc: int | None, address) -> None:
        """The response is through: classified (gRPC's status included), counted, tapped."""
        self.target.count_response(self.request, status, address, failure=failed(status, grpc))
        self._finished(status, grpc)

    def _finished(self, status: int | None, grpc: int | None = None) -> None:
        endpoint, token = self.inflight
        self.inflight = None
        self.target.request_finished(endpoint, token, status, grpc)

    def _finish_upstream(self) -> None:
        upstream = self.upstream
        if self.client.incoming.done:
            upstream.peer.forget(upstream.id)
        else:
            # The response is complete but the client still sends: the endpoint said all it will.
            upstream.reset(ErrorCodes.NO_ERROR)
        self.upstream = None

    def _answer_error(self, status: int, reason: str, address) -> None:
        self.target.count_error(status, reason)
        self.target.count_response(self.request, status, address)
        body = f"{reason}\n".encode()
        headers = [(b":status", str(status).encode()), (REASON_HEADER.encode(), reason.encode()),
                   (b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        server, stream_id = self.server, self.client.id
        server.respond(stream_id, headers, body)
        if not self.client.incoming.ended:
            self.client.reset(ErrorCodes.NO_ERROR)  # we will not read the rest of the request
        else:
            self.client.incoming.abandon()


def header_list_size(headers: list) -> int:
    """RFC 9113's size of a header list (what SETTINGS_MAX_HEADER_LIST_SIZE limits)."""
    return sum(len(name) + len(value) for name, value in headers) + 32 * len(headers)


def _status(headers: list) -> int | None:
    """The response's :status, if it is a valid final status."""
    for name, value in headers:
        if name == b":status":
            return int(value) if len(value) == 3 and value.isdigit() and value[:1] != b"1" else None
    return None

