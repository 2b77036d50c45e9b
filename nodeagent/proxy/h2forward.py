"""One stream's body on its way from one HTTP/2 connection to another, under both flow controls.

Both ends of a proxied request are streams on different connections (the client's, and a
pooled one to the endpoint). What arrives on one is acknowledged to its sender (WINDOW_UPDATE)
only once the other connection's codec has taken it for a DATA frame, so flow control holds end
to end: a receiver that stops reading stops the sender, and the proxy holds at most one stream
window per direction per stream, and one connection window per connection, whatever the body's
size. The codec pulls (`read`, from nghttp2's data provider) as its windows allow; `pump` tells
the destination there is something to pull.

No asyncio here: a `Forward` talks to its source (`acknowledge`, `replay_held`) and its
destination (`want_body`, `bodies`) only.
"""

from collections import deque

REPLAY_MAX = 64 * 1024  # request body kept for a retry (linkerd2-proxy keeps 64 KiB too)
REPLAY_PER_CONNECTION = 1024 * 1024  # all the replay copies of one connection's requests
CANCEL = 0x8


class Forward:
    """The body of one stream (then its trailers or its end), from the connection it arrives
    on (`src`) to the stream it leaves by (`attach`). Until attached, what arrives waits here,
    unacknowledged (so at most a stream window of it)."""

    __slots__ = ("src", "src_id", "pending", "ended", "trailers", "dst", "dst_id", "done", "sent", "sent_size",
                 "on_done")

    def __init__(self, src, src_id: int, keep_for_replay: bool = False):
        self.src, self.src_id = src, src_id
        # [bytes, offset of what is left, flow-controlled bytes still to acknowledge]
        self.pending: deque = deque()
        self.ended = False
        self.trailers: list | None = None
        self.dst = None
        self.dst_id = 0
        self.done = False  # the end (or the trailers) was handed to the codec
        self.sent: list | None = [] if keep_for_replay else None  # what was sent, for a retry
        self.sent_size = 0
        self.on_done = None

    def push(self, data: bytes, flow_controlled: int) -> None:
        if self.done:  # abandoned: nothing goes anywhere
            if flow_controlled:
                self.src.acknowledge(flow_controlled, self.src_id)
        elif data:
            self.pending.append([data, 0, flow_controlled])
        elif flow_controlled:
            self.src.acknowledge(flow_controlled, self.src_id)  # padding only
        self.pump()

    def finish(self, trailers: list | None = None) -> None:
        self.ended, self.trailers = True, trailers
        self.pump()

    def attach(self, dst, dst_id: int) -> None:
        self.dst, self.dst_id = dst, dst_id
        dst.bodies[dst_id] = self
        self.pump()

    def detach(self) -> None:
        if self.dst is not None and self.dst.bodies.get(self.dst_id) is self:
            del self.dst.bodies[self.dst_id]
        self.dst = None

    def replayable(self) -> bool:
        return self.sent is not None

    def forget_replay(self) -> None:
        if self.sent is not None:
            self.src.replay_held -= self.sent_size
            self.sent = None

    def rewind(self) -> None:
        """Send everything again, to another stream (a retry): what was already sent comes
        first, and is not acknowledged twice."""
        self.pending.extendleft([piece, 0, 0] for piece in reversed(self.sent))
        self.src.replay_held -= self.sent_size
        self.sent, self.sent_size = [], 0
        self.detach()
        self.done = False

    def pump(self) -> None:
        """Tell the destination there may be something to pull."""
        dst = self.dst
        if dst is not None and not self.done and not dst.closed:
            dst.want_body(self.dst_id)

    def read(self, length: int):
        """The codec asks for at most `length` bytes of a DATA frame: (bytes, whether this is
        the end, trailers to send after it), or (None, ...) when nothing is here yet."""
        if self.done:
            return None, False, None
        pending = self.pending
        if not pending:
            if not self.ended:
                return None, False, None
            return self._end(b"")
        entry = pending[0]
        data, offset = entry[0], entry[1]
        left = len(data) - offset
        if left <= length:
            piece = data[offset:] if offset else data
            pending.popleft()
            acknowledged = entry[2]
        else:
            piece = data[offset:offset + length]
            entry[1] = offset + length
            acknowledged = min(length, entry[2])
            entry[2] -= acknowledged
        if self.sent is not None:
            self.sent_size += len(piece)
            self.src.replay_held += len(piece)
            if self.sent_size > REPLAY_MAX or self.src.replay_held > REPLAY_PER_CONNECTION:
                self.forget_replay()  # too much to keep: this request cannot be retried
            else:
                self.sent.append(piece)
        if acknowledged:
            self.src.acknowledge(acknowledged, self.src_id)
        if not pending and self.ended:
            return self._end(piece)  # the body's last bytes carry the end: one frame less
        return piece, False, None

    def _end(self, piece: bytes):
        self.done = True
        if self.on_done is not None:
            self.on_done()
        return piece, True, self.trailers

    def abandon(self) -> None:
        """Nothing more goes anywhere: give the sender its window back."""
        owed = sum(entry[2] for entry in self.pending)
        self.pending.clear()
        self.done = True
        self.forget_replay()
        if owed:
            self.src.acknowledge(owed, self.src_id)


class StreamEnd:
    """One stream as one connection sees it. `incoming` is its body as it arrives;
    `outgoing`, once set, is the other end's body being sent here."""

    __slots__ = ("peer", "id", "owner", "incoming", "outgoing")

    def __init__(self, peer, stream_id: int, owner, keep_for_replay: bool = False):
        self.peer, self.id, self.owner = peer, stream_id, owner
        self.incoming = Forward(peer, stream_id, keep_for_replay)
        self.outgoing: Forward | None = None

    def reset(self, code: int = CANCEL) -> None:
        self.peer.reset(self.id, code)
