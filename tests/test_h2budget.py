"""The HTTP/2 flood defences as a pure core: frame headers and a clock in, a Flood or None out."""

import pytest

from nodeagent.proxy import h2budget as b
from nodeagent.proxy.h2budget import Flood, FrameBudget, TokenBucket

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind: int, flags: int = 0, stream: int = 0, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def scan_all(budget: FrameBudget, data: bytes, step: int | None = None):
    """Every answer, feeding `data` whole or `step` bytes at a time."""
    if step is None:
        return [budget.scan(data)]
    return [budget.scan(data[at:at + step]) for at in range(0, len(data), step)]


@pytest.mark.parametrize("step", [None, 1, 2, 7, 9, 10, 17, 4096])
def test_frames_are_found_however_the_bytes_are_cut(step):
    """The same verdict whatever the reads' boundaries: the 1,001st RST_STREAM is the flood."""
    clock = Clock()
    budget = FrameBudget(clock, preface=True)
    resets = b"".join(frame(b.HEADERS, 0x5, 2 * n + 1, b"\x82\x84") + frame(b.RST_STREAM, 0, 2 * n + 1, b"\0\0\0\x08")
                      for n in range(b.RESET_BURST))
    ok = PREFACE + frame(b.SETTINGS, 0, 0, b"\0\x03\0\0\0\x64") + frame(b.DATA, 0, 1, b"x" * 40000) + resets
    assert set(scan_all(budget, ok, step)) == {None}
    assert Flood.RESETS in scan_all(budget, frame(b.RST_STREAM, 0, 3, b"\0\0\0\x08"), step)


def test_resets_refill_at_their_rate():
    clock = Clock()
    budget = FrameBudget(clock)
    rst = frame(b.RST_STREAM, 0, 1, b"\0\0\0\x08")
    assert budget.scan(rst * b.RESET_BURST) is None
    clock.now += 1.0
    assert budget.scan(rst * int(b.RESET_RATE)) is None
    assert budget.scan(rst) is Flood.RESETS


def test_pings_unread_are_bounded_and_read_ones_only_by_rate():
    clock = Clock()
    ping = frame(b.PING, 0, 0, b"12345678")
    budget = FrameBudget(clock)
    for _ in range(b.MAX_UNREAD_CONTROL):
        assert budget.scan(ping) is None
    assert budget.scan(ping) is Flood.UNREAD_CONTROL  # the peer reads none of our answers
    budget = FrameBudget(clock)
    for n in range(b.PING_BURST + 3 * int(b.PING_RATE)):
        if n % 100 == 0:
            budget.drained()  # it reads them
            clock.now += 0.1
        assert budget.scan(ping) is None, n
    assert budget.scan(ping * int(b.PING_BURST)) is Flood.PING
    assert FrameBudget(clock).scan(frame(b.PING, b.ACK, 0, b"12345678") * 5000) is None  # answers to ours


def test_settings_by_rate_and_by_size():
    clock = Clock()
    settings = frame(b.SETTINGS, 0, 0, b"\0\x04\0\0\xff\xff")
    budget = FrameBudget(clock)
    assert budget.scan(settings * b.SETTINGS_BURST) is None
    assert budget.scan(settings) is Flood.SETTINGS
    assert FrameBudget(clock).scan(frame(b.SETTINGS, 0, 0, b"\0\x04\0\0\xff\xff" * 33)) is Flood.SETTINGS
    assert FrameBudget(clock).scan(frame(b.SETTINGS, 0, 0, b"\0\x04\0\0\xff\xff" * 32)) is None
    assert FrameBudget(clock).scan(frame(b.SETTINGS, b.ACK) * 1000) is None


@pytest.mark.parametrize("empty", [frame(b.DATA, 0, 1), frame(b.CONTINUATION, 0, 1), frame(b.HEADERS, 0, 1)])
def test_a_second_empty_frame_in_a_row_is_a_flood(empty):
    budget = FrameBudget(Clock())
    data = frame(b.DATA, 0, 1, b"x")
    assert budget.scan(empty + data + empty + data + empty) is None  # never two in a row
    assert budget.scan(empty) is Flood.EMPTY_FRAMES


def test_an_empty_frame_that_ends_its_stream_is_not_empty():
    assert FrameBudget(Clock()).scan(frame(b.DATA, b.END_STREAM, 1) * 10) is None


def test_priority_and_window_updates_grow_with_streams_and_data_sent():
    budget = FrameBudget(Clock())
    priority = frame(b.PRIORITY, 0, 1, b"\0\0\0\0\x10")
    assert budget.scan(priority * b.PRIORITY_PER_STREAM) is None
    assert budget.scan(priority) is Flood.PRIORITY
    budget = FrameBudget(Clock())
    budget.streams = 4
    assert budget.scan(priority * (5 * b.PRIORITY_PER_STREAM)) is None
    update = frame(b.WINDOW_UPDATE, 0, 0, b"\0\0\x40\0")
    budget = FrameBudget(Clock())
    budget.streams, budget.data_sent = 2, 3
    allowed = 5 + 2 * (2 + b.WINDOW_UPDATES_PER_DATA_SENT * 3)
    assert budget.scan(update * allowed) is None
    assert budget.scan(update) is Flood.WINDOW_UPDATE


def test_a_header_block_is_bounded_across_its_continuations():
    budget = FrameBudget(Clock())
    chunk = b"h" * 16384
    start = frame(b.HEADERS, 0, 1, chunk)
    more = frame(b.CONTINUATION, 0, 1, chunk)
    assert budget.scan(start + more * 4) is None  # 80 KiB: at the limit
    assert budget.scan(more) is Flood.HEADER_BLOCK
    budget = FrameBudget(Clock())
    ended = frame(b.CONTINUATION, b.END_HEADERS, 1, chunk)
    assert budget.scan((start + ended) * 20) is None  # many blocks, each small enough


def test_token_bucket():
    bucket = TokenBucket(2, 1.0, 0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [True, True, False]
    assert bucket.take(0.5) is False and bucket.take(1.0) is True
    assert [bucket.take(100.0) for _ in range(3)] == [True, True, False]  # never above the burst
