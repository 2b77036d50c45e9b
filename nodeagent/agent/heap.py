"""glibc's heap in each of the agent's processes: few arenas, and free memory given back.

glibc keeps the memory a process frees and gives the kernel back only the top of each arena.
Two things made an agent's RSS rise under steady traffic while the memory in use did not
(ARCHITECTURE.md "Memory", benchmarks/README.md "### Soak"):
- Arenas. A thread that allocates while another holds the main arena's lock gets an arena of
  its own (up to 8 per core); OpenSSL allocates in the TLS handshake threads without the GIL,
  so each handshake thread's arena keeps its own free memory, which no other thread reuses.
  `limit_arenas` caps them before any thread exists (M_ARENA_MAX; MALLOC_ARENA_MAX in the
  environment wins, as glibc documents, for whoever wants to try another value).
- Holes. Memory freed below the top of an arena stays resident. `PeriodicTrim` calls
  malloc_trim(0), which returns every whole free page of every arena, every TRIM_EVERY_S on the
  event loop (one call: its duration is measured and reported in /debug/memory);
  NODEAGENT_MALLOC_TRIM_S in the environment sets another period, 0 none (to measure without).
Not glibc (musl, another libc): both do nothing.
"""

import asyncio
import ctypes
import logging
import os
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # malloc.h
ARENAS = 2  # the main arena (the event loop) and one shared by every other thread
TRIM_EVERY_S = 10.0
ARENA_ENV = "MALLOC_ARENA_MAX"
TRIM_ENV = "NODEAGENT_MALLOC_TRIM_S"


def _libc():
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # no mallopt or malloc_trim: not glibc
        return None


_LIBC = _libc()


def limit_arenas(count: int = ARENAS, env=os.environ) -> int | None:
    """At most `count` arenas from now on (call it before any thread starts: an arena, once made,
    stays). The limit in force, or None where the allocator is not glibc's."""
    if _LIBC is None:
        return None
    if env.get(ARENA_ENV):  # glibc read it at start-up; the operator's choice stands
        return int(env[ARENA_ENV]) if env[ARENA_ENV].isdigit() else None
    if _LIBC.mallopt(M_ARENA_MAX, count) != 1:
        log.warning("mallopt(M_ARENA_MAX, %d) refused: glibc keeps its default arenas", count)
        return None
    return count


def _rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass
class Trim:
    """One malloc_trim(0): how long it held the thread, what the RSS lost."""
    duration_ms: float
    released_kib: int


def trim() -> Trim | None:
    """Give every whole free page of every arena back to the kernel, now."""
    if _LIBC is None:
        return None
    before, started = _rss_kib(), time.perf_counter()
    _LIBC.malloc_trim(0)
    duration = (time.perf_counter() - started) * 1000
    return Trim(round(duration, 3), before - _rss_kib())


def trim_period(env=os.environ) -> float:
    """Seconds between two trims: TRIM_EVERY_S unless the environment says otherwise (0: never)."""
    text = env.get(TRIM_ENV)
    try:
        return TRIM_EVERY_S if text is None else max(0.0, float(text))
    except ValueError:
        log.warning("%s=%r is not a number of seconds: trimming every %g s", TRIM_ENV, text, TRIM_EVERY_S)
        return TRIM_EVERY_S


class PeriodicTrim:
    """malloc_trim(0) every `every_s` on the running loop (0: never), with its totals for /debug/memory."""

    def __init__(self, every_s: float | None = None):
        self.every_s = trim_period() if every_s is None else every_s
        self.count = 0
        self.total_ms = 0.0
        self.max_ms = 0.0
        self.released_kib = 0
        self.last: Trim | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> "PeriodicTrim":
        if _LIBC is not None and self.every_s > 0:
            self._timer = asyncio.get_running_loop().call_later(self.every_s, self._tick)
        return self

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self.record(trim())
        self._timer = asyncio.get_running_loop().call_later(self.every_s, self._tick)

    def record(self, done: Trim | None) -> None:
        if done is None:
            return
        self.count += 1
        self.total_ms += done.duration_ms
        self.max_ms = max(self.max_ms, done.duration_ms)
        self.released_kib += max(0, done.released_kib)
        self.last = done

    def report(self) -> dict:
        return {"every_s": self.every_s, "count": self.count, "total_ms": round(self.total_ms, 3),
                "max_ms": self.max_ms, "last_ms": self.last.duration_ms if self.last else None,
                "released_kib": self.released_kib,
                "last_released_kib": self.last.released_kib if self.last else None}
