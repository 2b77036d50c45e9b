"""An open-loop HTTP/1.1 load generator: requests are due at a fixed rate
whether or not earlier ones have been answered, and latency is measured from
when each request was due (so a stall is not hidden by waiting for it:
no coordinated omission). Run inside a pod:

    python -m benchmarks.openloop HOST PORT --rate 1000 --seconds 5 --connections 32
prints JSON: sent, ok, errors, p50/p90/p99/max in ms.
"""

import argparse
import asyncio
import json
import time

import uvloop

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


async def run(host: str, port: int, rate: float, seconds: float, connections: int, warmup: bool = False) -> dict:
    loop = asyncio.get_running_loop()
    idle: asyncio.Queue = asyncio.Queue()
    for _ in range(connections):
        _, conn = await loop.create_connection(Connection, host, port)
        idle.put_nowait(conn)
    if warmup:  # one request per connection first: measure steady keep-alive traffic, not connection set-up
        for _ in range(connections):
            conn = idle.get_nowait()
            await conn.request()
            idle.put_nowait(conn)
        await asyncio.sleep(0.5)
    latencies, errors = [], 0
    total = int(rate * seconds)
    clock = time.perf_counter  # loop.time() has millisecond resolution under uvloop
    start = clock() + 0.05

    async def one(due: float):
        nonlocal errors
        conn = await idle.get()  # waiting for a free connection counts as latency too
        try:
            status = await conn.request()
            if status >= 500:
                errors += 1
            latencies.append(clock() - due)
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

    return {"sent": total, "ok": len(latencies) - errors, "errors": errors, "rate": rate,
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
    args = parser.parse_args()
    print(json.dumps(uvloop.run(run(args.host, args.port, args.rate, args.seconds, args.connections, args.warmup))))


if __name__ == "__main__":
    main()
