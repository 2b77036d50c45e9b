"""HTTP/2 floods against the proxy on loopback: real sockets, raw frames from a client that
misbehaves, the real sample h2c server behind (issue 13). Each attack ends with GOAWAY
ENHANCE_YOUR_CALM, counted; normal traffic (gRPC streaming, large bodies) never trips a limit.
The numbers are h2budget.py's."""

import socket
import threading
import time
from concurrent import futures

import pytest

from nodeagent.lab import workloads
from nodeagent.proxy import h2budget, h2peer, http2
from nodeagent.proxy.h2budget import Flood
from test_http2 import H2_PREFACE, frames, lt, start_app, start_proxy  # noqa: F401 (lt: the fixture)

PROTOCOL_ERROR = 0x1
ENHANCE_YOUR_CALM = 0xB
SETTINGS, PING, HEADERS, RST_STREAM, DATA, CONTINUATION, GOAWAY = 0x4, 0x6, 0x1, 0x3, 0x0, 0x9, 0x7
# HPACK, static table only: :method GET, :path /, :scheme http, :authority "test" (literal, not indexed).
GET = b"\x82\x84\x86\x01\x04test"
POST = b"\x83\x84\x86\x01\x04test"


def frame(kind: int, flags: int = 0, stream: int = 0, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def get(path: str) -> bytes:
    return b"\x82\x04" + bytes([len(path)]) + path.encode() + b"\x86\x01\x04test"


def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(10)
    sock.sendall(H2_PREFACE + frame(SETTINGS))
    return sock


def read_to_end(sock: socket.socket, close: bool = True) -> bytes:
    """Everything the proxy sends until it closes (a reset counts as the end, after what came)."""
    if close:
        sock.setblocking(True)
        sock.settimeout(10)
    received = bytearray()
    try:
        while chunk := sock.recv(1 << 20):
            received += chunk
    except ConnectionResetError:
        pass
    if close:
        sock.close()
    return bytes(received)


def goaway_codes(data: bytes) -> list[int]:
    return [int.from_bytes(payload[4:8], "big") for kind, _, payload in frames(data) if kind == GOAWAY]


class WriteBufferWatch:
    """The largest write buffer the proxy's client connection had, sampled every millisecond."""

    def __init__(self, lt, accepted):
        self.largest, self.lt, self.accepted, self.running = 0, lt, accepted, True
        lt.loop.call_soon_threadsafe(lambda: lt.loop.create_task(self._watch()))

    async def _watch(self):
        import asyncio
        while self.running:
            for server in self.accepted:
                if server.transport is not None:
                    self.largest = max(self.largest, server.transport.get_write_buffer_size())
            await asyncio.sleep(0.001)

    def stop(self) -> int:
        self.running = False
        return self.largest


def flood_without_reading(sock, data: bytes, until, seconds: float, pause_s: float = 0.0) -> int:
    """Send `data` again and again (whole frames: a partial send continues where it stopped),
    never reading, for up to `seconds` or until `until()`; how many copies went out."""
    sock.setblocking(False)
    view, offset, copies = memoryview(data), 0, 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not until():
        try:
            offset += sock.send(view[offset:])
        except BlockingIOError:
            time.sleep(0.005)  # the proxy is not reading us (paused, or gone)
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        if offset == len(data):
            offset, copies = 0, copies + 1
            time.sleep(pause_s)
    return copies


BOUND = h2peer.WRITE_HIGH + h2peer.FLUSH_AT


def closed(accepted) -> bool:
    """Whether the proxy's first accepted connection has closed (calmed down its peer)."""
    return bool(accepted) and accepted[0].closed


def test_a_ping_flood_from_a_client_that_never_reads(lt):
    port, target, accepted = start_proxy(lt, [start_app(lt)])
    sock = connect(port, rcvbuf=4096)
    watch = WriteBufferWatch(lt, accepted)
    flood_without_reading(sock, frame(PING, 0, 0, b"12345678") * 4096, lambda: closed(accepted), 10)
    assert watch.stop() <= BOUND
    assert goaway_codes(read_to_end(sock)) == [ENHANCE_YOUR_CALM]
    assert target.floods and set(target.floods) <= {Flood.PING, Flood.UNREAD_CONTROL}


def test_pings_under_the_rate_from_a_client_that_never_reads_end_at_the_unread_bound(lt):
    """At the allowed rate, answers still pile up if nobody reads them: 1,000 unread and out.
    (The proxy's socket buffer is made small so that the kernel does not hide the pile.)"""
    port, target, accepted = start_proxy(lt, [start_app(lt)])
    sock = connect(port, rcvbuf=4096)
    time.sleep(0.1)
    accepted[0].transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    watch = WriteBufferWatch(lt, accepted)
    per_batch = 50
    flood_without_reading(sock, frame(PING, 0, 0, b"12345678") * per_batch, lambda: closed(accepted), 20,
                          pause_s=per_batch / h2budget.PING_RATE * 1.2)
    assert watch.stop() <= BOUND
    assert goaway_codes(read_to_end(sock)) == [ENHANCE_YOUR_CALM]
    assert target.floods == [Flood.UNREAD_CONTROL]


def test_a_settings_flood(lt):
    port, target, _ = start_proxy(lt, [start_app(lt)])
    sock = connect(port)
    sock.sendall(frame(SETTINGS, 0, 0, b"\x00\x04\x00\x01\x00\x00") * (h2budget.SETTINGS_BURST + 10))
    assert goaway_codes(read_to_end(sock)) == [ENHANCE_YOUR_CALM]
    assert target.floods == [Flood.SETTINGS]


def test_rapid_reset_is_bounded_and_goawayed(lt):
    """20,000 HEADERS+RST_STREAM pairs: the endpoint sees a bounded number of streams, the
    connection is closed with ENHANCE_YOUR_CALM."""
    port, target, accepted = start_proxy(lt, [start_app(lt)])
    sock = connect(port)
    pairs = b"".join(frame(HEADERS, 0x5, 2 * n + 1, GET) + frame(RST_STREAM, 0, 2 * n + 1, b"\x00\x00\x00\x08")
                     for n in range(20000))
    reader = futures.ThreadPoolExecutor(1).submit(read_to_end, sock, False)
    try:
        sock.sendall(pairs)
        sock.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed by the proxy before all was sent
    received = reader.result(15)
    sock.close()
    assert goaway_codes(received) == [ENHANCE_YOUR_CALM]
    assert target.floods == [Flood.RESETS]
    time.sleep(0.2)
    opened = sum(conn.budget.streams for conns in target.pool._conns.values() for conn in conns)
    assert opened <= len(target.chosen) <= h2budget.RESET_BURST + http2.MAX_CONCURRENT_STREAMS
    assert accepted[0].closed and not accepted[0].exchanges


def test_empty_frames_and_endless_continuations(lt):
    port, target, _ = start_proxy(lt, [start_app(lt)])
    sock = connect(port)
    sock.sendall(frame(HEADERS, 0x4, 1, POST) + frame(DATA, 0, 1) * 3)
    assert goaway_codes(read_to_end(sock)) == [ENHANCE_YOUR_CALM]
    sock = connect(port)
    sock.sendall(frame(HEADERS, 0, 1, GET))
    try:
        for _ in range(8):
            sock.sendall(frame(CONTINUATION, 0, 1, b"\x40\x01a\x01b" * 4000))  # 20 KB each, never the end
    except (BrokenPipeError, ConnectionResetError):
        pass
    # Whichever defence sees it first ends the connection: ours, on the block's compressed size
    # (when the frames arrive in one read), or nghttp2's, on the decoded header list (each
    # 20 KB frame decodes to 136 KB of fields, over the 64 KiB list limit) when the reads split.
    codes = goaway_codes(read_to_end(sock))
    assert codes in ([ENHANCE_YOUR_CALM], [PROTOCOL_ERROR]), codes
    assert target.floods[0] == Flood.EMPTY_FRAMES
    assert target.floods[1:] == ([Flood.HEADER_BLOCK] if codes == [ENHANCE_YOUR_CALM] else [])


def test_streams_over_the_concurrency_limit_never_reach_the_endpoint(lt):
    seen = []

    class Counting(workloads.H2cServer):
        def data_received(self, data):
            super().data_received(data)
            seen.append(len(self.streams))

    port, target, accepted = start_proxy(lt, [start_app(lt, factory=Counting)])
    sock = connect(port)
    limit = http2.MAX_CONCURRENT_STREAMS
    sock.sendall(b"".join(frame(HEADERS, 0x5, 2 * n + 1, get("/delay/3000")) for n in range(limit + 20)))
    reply = b""
    sock.settimeout(5)
    while not any(kind in (GOAWAY, RST_STREAM) for kind, _, _ in frames(reply)):
        reply += sock.recv(65536)
    sock.close()
    time.sleep(0.3)
    assert max(seen, default=0) <= limit
    assert Flood.STREAMS in target.floods


def test_grpc_streaming_and_large_messages_never_trip_a_limit(lt):
    grpc = pytest.importorskip("grpc")

    def stream(requests, context):
        for request in requests:
            yield request

    handler = grpc.method_handlers_generic_handler("t.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(lambda request, context: request),
        "Stream": grpc.stream_stream_rpc_method_handler(stream)})
    server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.max_receive_message_length", 1 << 25),
                                                                 ("grpc.max_send_message_length", 1 << 25)])
    server.add_generic_rpc_handlers((handler,))
    app_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        port, target, _ = start_proxy(lt, [("127.0.0.1", app_port)])
        options = [("grpc.max_receive_message_length", 1 << 25), ("grpc.max_send_message_length", 1 << 25)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            messages = [bytes([n % 256]) * (1 + n * 37 % 3000) for n in range(3000)]
            replies = list(channel.stream_stream("/t.Echo/Stream")(iter(messages), timeout=60))
            assert replies == messages
            big = b"\x07" * (16 * 1024 * 1024)
            calls = [channel.unary_unary("/t.Echo/Unary").future(big, timeout=60) for _ in range(3)]
            assert all(call.result() == big for call in calls)
    finally:
        server.stop(0)
    assert target.floods == [] and target.errors == []


def test_the_rapid_reset_client_does_not_stop_another_connection(lt):
    """While one connection is GOAWAYed for resets, a well-behaved one on the same proxy is served."""
    port, target, _ = start_proxy(lt, [start_app(lt)])
    from h2_client import H2Client
    good = H2Client("127.0.0.1", port)
    sock = connect(port)
    done = threading.Event()

    def attack():
        try:
            sock.sendall(b"".join(frame(HEADERS, 0x5, 2 * n + 1, GET) + frame(RST_STREAM, 0, 2 * n + 1,
                                                                                 b"\x00\x00\x00\x08")
                                  for n in range(5000)))
        except OSError:
            pass
        done.set()
    threading.Thread(target=attack, daemon=True).start()
    responses = good.wait(*[good.request("GET", "/bytes/100") for _ in range(50)])
    assert [r.status for r in responses] == [200] * 50
    done.wait(10)
    good.close()
    assert goaway_codes(read_to_end(sock)) == [ENHANCE_YOUR_CALM]


def test_headers_held_by_a_connection_are_bounded(lt):
    """Request headers are kept for a stream's life (a retry sends them again): over the
    connection's bound a stream is refused (REFUSED_STREAM, which any client may retry), and
    nothing stays held once the streams are gone. The endpoint never answers here (a target
    whose connections never come), so the streams stay in flight."""
    import asyncio

    import hpack
    port, target, accepted = start_proxy(lt, [start_app(lt)])

    async def never(address):
        await asyncio.Event().wait()
    target.acquire_h2 = never
    sock = connect(port)
    block = hpack.Encoder().encode([(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"),
                                    (b":authority", b"test"), (b"x-big", b"h" * 60000)], huffman=False)
    chunks = [block[at:at + 16384] for at in range(0, len(block), 16384)]
    streams = 20
    for n in range(streams):
        sock.sendall(frame(HEADERS, 0x1, 2 * n + 1, chunks[0])
                     + b"".join(frame(CONTINUATION, 0x4 if c is chunks[-1] else 0, 2 * n + 1, c) for c in chunks[1:]))
    reply = b""
    admitted = http2.HEADERS_HELD_MAX // http2.header_list_size([(b"x-big", b"h" * 60000)])
    while sum(1 for kind, _, p in frames(reply) if kind == RST_STREAM) < streams - admitted:
        reply += sock.recv(65536)
    refused = [stream for kind, stream, p in frames(reply) if kind == RST_STREAM and p == b"\x00\x00\x00\x07"]
    assert len(refused) == streams - len(accepted[0].exchanges) > 0
    assert accepted[0].headers_held <= http2.HEADERS_HELD_MAX
    assert set(target.floods) == {Flood.HEADERS_HELD}
    sock.close()
    time.sleep(0.2)
    assert (accepted[0].headers_held, len(accepted[0].exchanges)) == (0, 0)


def test_replay_copies_held_by_a_connection_are_bounded(lt):
    from h2_client import H2Client
    port, target, accepted = start_proxy(lt, [start_app(lt)])
    client = H2Client("127.0.0.1", port, timeout=20)
    uploads = [client.request("POST", "/delay/500", body=b"u" * 60000) for _ in range(30)]
    time.sleep(0.3)

    async def held():
        return accepted[0].replay_held
    assert 0 < lt.run(held()) <= h2peer.REPLAY_PER_CONNECTION
    assert [r.status for r in client.wait(*uploads)] == [200] * 30
    assert lt.run(held()) == 0
    client.close()


def test_flood_refusals_are_counted_per_pod_and_forgotten_with_it():
    from types import SimpleNamespace

    from nodeagent.proxy.metrics import Metrics
    metrics = Metrics()
    pod = SimpleNamespace(info=SimpleNamespace(namespace="ns", name="a"), key="ns/a")
    metrics.http2_flood("outbound", pod, Flood.RESETS)
    metrics.http2_flood("outbound", pod, Flood.RESETS)
    value = metrics.registry.get_sample_value("http2_flood_total", {"direction": "outbound", "namespace": "ns",
                                                                    "pod": "a", "reason": "resets"})
    assert value == 2
    metrics.forget_pod("ns/a")
    assert metrics.registry.get_sample_value("http2_flood_total", {"direction": "outbound", "namespace": "ns",
                                                                   "pod": "a", "reason": "resets"}) is None
