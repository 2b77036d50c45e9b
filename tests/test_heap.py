"""agent/heap.py on this machine's glibc: the arena limit holds for threads started after it, a
trim returns the free holes inside the heap, the periodic trim runs on the loop and stops.
Each glibc scenario runs in a fresh interpreter (an arena, once made, stays; a heap's holes
depend on all it did before)."""

import asyncio
import json
import os
import subprocess
import sys

from nodeagent.agent import heap, memory

THREADS = """
import json, sys, threading
from nodeagent.agent import heap, memory
limit = heap.limit_arenas(2) if sys.argv[1] == "limit" else None
go = threading.Barrier(7)
def allocate():
    go.wait()
    kept = [bytearray(4096) for _ in range(200)]  # glibc's malloc, from this thread's arena
    go.wait()
threads = [threading.Thread(target=allocate) for _ in range(6)]
for t in threads:
    t.start()
go.wait()
go.wait()
print(json.dumps({"limit": limit, "arenas": len(memory.arenas())}))
for t in threads:
    t.join()
"""

HOLES = """
import ctypes, json
from nodeagent.agent import heap, memory
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
start = memory.process_kib()["rss_kib"]
blocks = []
for _ in range(800):  # 800 x 64 KiB, resident; every other one freed: holes between kept blocks
    blocks.append(libc.malloc(64 * 1024))
    ctypes.memset(blocks[-1], 1, 64 * 1024)
for block in blocks[::2]:
    libc.free(block)
held = memory.process_kib()["rss_kib"] - start
done = heap.trim()
print(json.dumps({"held_kib": held, "released_kib": done.released_kib, "ms": done.duration_ms}))
"""


def _python(code: str, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != heap.ARENA_ENV}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout)


def test_threads_started_after_the_limit_share_two_arenas():
    assert _python(THREADS, "limit") == {"limit": 2, "arenas": 2}
    assert _python(THREADS, "default")["arenas"] >= 5  # without it: an arena per thread (8 per core)


def test_the_environment_variable_wins_over_the_default():
    assert heap.limit_arenas(2, {heap.ARENA_ENV: "4"}) == 4  # glibc already took it at start-up


def test_a_trim_returns_the_free_holes_glibc_kept():
    result = _python(HOLES)
    # 25 MiB kept, 25 MiB freed and still resident: glibc returns only an arena's top by itself
    assert result["held_kib"] >= 45_000
    assert result["released_kib"] >= 20_000
    assert 0 <= result["ms"] < 1000


def test_the_periodic_trim_runs_on_the_loop_until_stopped():
    async def scenario():
        trims = heap.PeriodicTrim(0.05).start()
        await asyncio.sleep(0.32)
        trims.stop()
        counted = trims.count
        await asyncio.sleep(0.15)
        return trims, counted

    trims, counted = asyncio.run(scenario())
    assert 4 <= counted == trims.count
    report = trims.report()
    assert report["count"] == counted and report["max_ms"] >= report["last_ms"] >= 0
    assert report["total_ms"] >= report["max_ms"] and report["released_kib"] >= 0
    assert memory.report(None, trims=trims)["trims"] == report


def test_a_period_of_zero_never_trims():
    async def scenario():
        trims = heap.PeriodicTrim(0).start()
        await asyncio.sleep(0.05)
        return trims.count

    assert asyncio.run(scenario()) == 0


def test_the_period_comes_from_the_environment_or_the_default():
    assert heap.trim_period({}) == heap.TRIM_EVERY_S
    assert heap.trim_period({heap.TRIM_ENV: "0"}) == 0
    assert heap.trim_period({heap.TRIM_ENV: "7.5"}) == 7.5
    assert heap.trim_period({heap.TRIM_ENV: "soon"}) == heap.TRIM_EVERY_S
