"""Opaque forwarding: two transports spliced by a pair of Protocols.

Bytes are handed from one transport to the other untouched (no per-byte
work); flow control is the peer's: when one side's write buffer fills, the
other side stops reading. Half-close is honoured: an EOF from one side is
passed on, and the pair closes once both sides have sent theirs. A reset on
one side resets the other.
"""

import asyncio
from collections.abc import Callable

READ_AHEAD_MAX = 256 * 1024  # bytes read ahead of a splice; then the client waits (TCP backpressure)


class Relay(asyncio.Protocol):
    def __init__(self, on_close: Callable[["Relay"], None] | None = None):
        self.transport: asyncio.Transport | None = None
        self.peer: "Relay | None" = None
        self.got_eof = False
        self.bytes_in = 0
        self._on_close = on_close
        self.on_forwarded: Callable[["Relay"], None] | None = None  # a kernel splice waits for our bytes
        self.eof_gate: Callable[[Callable[[], bool]], None] | None = None  # holds an EOF back until called

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.bytes_in += len(data)
        self.peer.transport.write(data)
        if self.on_forwarded is not None:
            self.on_forwarded(self)

    def eof_received(self):
        if self.eof_gate is not None:  # bytes of ours may still be on their way in the kernel
            self.eof_gate(self._pass_eof)
            return True
        return self._pass_eof()

    def _pass_eof(self) -> bool:
        self.got_eof = True
        peer = self.peer.transport
        if peer.is_closing():  # an EOF held back by a gate, overtaken by a close
            self.transport.close()
            return False
        if self.peer.got_eof or not peer.can_write_eof():
            self.transport.close()
            peer.close()
            return False
        peer.write_eof()
        return True  # keep our sending side open for the peer's remaining bytes

    def pause_writing(self):
        self.peer.transport.pause_reading()

    def resume_writing(self):
        self.peer.transport.resume_reading()
        if self.peer.on_forwarded is not None:
            self.peer.on_forwarded(self.peer)

    def connection_lost(self, exc):
        peer = self.peer.transport if self.peer else None
        if peer is not None and not peer.is_closing():
            if exc is not None:
                peer.abort()  # a reset is passed on as a reset
            else:
                peer.close()
        if self._on_close:
            self._on_close(self)


class Holding(asyncio.Protocol):
    """A connection waiting to be spliced: keeps what arrives so nothing is
    lost between connect and splice (a server that speaks first may already
    have spoken), and tells `on_event` when something did."""

    def __init__(self, on_event: Callable[[], None] | None = None):
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.lost = False
        self.on_event = on_event

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buffer += data
        if len(self.buffer) >= READ_AHEAD_MAX:
            self.transport.pause_reading()  # until the splice, which resumes it
        if self.on_event:
            self.on_event()

    def eof_received(self):
        self.eof = True
        if self.on_event:
            self.on_event()
        return True

    def connection_lost(self, exc):
        self.lost = True
        if self.on_event:
            self.on_event()


class IdleWatch:
    """Close a spliced pair once no byte has moved either way for `seconds` (checked every
    `seconds`, so after one to two of them). It compares the relays' byte counts (and the
    kernel's, for bytes a kernel splice carries), so the byte path pays nothing for it.
    `cancel()` when the pair closes: a pending check holds the pair (and its buffers) alive
    until it runs, which with the default hour was a leak of every closed connection."""

    __slots__ = ("pair", "seconds", "kernel_moved", "handle", "last")

    def __init__(self, pair: tuple[Relay, Relay], seconds: float, kernel_moved: Callable[[], int] | None = None):
        self.pair, self.seconds, self.kernel_moved = pair, seconds, kernel_moved
        self.last = self._moved()
        self.handle = asyncio.get_running_loop().call_later(seconds, self._check)

    def _moved(self) -> int:
        left, right = self.pair
        return left.bytes_in + right.bytes_in + (self.kernel_moved() if self.kernel_moved else 0)

    def _check(self) -> None:
        left, right = self.pair
        if left.transport.is_closing() or right.transport.is_closing():
            self.handle = None
            return
        now = self._moved()
        if now == self.last:
            self.handle = None
            left.transport.close()
            right.transport.close()
            return
        self.last = now
        self.handle = asyncio.get_running_loop().call_later(self.seconds, self._check)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.pair = self.kernel_moved = None


def splice_held(a: asyncio.Transport, a_held: bytes, a_eof: bool, b: Holding,
                on_close: Callable[[Relay], None] | None = None) -> tuple[Relay, Relay]:
    """Splice a client transport (with what was read from it) to a held upstream
    (with what it said), passing on EOFs that already arrived."""
    pair = splice(a, b.transport, a_first=a_held, b_first=bytes(b.buffer), on_close=on_close)
    b.buffer.clear()
    if a_eof:
        pair[0].eof_received()
    if b.eof:
        pair[1].eof_received()
    return pair


def splice(a: asyncio.Transport, b: asyncio.Transport, a_first: bytes = b"", b_first: bytes = b"",
           on_close: Callable[[Relay], None] | None = None) -> tuple[Relay, Relay]:
    """Join two live transports; `a_first` are bytes already read from a (sent to b first)."""
    left, right = Relay(on_close), Relay()
    left.peer, right.peer = right, left
    left.connection_made(a)
    right.connection_made(b)
    a.set_protocol(left)
    b.set_protocol(right)
    if a_first:
        left.data_received(a_first)
    if b_first:
        right.data_received(b_first)
    return left, right
