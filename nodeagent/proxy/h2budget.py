"""What one HTTP/2 peer may make the proxy do: the flood defences of every HTTP/2 connection
(the client's, the pooled ones to endpoints, an inbound refusal), as a pure core.

`FrameBudget` reads the frame headers of the bytes a peer sends, before any codec decodes
them, and answers with the `Flood` the peer went over, or None; the connection then sends
GOAWAY ENHANCE_YOUR_CALM and closes (h2peer.py). No asyncio: the clock is passed in.

The numbers, and where they come from (Envoy's http2_protocol_options defaults, nghttp2's
session options; both close with ENHANCE_YOUR_CALM, as here):

- Control answers the peer has not read (PING and SETTINGS we must acknowledge, counted while
  our write buffer toward it is not empty): at most 1,000 (nghttp2's max_outbound_ack 1,000;
  Envoy's max_outbound_control_frames 1,000). This is what stops a PING flood from a client
  that never reads: 1,000 answers are 17 KB.
- PING: a burst of 1,000, then 1,000 a second (generous: gRPC keepalives are minutes apart and
  BDP probes one per round trip; neither Envoy nor nghttp2 limits a peer that reads its answers,
  this caps the CPU one connection's pings can take).
- SETTINGS: a burst of 100, then 10 a second, at most 32 entries each (nghttp2's max_settings
  32; a legitimate peer sends a handful per connection).
- Empty DATA, HEADERS or CONTINUATION frames without END_STREAM: at most 1 in a row (Envoy's
  max_consecutive_inbound_frames_with_empty_payload 1: they cost us a frame's work, the peer
  nothing).
- PRIORITY: at most 100 per stream opened, plus 100 (Envoy's
  max_inbound_priority_frames_per_stream 100, counted the same way).
- WINDOW_UPDATE: at most 5 + 2 x (streams opened + 10 x DATA frames we sent) (Envoy's
  max_inbound_window_update_frames_per_data_frame_sent 10, in Envoy's formula).
- RST_STREAM from the peer (rapid reset, CVE-2023-44487): a burst of 1,000, then 33 a second
  (nghttp2's stream reset rate limit defaults since 1.57, backported to Debian's 1.52).
- A header block (HEADERS or PUSH_PROMISE and its CONTINUATIONs) over MAX_HEADER_BLOCK bytes
  (the CONTINUATION flood, CVE-2024-27316/28182): compressed, a block of fields under the
  decoded limit is never larger than the limit plus a frame.
"""

import enum

PREFACE_LENGTH = 24  # the client's "PRI * HTTP/2.0..." before its first frame
FRAME_HEADER = 9

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4

MAX_UNREAD_CONTROL = 1000
PING_BURST, PING_RATE = 1000, 1000.0
SETTINGS_BURST, SETTINGS_RATE = 100, 10.0
MAX_SETTINGS_ENTRIES = 32
MAX_CONSECUTIVE_EMPTY = 1
PRIORITY_PER_STREAM = 100
WINDOW_UPDATES_PER_DATA_SENT = 10
RESET_BURST, RESET_RATE = 1000, 33.0
MAX_HEADER_LIST = 64 * 1024  # decoded (RFC 9113's size: names, values, 32 bytes each); as HTTP/1's head
MAX_HEADER_BLOCK = MAX_HEADER_LIST + 16 * 1024


class Flood(enum.Enum):
    """Why a peer was told to calm down; the values are metric labels."""

    UNREAD_CONTROL = "unread_control"
    PING = "ping"
    SETTINGS = "settings"
    EMPTY_FRAMES = "empty_frames"
    PRIORITY = "priority"
    WINDOW_UPDATE = "window_update"
    RESETS = "resets"
    HEADER_BLOCK = "header_block"
    STREAMS = "streams"  # a stream over the concurrency limit, refused (not from the scanner)
    HEADERS_HELD = "headers_held"  # a stream whose headers the connection could not hold, refused
    CODEC = "codec_limit"  # one of nghttp2's own limits, where ours did not trip first


class TokenBucket:
    """`burst` at once, then `rate` a second."""

    __slots__ = ("burst", "rate", "tokens", "at")

    def __init__(self, burst: int, rate: float, now: float):
        self.burst, self.rate, self.tokens, self.at = burst, rate, float(burst), now

    def take(self, now: float) -> bool:
        tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if tokens < 1:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1
        return True


class FrameBudget:
    """One connection's inbound frames against the limits above. `scan` takes the bytes as
    they arrive (frames may straddle reads); `preface` says a client preface comes first."""

    __slots__ = ("clock", "_preface", "_head", "_skip", "_in_block", "_block", "streams", "data_sent",
                 "unread_control", "_empty", "_priorities", "_window_updates", "_pings", "_settings", "_resets")

    def __init__(self, clock, preface: bool = False):
        now = clock()
        self.clock = clock
        self._preface = PREFACE_LENGTH if preface else 0
        self._head = b""  # a frame header cut by the end of a read
        self._skip = 0  # payload bytes of the current frame still to come
        self._in_block = False  # a header block waits for its CONTINUATIONs
        self._block = 0
        self.streams = 0  # streams opened on this connection (either side): allowances grow with them
        self.data_sent = 0  # DATA frames we sent
        self.unread_control = 0
        self._empty = self._priorities = self._window_updates = 0
        self._pings = TokenBucket(PING_BURST, PING_RATE, now)
        self._settings = TokenBucket(SETTINGS_BURST, SETTINGS_RATE, now)
        self._resets = TokenBucket(RESET_BURST, RESET_RATE, now)

    def drained(self) -> None:
        """Our write buffer toward the peer is empty: it has read every answer we owed."""
        self.unread_control = 0

    def scan(self, data) -> Flood | None:
        at, size = 0, len(data)
        if self._preface:
            at = min(self._preface, size)
            self._preface -= at
        if self._skip:
            step = min(self._skip, size - at)
            self._skip -= step
            at += step
        if self._head:
            take = FRAME_HEADER - len(self._head)
            head = self._head + bytes(data[at:at + take])
            if len(head) < FRAME_HEADER:
                self._head = head
                return None
            self._head, at = b"", at + take
            length = int.from_bytes(head[:3], "big")
            over = self._frame(length, head[3], head[4])
            if over is not None:
                return over
            step = min(length, size - at)
            self._skip, at = length - step, at + step
        while at + FRAME_HEADER <= size:
            length = int.from_bytes(data[at:at + 3], "big")
            over = self._frame(length, data[at + 3], data[at + 4])
            if over is not None:
                return over
            at += FRAME_HEADER
            step = min(length, size - at)
            self._skip, at = length - step, at + step
        if at < size:
            self._head = bytes(data[at:])
        return None

    def _frame(self, length: int, kind: int, flags: int) -> Flood | None:
        if kind <= HEADERS or kind == CONTINUATION:
            if length == 0 and (kind == CONTINUATION or not flags & END_STREAM):
                self._empty += 1
                if self._empty > MAX_CONSECUTIVE_EMPTY:
                    return Flood.EMPTY_FRAMES
            elif length:
                self._empty = 0
            if kind != DATA:
                return self._header_block(length, kind, flags)
            return None
        if kind == PING:
            if flags & ACK:
                return None
            self.unread_control += 1
            if self.unread_control > MAX_UNREAD_CONTROL:
                return Flood.UNREAD_CONTROL
            return None if self._pings.take(self.clock()) else Flood.PING
        if kind == SETTINGS:
            if flags & ACK:
                return None
            self.unread_control += 1
            if self.unread_control > MAX_UNREAD_CONTROL:
                return Flood.UNREAD_CONTROL
            if length // 6 > MAX_SETTINGS_ENTRIES or not self._settings.take(self.clock()):
                return Flood.SETTINGS
            return None
        if kind == WINDOW_UPDATE:
            self._window_updates += 1
            allowed = 5 + 2 * (self.streams + WINDOW_UPDATES_PER_DATA_SENT * self.data_sent)
            return Flood.WINDOW_UPDATE if self._window_updates > allowed else None
        if kind == RST_STREAM:
            return None if self._resets.take(self.clock()) else Flood.RESETS
        if kind == PRIORITY:
            self._priorities += 1
            return Flood.PRIORITY if self._priorities > PRIORITY_PER_STREAM * (1 + self.streams) else None
        if kind == PUSH_PROMISE:
            return self._header_block(length, kind, flags)
        return None

    def _header_block(self, length: int, kind: int, flags: int) -> Flood | None:
        self._block = self._block + length if kind == CONTINUATION and self._in_block else length
        self._in_block = not flags & END_HEADERS
        return Flood.HEADER_BLOCK if self._block > MAX_HEADER_BLOCK else None
