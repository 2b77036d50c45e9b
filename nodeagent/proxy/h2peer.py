"""HTTP/2 connections of the proxy: the h2 state machine (sans-IO) behind an asyncio
Protocol, and the flow-controlled forwarding of one stream's body to another connection.

Both ends of a proxied request are h2 streams on different connections (the client's,
and a pooled one to the endpoint). What arrives on one is acknowledged to its sender
(WINDOW_UPDATE) only once it has been sent on the other, so flow control holds end to
end: a receiver that stops reading stops the sender, and the proxy holds at most one
stream window (STREAM_WINDOW) per direction per stream, and one connection window
(CONNECTION_WINDOW) per connection, whatever the body's size.

Each stream is a `StreamEnd` on its connection; the events for it go to its `owner`
(the exchange that ties the two ends together, http2.py).

Every connection is under a budget (h2budget.py has the numbers): what we owe a peer (our
write buffer toward it) stays under WRITE_HIGH, because above it we stop reading from that
peer (so its PINGs and SETTINGS cannot make answers pile up) and stop sending it bodies (so
their senders are not acknowledged and wait); the frames a peer sends are counted before
they are decoded, and a peer over a flood limit gets GOAWAY ENHANCE_YOUR_CALM and is closed.
"""

import asyncio
import logging
import time
from collections import deque

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from nodeagent.proxy.h2budget import MAX_HEADER_LIST, Flood, FrameBudget

STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 1024 * 1024
REPLAY_MAX = 64 * 1024  # request body kept for a retry (linkerd2-proxy keeps 64 KiB too)
REPLAY_PER_CONNECTION = 1024 * 1024  # all the replay copies of one connection's requests
# What we owe one peer: above WRITE_HIGH in our write buffer toward it, we stop reading it
# and stop sending it bodies, until the buffer is down to WRITE_LOW.
WRITE_HIGH, WRITE_LOW = 256 * 1024, 64 * 1024
FLUSH_AT = 64 * 1024  # body bytes encoded before they are written out (so the pause can act)
CLOSE_GRACE_S = 5.0  # a closed connection whose peer does not read what is left is aborted
ENHANCE_YOUR_CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
LOG_EVERY_S = 10.0  # one line per flood kind per interval; the metric counts every one

log = logging.getLogger(__name__)


class Forward:
    """The body of one stream (then its trailers or its end), from the connection it
    arrives on (`src`) to the stream it leaves by (`attach`). Until attached, what arrives
    waits here, unacknowledged (so at most a stream window of it)."""

    __slots__ = ("src", "src_id", "pending", "ended", "trailers", "dst", "dst_id", "done", "sent", "sent_size",
                 "on_done")

    def __init__(self, src: "H2Peer", src_id: int, keep_for_replay: bool = False):
        self.src, self.src_id = src, src_id
        self.pending: deque = deque()  # [bytes, flow-controlled bytes still to acknowledge]
        self.ended = False
        self.trailers: list | None = None
        self.dst: "H2Peer | None" = None
        self.dst_id = 0
        self.done = False  # the end (or the trailers) was sent
        self.sent: list | None = [] if keep_for_replay else None  # what was sent, for a retry
        self.sent_size = 0
        self.on_done = None

    def push(self, data: bytes, flow_controlled: int) -> None:
        if self.done:  # abandoned: nothing goes anywhere
            if flow_controlled:
                self.src.acknowledge(flow_controlled, self.src_id)
        elif data:
            self.pending.append([data, flow_controlled])
        elif flow_controlled:
            self.src.acknowledge(flow_controlled, self.src_id)  # padding only
        self.pump()

    def finish(self, trailers: list | None = None) -> None:
        self.ended, self.trailers = True, trailers
        self.pump()

    def attach(self, dst: "H2Peer", dst_id: int) -> None:
        self.dst, self.dst_id = dst, dst_id
        self.pump()

    def detach(self) -> None:
        self.dst = None

    def replayable(self) -> bool:
        return self.sent is not None

    def forget_replay(self) -> None:
        if self.sent is not None:
            self.src.replay_held -= self.sent_size
            self.sent = None

    def rewind(self) -> None:
        """Send everything again, to another stream (a retry): what was already sent
        comes first, and is not acknowledged twice."""
        self.pending.extendleft([piece, 0] for piece in reversed(self.sent))
        self.src.replay_held -= self.sent_size
        self.sent, self.sent_size = [], 0
        self.dst, self.done = None, False

    def pump(self) -> None:
        """Send what the destination's windows allow; acknowledge what was sent."""
        dst = self.dst
        if dst is None or self.done or dst.closed:
            return
        conn = dst.conn
        acknowledged = 0
        try:
            while self.pending:
                if dst.write_paused:
                    break  # resumed when the peer has read what we owe it (resume_writing)
                entry = self.pending[0]
                window = min(conn.local_flow_control_window(self.dst_id), conn.max_outbound_frame_size)
                if window <= 0:
                    break
                data = entry[0]
                piece = data if len(data) <= window else data[:window]
                last = len(piece) == len(data)
                # The body's last bytes carry the end themselves: one frame less per message.
                ends = last and self.ended and not self.trailers and len(self.pending) == 1
                conn.send_data(self.dst_id, piece, end_stream=ends)
                dst.sent_data(len(piece))
                self.done = ends
                if self.sent is not None:
                    self.sent_size += len(piece)
                    self.src.replay_held += len(piece)
                    if self.sent_size > REPLAY_MAX or self.src.replay_held > REPLAY_PER_CONNECTION:
                        self.forget_replay()  # too much to keep: this request cannot be retried
                    else:
                        self.sent.append(piece)
                if last:
                    self.pending.popleft()
                    acknowledged += entry[1]
                else:
                    entry[0] = data[window:]
                    share = min(len(piece), entry[1])
                    entry[1] -= share
                    acknowledged += share
            if not self.pending and self.ended and not self.done:
                if self.trailers:
                    conn.send_headers(self.dst_id, self.trailers, end_stream=True)
                else:
                    conn.end_stream(self.dst_id)
                self.done = True
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.abandon()  # the destination stream was reset meanwhile: its owner hears of it
            return
        finally:
            if acknowledged:
                self.src.acknowledge(acknowledged, self.src_id)
            dst.flush_soon()
        if self.done and self.on_done is not None:
            self.on_done()

    def abandon(self) -> None:
        """Nothing more goes anywhere: give the sender its window back."""
        owed = sum(entry[1] for entry in self.pending)
        self.pending.clear()
        self.done = True
        self.forget_replay()
        if owed:
            self.src.acknowledge(owed, self.src_id)


class StreamEnd:
    """One stream as one connection sees it. `incoming` is its body as it arrives;
    `outgoing`, once set, is the other end's body being sent here."""

    __slots__ = ("peer", "id", "owner", "incoming", "outgoing")

    def __init__(self, peer: "H2Peer", stream_id: int, owner, keep_for_replay: bool = False):
        self.peer, self.id, self.owner = peer, stream_id, owner
        self.incoming = Forward(peer, stream_id, keep_for_replay)
        self.outgoing: Forward | None = None

    def reset(self, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        self.peer.reset(self.id, code)


class H2Peer(asyncio.Protocol):
    """One HTTP/2 connection. Subclasses say which side they are and what a new
    request (server side) means; `ends` route every stream's events to its owner."""

    client_side = False
    # What arrives from clients is checked (a malformed request is the client's error, not
    # forwarded); what endpoints answer passes as it came, for the client's own HTTP/2 stack
    # to judge (checking it again cost 5-10% of the proxy's time per request).
    validate_inbound = True
    idle_s = 60.0  # a connection with no stream for this long is closed (GOAWAY)

    def __init__(self, max_concurrent_streams: int | None = None, report=None):
        config = h2.config.H2Configuration(client_side=self.client_side, header_encoding=None,
                                           validate_inbound_headers=self.validate_inbound,
                                           normalize_inbound_headers=self.validate_inbound,
                                           validate_outbound_headers=False, normalize_outbound_headers=False)
        self.conn = h2.connection.H2Connection(config)
        settings = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                    h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST}
        if max_concurrent_streams is not None:
            settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = max_concurrent_streams
        if self.client_side:
            settings[h2.settings.SettingCodes.ENABLE_PUSH] = 0  # a pushed response would have no client to go to
        self.conn.local_settings = h2.settings.Settings(client=self.client_side, initial_values=settings)
        self.ends: dict[int, StreamEnd] = {}
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.going_away = False  # GOAWAY received: no new streams here
        self._flush_pending = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self.bytes_written = 0  # for the client connection's byte counters (Http2Server)
        self.budget = FrameBudget(time.monotonic, preface=not self.client_side)
        self.report = report  # report(Flood): counts a refusal against the pod
        self.write_paused = False
        self.unflushed = 0  # body bytes encoded since the last write
        self.replay_held = 0  # bytes of this connection's request bodies kept for retries

    def connection_made(self, transport):
        self.transport = transport
        self.start()

    def start(self) -> None:
        """Send our preface and SETTINGS."""
        self.transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def data_received(self, data):
        if self.closed:
            return
        if not self.transport.get_write_buffer_size():
            self.budget.drained()
        flood = self.budget.scan(data)
        if flood is not None:
            self.calm(flood)
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            self.protocol_error(e)  # h2 has queued a GOAWAY with the reason
            self.flush()
            self.transport.close()
            return
        for event in events:
            if self.closed:
                break  # a GOAWAY of ours: nothing more is served
            self._dispatch(event)
        self.flush()

    def _dispatch(self, event) -> None:
        kind = type(event)
        end = self.ends.get(getattr(event, "stream_id", 0) or 0)
        if kind is h2.events.DataReceived:
            if end is None:
                self.acknowledge(event.flow_controlled_length, event.stream_id)
            else:
                end.incoming.push(event.data, event.flow_controlled_length)
        elif kind is h2.events.RequestReceived:
            self.on_request(event.stream_id, event.headers, event.stream_ended is not None)
        elif kind is h2.events.ResponseReceived:
            if end is not None:
                end.owner.on_response(end, event.headers, event.stream_ended is not None)
        elif kind is h2.events.InformationalResponseReceived:
            if end is not None:
                end.owner.on_informational(end, event.headers)
        elif kind is h2.events.TrailersReceived:
            if end is not None:
                end.incoming.trailers = event.headers  # StreamEnded follows
        elif kind is h2.events.StreamEnded:
            if end is not None:
                end.incoming.finish(end.incoming.trailers)
        elif kind is h2.events.StreamReset:
            if end is not None:
                self.forget(end.id)
                end.incoming.abandon()
                end.owner.on_reset(end, event.error_code)
        elif kind is h2.events.WindowUpdated:
            if event.stream_id == 0:
                self._wake_all()
            elif end is not None and end.outgoing is not None:
                end.outgoing.pump()
        elif kind is h2.events.RemoteSettingsChanged:
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                self._wake_all()
        elif kind is h2.events.ConnectionTerminated:
            self.going_away = True
            self.on_goaway(event.last_stream_id)

    def _wake_all(self) -> None:
        for end in list(self.ends.values()):
            if end.outgoing is not None:
                end.outgoing.pump()

    # --- what subclasses decide ---

    def on_request(self, stream_id: int, headers: list, ended: bool) -> None:
        self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)  # a server never gets one

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
            self._wake_all()

    def sent_data(self, size: int) -> None:
        """A DATA frame was encoded (a body's bytes leave by this connection)."""
        self.budget.data_sent += 1
        self.unflushed += size
        if self.unflushed >= FLUSH_AT:
            self.flush()  # into the transport now: it says when to pause

    def calm(self, flood: Flood) -> None:
        """The peer went over a flood limit: GOAWAY ENHANCE_YOUR_CALM, close, and drop every
        stream at once (their other ends are cancelled: nothing more is done for this peer)."""
        log_flood(self, flood)
        if self.report is not None:
            self.report(flood)
        goaway(self, ENHANCE_YOUR_CALM)

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
            self.conn.acknowledge_received_data(size, stream_id)
            self.flush_soon()

    def reset(self, stream_id: int, code: int) -> None:
        end = self.ends.get(stream_id)
        self.forget(stream_id)
        if end is not None:
            end.incoming.abandon()
        if self.closed:
            return
        try:
            self.conn.reset_stream(stream_id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass  # already closed both ways
        self.flush_soon()

    def send_headers(self, stream_id: int, headers: list, end_stream: bool = False) -> bool:
        """False if the stream was gone (reset meanwhile)."""
        if self.closed:
            return False
        try:
            self.conn.send_headers(stream_id, headers, end_stream=end_stream)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return False
        self.flush_soon()
        return True

    def flush_soon(self) -> None:
        """Write what h2 has queued, once per event-loop turn (so a burst of frames is one write)."""
        if not self._flush_pending and not self.closed:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_pending = False
        self.unflushed = 0
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.bytes_written += len(data)
            self.transport.write(data)

    def connection_lost(self, exc):
        self.closed = True
        self.drop_streams()

    def drop_streams(self) -> None:
        self.not_idle()
        for end in list(self.ends.values()):
            self.forget(end.id)
            end.incoming.abandon()
            end.owner.on_reset(end, None)


def goaway(peer: H2Peer, code: int = h2.errors.ErrorCodes.NO_ERROR) -> None:
    """Tell the peer nothing more will be served (its streams end here), and close."""
    if peer.closed:
        return
    try:
        peer.conn.close_connection(error_code=code)
    except h2.exceptions.ProtocolError:
        pass
    peer.flush()
    peer.closed = True
    peer.drop_streams()
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
        log.warning("HTTP/2 %s %s over its budget (%s): GOAWAY ENHANCE_YOUR_CALM (%d such in %.0f s)",
                    "endpoint" if peer.client_side else "client", where, flood.value, entry[1], LOG_EVERY_S)
        entry[0], entry[1] = now, 0
