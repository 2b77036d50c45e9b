"""What one proxy process holds in memory, for hunting growth: the admin listener's
/debug/memory (loopback only), each process of the agent answering for itself.

Read on request, nothing kept between requests: the process's RSS, glibc's heap (mallinfo2:
what the allocator holds from the kernel, what is in use, what it keeps free; malloc_info:
the same per arena), Python's
objects (allocated blocks, the most numerous types), the sizes of the proxy's tables (pools,
connections, metric series, caches), and, only when the process started with
NODEAGENT_TRACEMALLOC=<frames> set, Python's largest allocation sites (tracemalloc slows every
allocation, so it is never on by default). `?trim=1` asks glibc to give its free memory back
(malloc_trim) and reports the RSS before and after and how long it took: whether trimming
would return anything (agent/heap.py trims every process periodically; its totals are here too).
"""

import ctypes
import gc
import os
import sys
import tracemalloc
from collections import Counter
from xml.etree import ElementTree

from nodeagent.agent import heap

TRACE_ENV = "NODEAGENT_TRACEMALLOC"  # frames per traced allocation; unset or 0: no tracing
TOP = 15


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc():
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.open_memstream.restype = ctypes.c_void_p
        libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_size_t)]
        libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
        libc.fclose.argtypes = [ctypes.c_void_p]
        libc.free.argtypes = [ctypes.c_void_p]
        return libc
    except (OSError, AttributeError):  # not glibc, or glibc before 2.33
        return None


_LIBC = _libc()


def start_tracing(env=os.environ) -> bool:
    """Trace Python's allocations from now on if the environment asks for it (at start-up)."""
    frames = int(env.get(TRACE_ENV) or 0)
    if frames > 0 and not tracemalloc.is_tracing():
        tracemalloc.start(frames)
    return tracemalloc.is_tracing()


def process_kib() -> dict:
    """The process's resident memory as the kernel counts it (KiB)."""
    wanted = {"VmRSS": "rss_kib", "RssAnon": "anon_kib", "RssFile": "file_kib"}
    out = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in wanted:
                out[wanted[key]] = int(value.split()[0])
    return out


def allocator() -> dict | None:
    """glibc's heap (KiB): `heap` is what its arenas hold from the kernel, `in_use` what is
    allocated there, `free` what it keeps without returning it; `mmapped` are the large blocks
    it maps one by one (returned when freed). None where mallinfo2 is missing."""
    if _LIBC is None:
        return None
    info = _LIBC.mallinfo2()
    return {"heap_kib": info.arena // 1024, "in_use_kib": info.uordblks // 1024, "free_kib": info.fordblks // 1024,
            "free_chunks": info.ordblks, "top_releasable_kib": info.keepcost // 1024,
            "mmapped_kib": info.hblkhd // 1024, "mmapped_blocks": info.hblks, "arenas": arenas()}


def arenas() -> list[dict]:
    """Each glibc arena (the main one, 0, and one per thread that needed its own, up to 8 per
    core): what it holds from the kernel and what of that sits free in its bins (KiB), from
    malloc_info. Freed memory returns to the arena it came from, so free memory piling up in
    one arena is not used by the others."""
    buffer, size = ctypes.c_char_p(), ctypes.c_size_t()
    stream = _LIBC.open_memstream(ctypes.byref(buffer), ctypes.byref(size))
    if not stream:
        return []
    _LIBC.malloc_info(0, stream)
    _LIBC.fclose(stream)
    try:
        document = ElementTree.fromstring(ctypes.string_at(buffer, size.value))
    finally:
        _LIBC.free(ctypes.cast(buffer, ctypes.c_void_p))
    out = []
    for heap in document.findall("heap"):
        free = sum(int(t.get("size")) for t in heap.findall("total") if t.get("type") in ("fast", "rest"))
        system = next((int(t.get("size")) for t in heap.findall("system") if t.get("type") == "current"), 0)
        out.append({"arena": int(heap.get("nr")), "heap_kib": system // 1024, "free_kib": free // 1024})
    return out


def python_objects(top: int = TOP) -> dict:
    """Python's allocated blocks and the most numerous types among the objects the collector tracks
    (gc_tracked and the types: those it walks; start-up's, frozen by agent/gc_tuning.py, are
    gc_frozen and in no type count)."""
    objects = gc.get_objects()
    types = Counter(type(o).__name__ for o in objects)
    del objects
    return {"allocated_blocks": sys.getallocatedblocks(), "gc_tracked": sum(types.values()),
            "gc_frozen": gc.get_freeze_count(),  # agent/gc_tuning.py
            "types": dict(types.most_common(top))}


def traced(top: int = TOP) -> dict | None:
    """tracemalloc's view (when tracing): the total and the largest allocation sites."""
    if not tracemalloc.is_tracing():
        return None
    snapshot = tracemalloc.take_snapshot()
    current, peak = tracemalloc.get_traced_memory()
    sites = snapshot.statistics("traceback" if tracemalloc.get_traceback_limit() > 1 else "lineno")[:top]
    return {"current_kib": current // 1024, "peak_kib": peak // 1024,
            "tracing_overhead_kib": tracemalloc.get_tracemalloc_memory() // 1024,
            "top": [{"kib": round(s.size / 1024, 1), "count": s.count,
                     "where": " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in s.traceback)}
                    for s in sites]}


def trim() -> dict | None:
    """Ask glibc to return its free memory to the kernel; the RSS before and after (KiB), the time it took."""
    before = process_kib()["rss_kib"]
    done = heap.trim()
    if done is None:
        return None
    return {"rss_before_kib": before, "rss_after_kib": process_kib()["rss_kib"], "duration_ms": done.duration_ms}


def _len(obj, *path) -> int | None:
    for name in path:
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return len(obj)


def _sum_len(mapping) -> int | None:
    return None if mapping is None else sum(len(v) for v in mapping.values())


def proxy_tables(proxy) -> dict:
    """The proxy's tables that grow with traffic or with the cluster, each with its size now."""
    if proxy is None:
        return {}
    registry = proxy.metrics.registry
    series = {family.name: len(family.samples) for family in registry.collect()}
    pools = {}
    for side, pair in (("outbound", proxy.pools), ("inbound_app", proxy.app_pools)):
        pools[f"{side}_http1_idle"] = _sum_len(getattr(pair.http1, "_idle", None))
        pools[f"{side}_http1_keys"] = _len(pair.http1, "_idle")
        pools[f"{side}_http2_connections"] = _sum_len(getattr(pair.http2, "_conns", None))
        pools[f"{side}_http2_keys"] = _len(pair.http2, "_conns")
    directory, view = proxy.directory, proxy.view
    return {
        "view_version": view.version,
        "view_pods": len(view.pods),
        "view_services": len(view.services),
        "view_slices": len(view.slices),
        "connections_open": proxy.connections.open_count,
        "connections_max": proxy.connections.max_connections,  # this process's share of the node's
        "memory_budget": proxy.guard.budget,  # and of the memory budget
        "connections_listed": _sum_len(getattr(proxy.connections, "_live", None)),
        **pools,
        "tls_sessions": _len(proxy.tls_sessions, "_sessions"),
        "identities": _len(proxy.identities, "_material"),
        "pods": len(proxy.pods),
        "pods_retired": proxy.connections.retired(),  # departed, with connections not ended yet
        "endpoint_sets": _len(directory, "_endpoint_sets"),
        "service_configs": _len(directory, "_configs"),
        "retry_budgets": _len(directory, "_budgets"),
        "policies": _len(proxy.authorizer, "_policies"),
        "problem_buckets": _len(proxy.problems, "_buckets"),
        "problem_traced": _len(proxy.problems, "_traced"),
        "tap_subscriptions": len(proxy.tap.subscriptions),
        "access_log_queued": _len(proxy.telemetry, "access_log", "entries"),
        "spans_queued": _len(proxy.telemetry, "tracer", "exporter", "spans"),
        "metric_series_per_pod": _sum_len(getattr(proxy.metrics, "_series", None)),
        "metric_samples": sum(series.values()),
        "metric_samples_by_family": dict(sorted(series.items(), key=lambda item: -item[1])[:TOP]),
    }


def report(proxy, top: int = TOP, trim_heap: bool = False, trims: heap.PeriodicTrim | None = None) -> dict:
    """Everything above for this process (`proxy` may be None: not serving yet; `trims`: the
    process's periodic trim, whose totals are reported)."""
    out = {"pid": os.getpid(), "process": process_kib(), "allocator": allocator(),
           "python": python_objects(top), "tables": proxy_tables(proxy), "tracemalloc": traced(top),
           "trims": trims.report() if trims else None}
    if trim_heap:
        out["trim"] = trim()
    return out
