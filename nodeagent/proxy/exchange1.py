"""HTTP/1's fast path: one whole request (no body, no upgrade) sent on a pooled connection and
its response relayed, all in the two connections' callbacks: no task, no future, no object made
per request beyond the parser's.

Http1Server (http1.py) starts it when the request's head is complete, nothing is queued ahead
of it and a pooled connection to the chosen endpoint is at hand; the upstream's ResponseReader
(upstream.py) then calls `response_head`, `response_done` or `response_failed`. What needs a
wait or a new try goes back to the server's task (its general path, http1.py `_handle`) with the
request's Retries and what was tried: a connection lost before the head of a request that may be
retried, and a status the Service retries. Every count and bound is the general path's: the
same target calls, the same request timeout (a timer), the same backpressure (`responding`).
"""

from nodeagent.proxy.retry import Failure, Verdict


class Exchange:
    """The fast path's one request in flight on a client connection (reused request after request)."""

    __slots__ = ("server", "request", "retries", "conn", "endpoint", "address", "token", "timer", "headed")

    def __init__(self, server):
        self.server = server
        self.request = None  # None: no exchange in flight
        self.retries = self.conn = self.endpoint = self.address = self.token = self.timer = None
        self.headed = False

    def start(self, request, retries, conn, endpoint, address, head: bytes) -> None:
        server, target = self.server, self.server.target
        self.request, self.retries, self.conn, self.endpoint, self.address = request, retries, conn, endpoint, address
        self.headed = False
        conn.expect(request.method, self)
        self.token = target.request_started(endpoint, address)
        conn.send(head)
        timeout = target.request_timeout_s
        if timeout is not None:
            self.timer = server.loop.call_later(server.remaining(request), self._timed_out)

    def _end(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.request = self.retries = self.conn = self.endpoint = self.timer = None

    # --- the upstream's ResponseReader tells ---

    def response_head(self, conn, status: int) -> None:
        server, target, request, retries = self.server, self.server.target, self.request, self.retries
        if retries.wants_status(status) and retries.decide(Failure.STATUS, status) is Verdict.RETRY:
            target.request_finished(self.endpoint, self.token, status)
            conn.forsake(abort=False)  # the discarded response's body is not read
            self._hand_over()
            return
        self.headed = True
        target.count_response(request, status, self.address)
        request.keep_alive = request.keep_alive and not server.draining  # closing=True adds the header
        server.responding = conn
        conn.attach(server.transport, server.stats, closing=not request.keep_alive)
        if server.client_slow:
            conn.pause()  # the client has not taken the last response yet

    def response_done(self, conn) -> None:
        server, target = self.server, self.server.target
        server.responding = None
        target.request_finished(self.endpoint, self.token, conn.status)
        target.release(self.address, conn)
        keep = self.request.keep_alive and not conn.eof_delimited
        self._end()
        server.exchange_ended(keep)

    def response_failed(self, conn, exc: BaseException) -> None:
        server, target = self.server, self.server.target
        target.request_finished(self.endpoint, self.token, None)
        if self.headed:
            server.responding = None
            server.transport.abort()  # the response was cut short: so is the client's
        elif self.retries.decide(Failure.LOST) is Verdict.RETRY:
            self._hand_over()
            return
        else:
            server.write_error(502, "upstream failed", self.request, self.address)
        self._end()
        server.exchange_ended(False)

    # --- the request's own bounds ---

    def _timed_out(self) -> None:
        self.timer = None
        server, target = self.server, self.server.target
        self.conn.forsake()
        target.request_finished(self.endpoint, self.token, None)
        if self.headed:
            server.responding = None
            target.count_cut("request timeout mid-response")
            server.transport.abort()  # the head is out: cutting the connection is the only way to say it
        else:
            server.write_error(504, "request timeout", self.request, self.address)
        self._end()
        server.exchange_ended(False)

    def abandon(self) -> None:
        """The client went away mid-exchange: the endpoint's connection is in an unknown state, so it
        is closed, never pooled (as the general path's `_abandon`)."""
        self.conn.forsake()
        self.server.target.request_abandoned(self.endpoint, self.token)
        self._end()

    def _hand_over(self) -> None:
        """The request goes on in the task's general path, with its retries and what was tried."""
        request = self.request
        request.resume = (self.retries, {self.address}, None)
        self._end()
        self.server.exchange_resumed(request)
