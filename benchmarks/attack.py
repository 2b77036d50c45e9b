"""A noisy pod's traffic toward its node's proxy, bounded in time. Run inside a pod:

    python -m benchmarks.attack HOST --seconds 10 --short-port 9000 --short-rate 355 \
        --hold-port 8080 --idle 400 --slowloris 400

- short connections at a fixed rate (`--short-kind echo`: 100 bytes echoed, opaque TCP;
  `http`: one request with `Connection: close`), each a new connection, at most
  `MAX_IN_FLIGHT` at once (beyond that a due connection is counted as skipped);
- idle connections that never send a byte (the proxy's detection stage holds them);
- slowloris connections: a request head started and never finished, one more byte a second.
Prints JSON: what was attempted, what succeeded, and how many held connections the proxy
still kept open at the end (the rest it refused or closed). Everything closes at the end.
Also the soak's source of short connections (benchmarks/soak.py).
"""

import argparse
import asyncio
import json
import os
import resource
import time

import uvloop

MAX_IN_FLIGHT = 1000
CONNECT_TIMEOUT_S = 2.0
ECHO = os.urandom(100)
HTTP_CLOSE = b"GET / HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n"
SLOWLORIS_START = b"GET / HTTP/1.1\r\nhost: bench\r\nx-slow: "


async def _one_short(host: str, port: int, kind: str) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        if kind == "echo":
            writer.write(ECHO)
            got = await asyncio.wait_for(reader.readexactly(len(ECHO)), CONNECT_TIMEOUT_S)
            return got == ECHO
        writer.write(HTTP_CLOSE)
        response = await asyncio.wait_for(reader.read(-1), CONNECT_TIMEOUT_S)
        return response.startswith(b"HTTP/1.1 200")
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()


async def short_connections(host: str, port: int, kind: str, rate: float, seconds: float) -> dict:
    counts = {"attempted": 0, "ok": 0, "failed": 0, "skipped": 0}
    in_flight: set[asyncio.Task] = set()

    def done(task: asyncio.Task) -> None:
        in_flight.discard(task)
        counts["ok" if task.result() else "failed"] += 1

    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= MAX_IN_FLIGHT:
            counts["skipped"] += 1
            continue
        counts["attempted"] += 1
        task = asyncio.get_running_loop().create_task(_one_short(host, port, kind))
        in_flight.add(task)
        task.add_done_callback(done)
    if in_flight:
        await asyncio.wait(in_flight, timeout=CONNECT_TIMEOUT_S * 2)
    return counts


async def _open(host: str, port: int):
    try:
        return await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError):
        return None


async def held_connections(host: str, port: int, count: int, slowloris: bool, seconds: float) -> dict:
    """`count` connections opened at once and held for `seconds` (slowloris ones dribble a
    byte a second); how many the proxy still kept open at the end."""
    opened = [c for c in await asyncio.gather(*(_open(host, port) for _ in range(count))) if c]
    if slowloris:
        for _, writer in opened:
            writer.write(SLOWLORIS_START)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        if slowloris:
            for _, writer in opened:
                if not writer.is_closing():
                    writer.write(b"a")
    held = sum(1 for reader, writer in opened if not reader.at_eof() and not writer.is_closing())
    for _, writer in opened:
        writer.close()
    return {"wanted": count, "opened": len(opened), "held_at_end": held}


async def run(args) -> dict:
    jobs, hold_host = {}, args.hold_host or args.host
    if args.short_rate:
        jobs["short"] = short_connections(args.host, args.short_port, args.short_kind, args.short_rate, args.seconds)
    if args.idle:
        jobs["idle"] = held_connections(hold_host, args.hold_port, args.idle, False, args.seconds)
    if args.slowloris:
        jobs["slowloris"] = held_connections(hold_host, args.hold_port, args.slowloris, True, args.seconds)
    results = await asyncio.gather(*jobs.values())
    return {f"{job}_{key}": value for job, result in zip(jobs, results) for key, value in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("host")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--short-port", type=int, default=9000)
    parser.add_argument("--short-kind", choices=("echo", "http"), default="echo")
    parser.add_argument("--short-rate", type=float, default=0)
    parser.add_argument("--hold-port", type=int, default=8080)
    parser.add_argument("--hold-host", help="where the idle and slowloris connections go (default: HOST)")
    parser.add_argument("--idle", type=int, default=0)
    parser.add_argument("--slowloris", type=int, default=0)
    args = parser.parse_args()
    wanted = args.idle + args.slowloris + MAX_IN_FLIGHT + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(wanted, soft), max(wanted, hard)))
    print(json.dumps(uvloop.run(run(args))))


if __name__ == "__main__":
    main()
