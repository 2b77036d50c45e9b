"""HTTP/2 between a pod and its destination, per request (h2c prior knowledge, gRPC).

The client's connection is served by the proxy (libnghttp2, h2peer.py); each of its streams is
one `Exchange` (h2exchange.py): an endpoint is chosen per request (the Service's balancer), the
request goes out as a stream on a pooled HTTP/2 connection to that endpoint (h2upstream.py),
and the response (headers, body, trailers) comes back on the client's stream. Bodies are
forwarded under both connections' flow control (h2peer.py), never gathered. This module is
the client's connection: admission of its streams, their budget, draining.

Retries, within the Service's retry limit and retry budget like HTTP/1's:
- the connection to an endpoint could not be opened, or the endpoint refused the stream
  (REFUSED_STREAM, or above a GOAWAY's last stream): it was not processed, so any request
  is retried, its body replayed, if it was at most REPLAY_MAX;
- a configured status, or a stream lost before its response, for requests safe to repeat
  (idempotent, no body); proxy/retry.py decides, for HTTP/1 too.
"""

import asyncio

from nodeagent.proxy.h2budget import Flood
from nodeagent.proxy.h2exchange import Exchange
from nodeagent.proxy.h2peer import H2Peer, goaway
from nodeagent.proxy.nghttp2 import ErrorCodes

MAX_CONCURRENT_STREAMS = 256  # per client connection, as advertised in SETTINGS
# Request headers are kept for a stream's life (a retry sends them again): all of one
# connection's, by RFC 9113's size (names, values, 32 bytes a field), at most this.
HEADERS_HELD_MAX = 1024 * 1024
# Draining: between the shutdown notice and the GOAWAY with the last stream id, room for a
# round trip (streams the client opened meanwhile are still served).
GOAWAY_NOTICE_S = 1.0


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
        if ended:
            exchange.client.incoming.finish()  # now: the codec tells the stream's end after this call
        exchange.start()

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


def header_list_size(headers: list) -> int:
    """RFC 9113's size of a header list (what SETTINGS_MAX_HEADER_LIST_SIZE limits)."""
    return sum(len(name) + len(value) for name, value in headers) + 32 * len(headers)
