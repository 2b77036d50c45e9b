"""An open-loop HTTP/1.1 (or h2c) load generator: requests are due at a fixed rate
whether or not earlier ones have been answered, and latency is measured from
when each request was due (so a stall is not hidden by waiting for it:
no coordinated omission). Run inside a pod:

    python -m benchmarks.openloop HOST PORT --rate 1000 --seconds 5 --connections 32
    python -m benchmarks.openloop HOST PORT --rate 500 --seconds 5 --connections 4 --http2
prints JSON: sent, ok, errors, p50/p90/p99/max in ms. HTTP/1.1: one request in flight per
connection (a request waits for a free connection, and that wait counts). HTTP/2 (prior
knowledge): requests go round the connections as streams, as many at once as are due.
"""

import argparse
import asyncio
import json
import time

import uvloop
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, ResponseReceived, StreamEnded, StreamReset

REQUEST = b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n"


class Connection(asyncio.Protocol):
    """Keep-alive, one request in flight at a time (responses have a Content-Length)."""

    def __init__(self):
        self.buffer = b""
        self.waiter: asyncio.Future | None = None
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buffer += data
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = self.buffer[:head_end].lower()
        length_at = head.find(b"content-length:")
        length = int(head[length_at + 15:].split(b"\r\n", 1)[0]) if length_at >= 0 else 0
        if len(self.buffer) >= head_end + 4 + length:
            status = int(self.buffer[9:12])
            self.buffer = self.buffer[head_end + 4 + length:]
            if self.waiter and not self.waiter.done():
                self.waiter.set_result(status)

    def connection_lost(self, exc):
        if self.waiter and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("closed"))

    async def request(self) -> int:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(REQUEST)
        return await self.waiter


class Http2Connection(asyncio.Protocol):
    """h2c with prior knowledge; any number of streams at once."""

    HEADERS = [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "bench")]

    def __init__(self):
        self.h2 = H2Connection(H2Configuration(client_side=True))
        self.waiters: dict[int, asyncio.Future] = {}
        self.statuses: dict[int, int] = {}
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.h2.initiate_connection()
        transport.write(self.h2.data_to_send())

    def data_received(self, data):
        for event in self.h2.receive_data(data):
            if isinstance(event, ResponseReceived):
                self.statuses[event.stream_id] = int(dict(event.headers)[b":status"])
            elif isinstance(event, DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, (StreamEnded, StreamReset)):
                waiter = self.waiters.pop(event.stream_id, None)
                status = self.statuses.pop(event.stream_id, 599 if isinstance(event, StreamReset) else 0)
                if waiter and not waiter.done():
                    waiter.set_result(status)
        self.transport.write(self.h2.data_to_send())

    def connection_lost(self, exc):
        for waiter in self.waiters.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError("closed"))
        self.waiters.clear()

    async def request(self) -> int:
        if self.transport.is_closing():
            raise ConnectionError("closed")
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, self.HEADERS, end_stream=True)
        waiter = self.waiters[stream_id] = asyncio.get_running_loop().create_future()
        self.transport.write(self.h2.data_to_send())
        return await waiter


async def run(host: str, port: int, rate: float, seconds: float, connections: int, warmup: bool = False,
              http2: bool = False) -> dict:
    loop = asyncio.get_running_loop()
    idle: asyncio.Queue = asyncio.Queue()
    for _ in range(connections):
        _, conn = await loop.create_connection(Http2Connection if http2 else Connection, host, port)
        idle.put_nowait(conn)
    if warmup:  # one request per connection first: measure steady keep-alive traffic, not connection set-up
        for _ in range(connections):
            conn = idle.get_nowait()
            await conn.request()
            idle.put_nowait(conn)
        await asyncio.sleep(0.5)
    latencies, ok, errors = [], 0, 0
    total = int(rate * seconds)
    clock = time.perf_counter  # loop.time() has millisecond resolution under uvloop
    start = clock() + 0.05

    async def one(due: float):
        nonlocal ok, errors
        conn = await idle.get()  # HTTP/1.1: waiting for a free connection counts as latency too
        if http2:
            idle.put_nowait(conn)  # the next request may share it at once
        try:
            status = await conn.request()
            if status >= 500 or status == 0:
                errors += 1
            else:
                ok += 1
            latencies.append(clock() - due)
            if not http2:
                idle.put_nowait(conn)
        except ConnectionError:
            errors += 1

    tasks = []
    for i in range(total):
        due = start + i / rate
        delay = due - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(due)))
    await asyncio.wait_for(asyncio.gather(*tasks), seconds + 30)
    latencies.sort()

    def pct(q):
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 3) if latencies else None

    return {"sent": total, "ok": ok, "errors": errors, "rate": rate,
            "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
            "max_ms": round(latencies[-1] * 1000, 3) if latencies else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--warmup", action="store_true", help="one request per connection before measuring")
    parser.add_argument("--http2", action="store_true", help="h2c with prior knowledge, streams round the connections")
    args = parser.parse_args()
    print(json.dumps(uvloop.run(run(args.host, args.port, args.rate, args.seconds, args.connections, args.warmup,
                                    args.http2))))


if __name__ == "__main__":
    main()
