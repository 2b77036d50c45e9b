"""Python's cyclic garbage collector in each of the agent's processes: what start-up left alive
is frozen, so no later collection walks it.

A collection of the oldest generation walks every object the collector tracks and holds the
event loop meanwhile: every request in flight waits (ARCHITECTURE.md "Event-loop stalls";
benchmarks/README.md "### Where the latency tail comes from"). Most of those objects are made at
start-up and live as long as the process (modules, classes, functions, the settings, the TLS
contexts, the first cluster view), so walking them again and again finds nothing. `freeze_start_up`
moves them out of the collector's reach once (gc.freeze: the permanent generation), after the
process has started serving.

Memory: a frozen object is still freed by its reference count when nothing refers to it; only a
frozen object in a reference cycle that becomes garbage later stays. That is bounded by what was
alive at the freeze, once: nothing made later is ever frozen (this is called once per process,
never again, so the bound does not grow with time or traffic). Objects made after it are
collected as before, at CPython's thresholds.
NODEAGENT_GC_FREEZE=0 in the environment turns it off (to measure without).
"""

import gc
import logging
import os
import time

log = logging.getLogger(__name__)
FREEZE_ENV = "NODEAGENT_GC_FREEZE"


def freeze_start_up(env=os.environ) -> int:
    """Collect what start-up left as garbage, then freeze everything alive (once per process,
    after start-up). How many objects were frozen (0: turned off, or already done)."""
    if env.get(FREEZE_ENV, "1") == "0" or gc.get_freeze_count():
        return 0
    started = time.perf_counter()
    gc.collect()  # start-up's own cyclic garbage: not frozen, freed now
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("garbage collector: %d objects alive after start-up frozen (%.1f ms)", frozen,
             (time.perf_counter() - started) * 1000)
    return frozen
