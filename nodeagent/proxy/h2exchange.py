"""One HTTP/2 request and its response through the proxy: the client's stream, and the
endpoint's stream of the current attempt, moved on by their events (no task per stream).

The usual request needs no task: its headers arrive, the balancer chooses an endpoint, a
pooled connection to it has room, and the request goes out on it at once; then the events of
the two connections' codecs move the attempt on (`Phase`): the endpoint's head is checked and
relayed, the response's end is counted, a reset or the deadline (a timer) ends it. Only when
there is something to wait for, a connection to open or a retry after a failure, do the
attempts go on in a task, through the loop HTTP/1 uses (attempts.py), each attempt driven by
the same events (the task waits for its outcome).

Errors the proxy answers itself carry `nodeagent-proxy-error`, as HTTP/1's; a response
cut short after its headers resets the client's stream (HTTP/2 has no other way to say it).
"""

import asyncio
import enum
import time
from dataclasses import dataclass, field, replace

from nodeagent.proxy.attempts import Outcome, run_attempts
from nodeagent.proxy.classify import failed, grpc_status
from nodeagent.proxy.errors import REASON_HEADER
from nodeagent.proxy.h2forward import StreamEnd
from nodeagent.proxy.nghttp2 import CodecError, ErrorCodes
from nodeagent.proxy.retry import Failure, RequestFacts, Retries, Verdict


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
    far_span: object = None  # on the one hop, the destination's span (target.py `sending`)


class Phase(enum.Enum):
    IDLE = "no attempt in flight (before the first, or between two)"
    HEAD = "the request is out: waiting for the endpoint's head"
    BODY = "the head is relayed: the body goes through"
    OVER = "answered, or given up"


class Exchange:
    """One request and its response (`server` is the client's connection, http2.Http2Server)."""

    def __init__(self, server, stream_id: int, headers: list, ended: bool):
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
        self.headers_size = 0  # RFC 9113's size of `headers` (the connection's budget holds it)
        self.bodiless = ended
        self.retries: Retries | None = None
        self.client = StreamEnd(server, stream_id, self, keep_for_replay=True)
        self.upstream: StreamEnd | None = None
        self.phase = Phase.IDLE
        self.address = None  # the current attempt's endpoint
        self.status: int | None = None  # the response's, once its head is relayed
        self.inflight = None  # (endpoint, balancer token) of the attempt in flight
        self.timer: asyncio.TimerHandle | None = None  # the request's deadline, during an attempt
        self.task: asyncio.Task | None = None  # only when something had to be waited for
        self.outcome: asyncio.Future | None = None  # what the task waits for: the attempt's outcome

    # --- the start ---

    def start(self) -> None:
        """The first attempt, at once when a connection to the chosen endpoint has room."""
        try:
            facts = RequestFacts(self.request.method, has_body=not self.bodiless, replayable=True)
            self.retries = self.target.retries(facts, self.request)
            choice = self.target.choose(set())
            conn = None if isinstance(choice, str) else self.target.pooled_h2(choice[1])
            if conn is None:
                self._continue_in_task(set(), choice)
                return
            try:
                upstream = self._open(conn, choice[1])
            except ConnectionError:
                self._continue_in_task(set(), choice)  # the attempt loop counts (and may retry) the failure
                return
            self._begin(upstream, *choice)
        except Exception as e:  # never let one stream's bug take the connection down
            self._failed(e)
            self._over(Outcome.DONE)

    def _continue_in_task(self, tried: set, first) -> None:
        self.task = self.server.loop.create_task(self._attempts(tried, first))
        # A callback, not a `finally` in the task: a task cancelled before its first step (the
        # client reset the stream in the same read that opened it) never runs its body.
        self.task.add_done_callback(lambda _: self.server.exchange_done(self))

    async def _attempts(self, tried: set, first) -> None:
        incoming, loop = self.client.incoming, self.server.loop

        async def acquire(address):
            if self.retries.used:  # after a RETRY verdict: the body was kept whole (or there is none)
                incoming.rewind()
            return self._open(self.target.pooled_h2(address) or await self.target.acquire_h2(address), address)

        async def attempt(upstream: StreamEnd, endpoint, address) -> Outcome:
            self.outcome = loop.create_future()
            try:
                self._begin(upstream, endpoint, address)
                return await self.outcome
            finally:
                self.outcome = None

        async def answer(status: int, reason: str, address) -> Outcome:
            self._answer_error(status, reason, address)
            return Outcome.DONE

        try:
            await run_attempts(self.target, self.retries, acquire, attempt, answer, tried, first)
        except asyncio.CancelledError:
            self._give_up()  # the client gave up: not the endpoint's failure
        except Exception as e:
            self._failed(e)

    def _open(self, conn, address) -> StreamEnd:
        self.target.sending(self.request, address)  # before the headers go: a one-hop span rewrites them
        try:
            self.upstream = conn.open_stream(self, self.headers, self._request_complete())
        except CodecError as e:
            raise ConnectionError(f"stream not opened: {e}") from e
        return self.upstream

    def _request_complete(self) -> bool:
        """Whether the request is already all here and bodiless: its headers end the stream."""
        incoming = self.client.incoming
        if incoming.ended and not incoming.pending and not incoming.trailers:
            incoming.done = True
            return True
        return False

    # --- one attempt ---

    def _begin(self, upstream: StreamEnd, endpoint, address) -> None:
        """The request is out on `upstream`: its body follows, the deadline runs."""
        self.upstream, self.address, self.phase = upstream, address, Phase.HEAD
        self.inflight = (endpoint, self.target.request_started(endpoint, address))
        self.client.outgoing = None
        upstream.outgoing = self.client.incoming
        self.client.incoming.attach(upstream.peer, upstream.id)
        deadline = self.target.request_timeout_s
        if deadline is not None:
            remaining = max(deadline - (time.monotonic() - self.request.started), 0.001)
            self.timer = self.server.loop.call_later(remaining, self._guarded, self._timed_out)

    def _over(self, outcome: Outcome) -> None:
        """The attempt is over: the task goes on with `outcome`, or (no task) a retry starts one,
        or the exchange is done."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.phase = Phase.IDLE if outcome is Outcome.RETRY else Phase.OVER
        if self.outcome is not None:
            if not self.outcome.done():
                self.outcome.set_result(outcome)
        elif self.task is None or self.task.done():
            if outcome is Outcome.RETRY:
                self._continue_in_task({self.address}, None)
            else:
                self.server.loop.call_soon(self.server.exchange_done, self)

    def _guarded(self, step, *args) -> None:
        try:
            step(*args)
        except Exception as e:  # never let one stream's bug take the connection down
            self._failed(e)
            self._over(Outcome.DONE)

    # --- events from either connection ---

    def on_response(self, end: StreamEnd, headers: list, ended: bool) -> None:
        if end is self.upstream and self.phase is Phase.HEAD:
            self._guarded(self._head, headers, ended)

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
        if self.phase is Phase.HEAD:
            self._guarded(self._lost_before_head, code)
        elif self.phase is Phase.BODY:
            self._guarded(self._lost_mid_body)

    def cancel(self) -> None:
        if self.upstream is not None:
            self.upstream.reset()
        if self.task is not None and not self.task.done():
            self.task.cancel()  # its end gives up what is in flight
        elif self.phase is Phase.HEAD or self.phase is Phase.BODY:
            self._give_up()
            self.server.loop.call_soon(self.server.exchange_done, self)

    # --- what the events do ---

    def _head(self, headers: list, ended: bool) -> None:
        upstream, address = self.upstream, self.address
        status = _status(headers)
        if status is None:  # endpoints' headers are not validated: this one check is ours
            upstream.reset(ErrorCodes.PROTOCOL_ERROR)
            self._finished(None)
            self._answer_error(502, "malformed response", address)
            return self._over(Outcome.DONE)
        self.request.head_at = time.monotonic()
        if self.retries.wants_status(status) and self.retries.decide(Failure.STATUS, status) is Verdict.RETRY:
            self._finished(status)
            upstream.reset()  # the discarded response's body is not read
            return self._over(Outcome.RETRY)
        if not self.server.send_headers(self.client.id, headers, end_stream=ended):
            upstream.reset()  # the client's stream is gone
            self.target.count_response(self.request, status, address)
            self._finished(status)
            return self._over(Outcome.DONE)
        if ended:  # headers only (a gRPC error is often just that)
            self._finish_upstream()
            self._counted(status, grpc_status(headers))
            return self._over(Outcome.DONE)
        self.phase, self.status = Phase.BODY, status
        response = upstream.incoming
        self.client.outgoing = response
        response.on_done = self._response_done
        response.attach(self.server, self.client.id)

    def _response_done(self) -> None:
        """The response's end was handed to the client's codec."""
        if self.phase is Phase.BODY:
            self._guarded(self._body_done)

    def _body_done(self) -> None:
        trailers = self.upstream.incoming.trailers
        self._finish_upstream()
        self._counted(self.status, grpc_status(trailers))
        self._over(Outcome.DONE)

    def _lost_before_head(self, code: int | None) -> None:
        self._finished(None)
        if not self.client.incoming.replayable():  # more than REPLAY_MAX of its body went out
            self.retries.request = replace(self.retries.request, replayable=False)
        refused = code == ErrorCodes.REFUSED_STREAM  # not processed: any request may go again
        if self.retries.decide(Failure.REFUSED if refused else Failure.LOST) is Verdict.RETRY:
            return self._over(Outcome.RETRY)
        self._answer_error(502, "upstream failed", self.address)
        self._over(Outcome.DONE)

    def _lost_mid_body(self) -> None:
        self.target.count_response(self.request, self.status, self.address, failure=True)
        self._finished(None)
        self.client.reset(ErrorCodes.INTERNAL_ERROR)  # cut short: so is the client's
        self._over(Outcome.DONE)

    def _timed_out(self) -> None:
        self.timer = None
        if self.phase is Phase.HEAD:
            self.upstream.reset()
            self._finished(None)
            self._answer_error(504, "request timeout", self.address)
        elif self.phase is Phase.BODY:
            self.target.count_response(self.request, self.status, self.address, failure=True)
            self.target.count_cut("request timeout mid-response")
            self._finished(None)
            self.upstream.reset()
            self.client.reset(ErrorCodes.CANCEL)  # the head is out: a reset is how HTTP/2 says it
        else:
            return
        self._over(Outcome.DONE)

    # --- endings ---

    def _counted(self, status: int, grpc: int | None) -> None:
        """The response is through: classified (gRPC's status included), counted, tapped."""
        self.target.count_response(self.request, status, self.address, failure=failed(status, grpc))
        self._finished(status, grpc)

    def _finished(self, status: int | None, grpc: int | None = None) -> None:
        endpoint, token = self.inflight
        self.inflight = None
        self.target.request_finished(endpoint, token, status, grpc)

    def _give_up(self) -> None:
        """The client went away: what is in flight is abandoned, not the endpoint's failure."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.phase = Phase.OVER
        if self.inflight is not None:
            self.target.request_abandoned(*self.inflight)
            self.inflight = None

    def _failed(self, error: Exception) -> None:
        """A bug of ours on this stream: counted, logged, the stream reset; the connection goes on."""
        self._give_up()
        self.target.count_error(502, f"proxy error: {type(error).__name__}")
        self.target.observers.problems.exception("http2", error, "HTTP/2 stream")
        self.client.reset(ErrorCodes.INTERNAL_ERROR)

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
        self.server.respond(self.client.id, headers, body)
        if not self.client.incoming.ended:
            self.client.reset(ErrorCodes.NO_ERROR)  # we will not read the rest of the request
        else:
            self.client.incoming.abandon()


def _status(headers: list) -> int | None:
    """The response's :status, if it is a valid final status."""
    for name, value in headers:
        if name == b":status":
            return int(value) if len(value) == 3 and value.isdigit() and value[:1] != b"1" else None
    return None
