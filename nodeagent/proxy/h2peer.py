"""HTTP/2 connections of the proxy: an nghttp2 session (nghttp2.py) behind an asyncio Protocol.

Each stream is a `StreamEnd` on its connection; the events for it go to its `owner` (the
exchange that ties the two ends together, http2.py); its body travels as a `Forward`
(h2forward.py) under both connections' flow control.

Every connection is under a budget (h2budget.py has the numbers): what we owe a peer (our
write buffer toward it) stays under WRITE_HIGH, because above it we stop reading from that
peer (so its PINGs and SETTINGS cannot make answers pile up) and stop taking frames from the
codec for it (so the bodies' senders are not acknowledged and wait); the frames a peer sends
are counted before they are decoded, and a peer over a flood limit gets GOAWAY
ENHANCE_YOUR_CALM and is closed.
"""

import asyncio
import logging
import time

from nodeagent.proxy import nghttp2
from nodeagent.proxy.h2budget import MAX_HEADER_LIST, Flood, FrameBudget
from nodeagent.proxy.h2forward import REPLAY_MAX, REPLAY_PER_CONNECTION, Forward, StreamEnd  # noqa: F401
from nodeagent.proxy.nghttp2 import CodecError, ErrorCodes, Session

STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 1024 * 1024
# What we owe one peer: above WRITE_HIGH in our write buffer toward it, we stop reading it
# and stop taking frames from the codec for it, until the buffer is down to WRITE_LOW.
WRITE_HIGH, WRITE_LOW = 256 * 1024, 64 * 1024
FLUSH_AT = 64 * 1024  # frames gathered before they are written out (so the pause can act)
CLOSE_GRACE_S = 5.0  # a closed connection whose peer does not read what is left is aborted
LOG_EVERY_S = 10.0  # one line per flood kind per interval; the metric counts every one

log = logging.getLogger(__name__)


class H2Peer(asyncio.Protocol):
    """One HTTP/2 connection. Subclasses say which side they are and what a new
    request (server side) means; `ends` route every stream's events to its owner."""

    client_side = False
    # What arrives from clients is checked (nghttp2's HTTP messaging rules: a malformed request
    # is the client's error, not forwarded); what endpoints answer passes as it came, for the
    # client's own HTTP/2 stack to judge.
    validate_inbound = True
    idle_s = 60.0  # a connection with no stream for this long is closed (GOAWAY)

    def __init__(self, max_concurrent_streams: int | None = None, report=None):
        self.settings = {nghttp2.SETTINGS_INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                         nghttp2.SETTINGS_MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST}
        if max_concurrent_streams is not None:
            self.settings[nghttp2.SETTINGS_MAX_CONCURRENT_STREAMS] = max_concurrent_streams
        if self.client_side:
            self.settings[nghttp2.SETTINGS_ENABLE_PUSH] = 0  # a pushed response would have no client to go to
        self.session: Session | None = None  # made by start()
        self._early: list[bytes] = []  # what arrived before start()
        self.ends: dict[int, StreamEnd] = {}
        self.bodies: dict[int, Forward] = {}  # stream id -> the body being sent on it
        self._answers: dict[int, Forward] = {}  # of those, our own answers (errors, refusals)
        self._deferred: set[int] = set()  # streams whose body the codec found empty: resume when it comes
        self._final: set[int] = set()  # client side: streams whose final response head arrived
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.going_away = False  # GOAWAY received: no new streams here
        self._in_codec = False  # inside the session's callbacks: no send from there
        self._flush_pending = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self.bytes_written = 0  # for the client connection's byte counters (Http2Server)
        self.budget = FrameBudget(time.monotonic, preface=not self.client_side)
        self.report = report  # report(Flood): counts a refusal against the pod
        self.write_paused = False
        self.replay_held = 0  # bytes of this connection's request bodies kept for retries

    def connection_made(self, transport):
        self.transport = transport
        self.start()

    def start(self) -> None:
        """Make the session; send our preface and SETTINGS."""
        self.transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        self.loop = asyncio.get_running_loop()  # kept: asking for it each time costs a getpid() (3.11)
        self.session = Session(self, server=not self.client_side, settings=self.settings,
                               connection_window=CONNECTION_WINDOW, validate=self.validate_inbound)
        self.flush()
        if self._early:
            early, self._early = b"".join(self._early), []
            self.data_received(early)

    def data_received(self, data):
        if self.closed:
            return  # lingering after our GOAWAY: dropped
        if self.session is None:  # a pooled connection's server spoke before start()
            self._early.append(data)
            return
        if not self.transport.get_write_buffer_size():
            self.budget.drained()
        flood = self.budget.scan(data)
        if flood is not None:
            self.calm(flood)
            return
        self._in_codec = True
        try:
            self.session.receive(data)
        except CodecError as e:
            self._in_codec = False
            if e.flood is not None:
                self.calm(e.flood)
            else:
                self.protocol_error(e)
                goaway(self, e.code or ErrorCodes.PROTOCOL_ERROR)
            return
        finally:
            self._in_codec = False
        self.flush()
        if not self.closed and not self.session.wants_io():
            goaway(self)  # the session is over (a GOAWAY of nghttp2's, sent): close

    # --- the session's events (nghttp2.py calls these) ---

    def h2_headers(self, stream_id: int, headers: list, category: int, end_stream: bool) -> None:
        if category == nghttp2.HCAT_REQUEST:
            self.on_request(stream_id, headers, end_stream)
        else:
            end = self.ends.get(stream_id)
            if end is None:
                return
            if self.client_side and stream_id not in self._final:
                if headers and headers[0][0] == b":status" and headers[0][1][:1] == b"1":
                    end.owner.on_informational(end, headers)
                    return
                self._final.add(stream_id)
                end.owner.on_response(end, headers, end_stream)
            else:
                end.incoming.trailers = headers
        if end_stream:
            self.h2_end_stream(stream_id)

    def h2_end_stream(self, stream_id: int) -> None:
        end = self.ends.get(stream_id)
        if end is not None:
            end.incoming.finish(end.incoming.trailers)

    def h2_data(self, stream_id: int, data: bytes) -> None:
        end = self.ends.get(stream_id)
        if end is None:
            self.session.consume(stream_id, len(data))
        else:
            end.incoming.push(data, len(data))

    def h2_reset(self, stream_id: int, code: int) -> None:
        """The peer reset the stream."""
        end = self.ends.get(stream_id)
        if end is not None:
            self.forget(stream_id)
            end.incoming.abandon()
            end.owner.on_reset(end, code)

    def h2_closed(self, stream_id: int, code: int) -> None:
        """nghttp2 closed the stream: both ends done (NO_ERROR), or reset by either side, or
        refused by a GOAWAY (REFUSED_STREAM)."""
        self.bodies.pop(stream_id, None)
        self._answers.pop(stream_id, None)
        self._deferred.discard(stream_id)
        self._final.discard(stream_id)
        if code != ErrorCodes.NO_ERROR:
            self.h2_reset(stream_id, code)

    def h2_goaway(self, last_stream_id: int, code: int) -> None:
        self.going_away = True
        self.on_goaway(last_stream_id)

    def h2_connection_error(self, code: int) -> None:
        """nghttp2 found the peer broke the protocol and sent GOAWAY with `code`."""
        if code == ErrorCodes.ENHANCE_YOUR_CALM:  # one of nghttp2's own flood limits
            log_flood(self, Flood.CODEC)
            if self.report is not None:
                self.report(Flood.CODEC)
            return
        self.protocol_error(CodecError(f"GOAWAY with error code {code}", code))

    def h2_invalid(self, stream_id: int, lib_error: int) -> None:
        """nghttp2 refused a frame on its own: a stream over our limit (REFUSED_STREAM), or a
        malformed request or response (the stream is reset with PROTOCOL_ERROR; others go on).
        Connection-level violations end in a GOAWAY, counted by h2_connection_error."""
        if lib_error == nghttp2.ERR_REFUSED_STREAM:
            if self.report is not None:
                self.report(Flood.STREAMS)  # over our MAX_CONCURRENT_STREAMS: nghttp2 refused it
        elif lib_error in (nghttp2.ERR_HTTP_HEADER, nghttp2.ERR_HTTP_MESSAGING):
            self.protocol_error(CodecError(f"malformed message on stream {stream_id}", ErrorCodes.PROTOCOL_ERROR))

    def read_body(self, stream_id: int, length: int):
        body = self.bodies.get(stream_id)
        result = body.read(length) if body is not None else (None, False, None)
        if result[0] is None:
            self._deferred.add(stream_id)
        else:
            self.budget.data_sent += 1  # a DATA frame: the peer may acknowledge it (WINDOW_UPDATE)
        return result

    def want_body(self, stream_id: int) -> None:
        """A body for `stream_id` has something to send."""
        if stream_id in self._deferred:
            self._deferred.discard(stream_id)
            self.session.resume(stream_id)
        self.flush_soon()

    # --- what subclasses decide ---

    def on_request(self, stream_id: int, headers: list, ended: bool) -> None:
        self.session.reset(stream_id, ErrorCodes.REFUSED_STREAM)  # a server never gets one

    def on_goaway(self, last_stream_id: int | None) -> None:
        pass

    def protocol_error(self, error: Exception) -> None:
        pass

    def stream_closed(self) -> None:
        """A stream left `ends`."""

    def busy(self) -> bool:
        return bool(self.ends)

    # --- the budget ---

    def pause_writing(self) -> None:
        """We owe the peer more than WRITE_HIGH: read nothing more from it, send it no body."""
        self.write_paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.closed:
            self.transport.resume_reading()
            self.flush_soon()

    def calm(self, flood: Flood) -> None:
        """The peer went over a flood limit: GOAWAY ENHANCE_YOUR_CALM, close, and drop every
        stream at once (their other ends are cancelled: nothing more is done for this peer)."""
        log_flood(self, flood)
        if self.report is not None:
            self.report(flood)
        goaway(self, ErrorCodes.ENHANCE_YOUR_CALM)

    # --- idleness ---

    def went_idle(self) -> None:
        """No stream is left: close now if the peer is going away, else after idle_s."""
        if self.closed:
            return
        if self.going_away:
            goaway(self)
            return
        self.not_idle()
        self._idle_timer = asyncio.get_running_loop().call_later(self.idle_s, self._close_if_idle)

    def not_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _close_if_idle(self) -> None:
        self._idle_timer = None
        if not self.busy():
            goaway(self)

    # --- used by owners ---

    def register(self, end: StreamEnd) -> None:
        self.ends[end.id] = end
        self.budget.streams += 1

    def forget(self, stream_id: int) -> None:
        if self.ends.pop(stream_id, None) is not None:
            self.stream_closed()

    def acknowledge(self, size: int, stream_id: int) -> None:
        if not self.closed:
            self.session.consume(stream_id, size)
            self.flush_soon()

    def reset(self, stream_id: int, code: int) -> None:
        end = self.ends.get(stream_id)
        self.forget(stream_id)
        if end is not None:
            end.incoming.abandon()
        if self.closed:
            return
        answer = self._answers.get(stream_id)
        if code == ErrorCodes.NO_ERROR and answer is not None and not answer.done:
            # "Stop sending" after our own answer: the answer's body goes first (nghttp2 would
            # send the reset before DATA already queued, and the client would lose the body).
            answer.on_done = lambda: self.reset(stream_id, code)
            return
        self.session.reset(stream_id, code)
        self.flush_soon()

    def send_headers(self, stream_id: int, headers: list, end_stream: bool = False) -> bool:
        """A response's head (or an informational one), server side; False if the stream was
        gone (reset meanwhile). A body, if `end_stream` is not set, follows as a Forward."""
        if self.closed or stream_id not in self.ends:
            return False
        if headers and headers[0][0] == b":status" and headers[0][1][:1] == b"1":
            sent = self.session.submit_informational(stream_id, headers)
        else:
            sent = self.session.submit_response(stream_id, headers, body=not end_stream)
        self.flush_soon()
        return sent

    def respond(self, stream_id: int, headers: list, body: bytes) -> None:
        """A whole response of our own (an error) on a stream still here."""
        if stream_id in self.ends:
            self.answer(stream_id, headers, body)

    def answer(self, stream_id: int, headers: list, body: bytes) -> None:
        """A whole response of our own, on any stream the peer opened."""
        if self.closed or not self.session.submit_response(stream_id, headers, body=bool(body)):
            return
        if body:
            forward = Forward(self, stream_id)
            forward.push(body, 0)
            forward.finish()
            self._answers[stream_id] = forward
            forward.attach(self, stream_id)
        self.flush_soon()

    def flush_soon(self) -> None:
        """Write what the codec has to send, once per event-loop turn (so a burst of frames is one write)."""
        if not self._flush_pending and not self.closed:
            self._flush_pending = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Take frames from the codec and write them, until it has none or the peer owes us
        reading (write_paused: the rest waits in the codec, bodies unacknowledged)."""
        self._flush_pending = False
        transport = self.transport
        if self.session is None or transport is None or transport.is_closing():
            return
        if self._in_codec:
            self.flush_soon()  # nghttp2 must not be asked to send from inside its own callbacks
            return
        chunks, size = [], 0
        try:
            while not self.write_paused:
                data = self.session.send()
                if not data:
                    break
                chunks.append(data)
                size += len(data)
                if size >= FLUSH_AT:
                    self._write(chunks, size)  # may pause us
                    chunks, size = [], 0
        except CodecError as e:
            log.warning("HTTP/2 session cannot send: %s", e)
            self.transport.abort()
        if chunks:
            self._write(chunks, size)

    def _write(self, chunks: list, size: int) -> None:
        self.bytes_written += size
        self.transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def connection_lost(self, exc):
        self.closed = True
        self.drop_streams()
        if self.session is not None:
            self.session.close()

    def drop_streams(self) -> None:
        """The connection is over: its streams end, failed, except (on an endpoint's connection)
        a response that has all arrived: what is left of it is only to pass on."""
        self.not_idle()
        for end in list(self.ends.values()):
            self.forget(end.id)
            if self.client_side and end.incoming.ended:
                continue
            end.incoming.abandon()
            end.owner.on_reset(end, None)


def goaway(peer: H2Peer, code: int = ErrorCodes.NO_ERROR) -> None:
    """Tell the peer nothing more will be served (its streams end here), and close."""
    if peer.closed or peer.session is None:
        return
    peer.closed = True
    peer.drop_streams()
    if peer._in_codec:
        asyncio.get_running_loop().call_soon(_send_last, peer, code)
    else:
        _send_last(peer, code)


def _send_last(peer: H2Peer, code: int) -> None:
    peer.write_paused = False  # the GOAWAY goes out whatever is owed: the close waits for it
    if not code:
        peer.flush()  # answers already given go before the GOAWAY (a strict client reads none after it)
    peer.session.terminate(code)
    peer.flush()
    linger(peer.transport)


def linger(transport: asyncio.Transport) -> None:
    """Close after the peer has had what we wrote: our FIN follows it, and what the peer still
    sends is read and dropped until its own FIN (closing with unread bytes would make the kernel
    reset the connection and drop our GOAWAY). A peer that neither reads nor ends is aborted
    after CLOSE_GRACE_S."""
    if transport is None or transport.is_closing():
        return
    try:
        transport.resume_reading()
        transport.write_eof()
    except (OSError, NotImplementedError, RuntimeError):  # the peer is gone already, or no half-close
        transport.close()
    asyncio.get_running_loop().call_later(CLOSE_GRACE_S, transport.abort)


_last_logged: dict[Flood, list] = {}  # flood -> [when last logged, how many since]


def log_flood(peer: H2Peer, flood: Flood) -> None:
    """Rate-limited: a flood is someone's attack or bug, and must not flood the log too."""
    now = time.monotonic()
    entry = _last_logged.setdefault(flood, [float("-inf"), 0])
    entry[1] += 1
    if now - entry[0] >= LOG_EVERY_S:
        where = peer.transport.get_extra_info("peername") if peer.transport is not None else None
        log.warning("HTTP/2 %s %s over its budget (%s): GOAWAY ENHANCE_YOUR_CALM (%d such in the last %.0f s)",
                    "endpoint" if peer.client_side else "client", where, flood.value, entry[1], LOG_EVERY_S)
        entry[0], entry[1] = now, 0
