"""The node's last line against memory exhaustion: an OOM kill of the agent is an outage of
every pod on the node, so the proxy watches its own resident memory and acts before the
container's limit does.

Every CHECK_S it reads its RSS (/proc/self/statm, one read). Below SOFT of its budget nothing
happens. Above it, it adds up what its connections hold in write buffers (the memory a slow or
hostile peer can make it keep): if that is small, the RSS is the allocator's (Python keeps freed
memory), so it asks glibc to give back what is free (malloc_trim) and carries on. If the
connections hold much, new connections are refused (every pod, counted as the `memory` limit)
until it falls below SOFT again; above the whole budget, the connections holding the most are
cut, largest first, until what they hold is back under the budget's share, so the pods that make
the proxy hold memory lose their connections, and the others keep theirs.
"""

import ctypes
import enum
import logging
import os
from collections.abc import Callable

CHECK_S = 1.0
SOFT = 0.8  # of the budget: refuse new connections above this (if connections hold much)
HELD_SHARE = 0.25  # of the budget: what connections may hold before refusing or cutting
PAGE = os.sysconf("SC_PAGE_SIZE")

log = logging.getLogger("nodeagent.proxy")


class Pressure(enum.Enum):
    NORMAL = "normal"
    REFUSING = "refusing"  # new connections are refused
    SHEDDING = "shedding"  # and the connections holding the most are being cut


def resident_bytes() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * PAGE


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryGuard:
    def __init__(self, budget_bytes: int, connections, observers, rss: Callable[[], int] = resident_bytes,
                 trim: Callable[[], None] = _trim):
        self.budget = budget_bytes
        self.connections, self.observers = connections, observers
        self.rss, self.trim = rss, trim
        self.pressure = Pressure.NORMAL
        self.shed = 0  # connections cut, since start

    def check(self) -> Pressure:
        """One look; called every CHECK_S (and by tests with a fake RSS)."""
        rss = self.rss()
        if rss < SOFT * self.budget:
            self._become(Pressure.NORMAL, rss)
            return self.pressure
        live = self.connections.all()
        held = sum(c.buffered() for c in live)
        if held < HELD_SHARE * self.budget:
            self.trim()  # the RSS is freed memory the allocator kept: give it back, refuse nothing
            self._become(Pressure.NORMAL, rss)
            return self.pressure
        if rss < self.budget:
            self._become(Pressure.REFUSING, rss)
            return self.pressure
        self._become(Pressure.SHEDDING, rss)
        target = HELD_SHARE * self.budget / 2
        for connection in sorted(live, key=lambda c: c.buffered(), reverse=True):
            if held <= target:
                break
            held -= connection.buffered()
            connection.cut("memory")
            self.shed += 1
        return self.pressure

    def admits(self) -> bool:
        return self.pressure is Pressure.NORMAL

    def _become(self, pressure: Pressure, rss: int) -> None:
        if pressure is not self.pressure:
            log.warning("memory %s: resident %d MiB of a %d MiB budget", pressure.value, rss >> 20,
                        self.budget >> 20)
            self.pressure = pressure
