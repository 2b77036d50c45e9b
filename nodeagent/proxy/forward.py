"""The opaque-forward stage, for both directions: a client connection and its upstream (or
app) connection spliced, with a kernel splice if one was granted, an idle bound, and the
connection's byte counts settled once when it ends.

Per direction the proxy holds at most one read (uvloop reads up to 256 KiB at a time) plus
WRITE_HIGH_WATER queued toward the slower side: past that, the faster side is not read until
the slower one drains (TCP's own backpressure does the rest).
"""

import asyncio
from collections.abc import Callable

from nodeagent.proxy.relay import Holding, IdleWatch, Relay, splice_held

WRITE_HIGH_WATER = 64 * 1024


def forward(client: asyncio.Transport, held: bytes, client_eof: bool, upstream: Holding, *, idle_s: float,
            on_close: Callable[[int, int, int], None], kernel=None) -> tuple[Relay, Relay]:
    """Splice `client` (with `held`, what was read from it so far) to `upstream` (with what it
    said). `on_close(read, written, spliced)` once, when the pair is done: bytes from and to the
    client, and of those the ones a kernel splice carried past us. `kernel`: a KernelSplice
    requested before any byte was relayed (fastpath.request)."""
    watch: IdleWatch | None = None

    def closed(client_side: Relay) -> None:
        if watch is not None:
            watch.cancel()
        carried = kernel.end() if kernel is not None else {}
        read = client_side.bytes_in + carried.get(id(client_side), 0)
        written = client_side.peer.bytes_in + carried.get(id(client_side.peer), 0)
        on_close(read, written, sum(carried.values()))

    for transport in (client, upstream.transport):
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
    pair = splice_held(client, held, client_eof, upstream, on_close=closed)
    for transport, peer in ((client, upstream.transport), (upstream.transport, client)):
        if not transport.is_reading() and not transport.is_closing() and peer.get_write_buffer_size() < WRITE_HIGH_WATER:
            transport.resume_reading()  # read-ahead before the splice paused it: the relays' flow control takes over
    if kernel is not None:
        kernel.attach(pair)
    if not client.is_closing():
        watch = IdleWatch(pair, idle_s, kernel.moved if kernel is not None else None)
    return pair
