"""One proxy process serving two pods (benchmarks/podpair.py), open-loop HTTP/1 at a fixed rate:
the latency tail the proxy adds, and the event-loop stalls behind it.

    openloop.py (pod A, 32 keep-alive connections, 1,000 req/s) -> Proxy (this process, mesh:
    both ends of the mutual-TLS hop) -> nginx (pod B)

Besides the client's p50/p99/max (latency from each request's due time, `openloop.py`), the run
records in the proxy process every collection of Python's cyclic garbage collector (gc.callbacks:
count, total and longest pause per generation) and the objects it tracks; a new cluster view
replaces the last every VIEW_EVERY_S, as changes in a busy cluster would. With the freeze, the
run ends by counting the frozen objects that had become cyclic garbage (the memory the freeze
kept), and times one malloc_trim(0) (glibc). Variants:
- default: CPython's thresholds, nothing frozen;
- tuned: what the agent and its workers do once serving (`agent/gc_tuning.py`: `freeze_start_up`).

    python -m benchmarks.tail [--variants default,tuned] [--runs 5] [--seconds 8] [--rate 1000]
                              [--force-full-collection]

Each run is a fresh process; the variants run in turn, run for run (a busy moment of this shared
machine hits each alike); median (min-max) of --runs. Needs root (network namespaces).
"""

import argparse
import asyncio
import gc
import json
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
VARIANTS = ("default", "tuned")
CONNECTIONS = 32
VIEW_EVERY_S = 0.5  # a new cluster view this often during a run, as a busy cluster's changes


class Collections:
    """Every collection of the cyclic collector while installed: per generation, count and pauses."""

    def __init__(self):
        self.count = [0, 0, 0]
        self.total_ms = [0.0, 0.0, 0.0]
        self.max_ms = [0.0, 0.0, 0.0]
        self._started = 0.0

    def __enter__(self):
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation, pause = info["generation"], (time.perf_counter() - self._started) * 1000
        self.count[generation] += 1
        self.total_ms[generation] += pause
        self.max_ms[generation] = max(self.max_ms[generation], pause)

    def report(self) -> dict:
        return {"collections": self.count, "pause_total_ms": [round(t, 2) for t in self.total_ms],
                "pause_max_ms": [round(m, 2) for m in self.max_ms]}


async def one_run(variant: str, seconds: float, rate: float, force_full: bool = False) -> dict:
    from benchmarks.podpair import PodPair
    from benchmarks.proxy_cost import NGINX_PORT, nginx_in_pod_b

    pair = await PodPair().start()
    try:
        async with nginx_in_pod_b(pair):
            if variant == "tuned":
                from nodeagent.agent import gc_tuning
                gc_tuning.freeze_start_up()
            host, port = pair.aim(NGINX_PORT)
            argv = [sys.executable, "-m", "benchmarks.openloop", host, str(port), "--rate", str(rate),
                    "--seconds", str(seconds), "--connections", str(CONNECTIONS), "--warmup"]
            views = asyncio.get_running_loop().create_task(new_views(pair))
            with Collections() as collections:
                # A full collection in the middle of the measured requests (the client warms up for ~1 s).
                forced = asyncio.get_running_loop().call_later(1 + seconds / 2, gc.collect) if force_full else None
                done = await pair.run_in_a_async(argv, timeout=seconds + 60)
                if forced is not None:
                    forced.cancel()
            views.cancel()
            if done.returncode != 0:
                raise RuntimeError(f"openloop failed: {done.stderr[-2000:]}")
            client = json.loads(done.stdout.strip().splitlines()[-1])
            tracked, frozen = len(gc.get_objects()), gc.get_freeze_count()
            trim_ms = malloc_trim_ms()
            # What the freeze kept: frozen objects that became cyclic garbage since (unfrozen, they
            # are what a full collection now finds, beyond what the unfrozen objects left).
            gc.collect()
            gc.unfreeze()
            kept = gc.collect()
            return {**client, **collections.report(), "tracked_objects": tracked, "frozen_objects": frozen,
                    "frozen_garbage_objects": kept if frozen else None, "malloc_trim_ms": trim_ms}
    finally:
        await pair.stop()


def malloc_trim_ms() -> float | None:
    """How long one malloc_trim(0) holds the thread after the run (glibc's free pages given back:
    what a periodic trim on the event loop would stall it for). None: not glibc."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except AttributeError:
        return None
    trim.argtypes = [ctypes.c_size_t]
    started = time.perf_counter()
    trim(0)
    return round((time.perf_counter() - started) * 1000, 3)


async def new_views(pair) -> None:
    """The pods' view again and again (a new ClusterView each time: the old one becomes garbage)."""
    from benchmarks.podpair import A_IP, B_IP, pod_object
    from nodeagent.cluster.model import ClusterView

    while True:
        await asyncio.sleep(VIEW_EVERY_S)
        pair.proxy.update_view(ClusterView([pod_object("pod-a", A_IP), pod_object("pod-b", B_IP)]))


def run_child(variant: str, seconds: float, rate: float, force_full: bool) -> dict:
    done = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "one", variant, str(seconds),
                           str(rate), *(["full"] if force_full else [])], capture_output=True, text=True, cwd=REPO, timeout=seconds + 120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    if done.returncode != 0:
        raise RuntimeError(f"a {variant} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    if sys.argv[1:2] == ["one"]:
        import uvloop

        print(json.dumps(uvloop.run(one_run(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]),
                                            sys.argv[5:6] == ["full"]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--force-full-collection", action="store_true",
                        help="one full collection (gc.collect()) in the middle of each run: what it stalls")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    runs = {v: [] for v in variants}
    for _ in range(args.runs):
        for variant in variants:
            runs[variant].append(run_child(variant, args.seconds, args.rate, args.force_full_collection))
    if args.json:
        print(json.dumps(runs))
        return
    for variant, results in runs.items():
        print(f"{variant:8} p50 {spread([r['p50_ms'] for r in results])} ms, "
              f"p99 {spread([r['p99_ms'] for r in results])} ms, max {spread([r['max_ms'] for r in results])} ms, "
              f"errors {sum(r['errors'] for r in results)}; collections per generation (median) "
              f"{[statistics.median(r['collections'][g] for r in results) for g in range(3)]}, "
              f"longest pause per generation (max) "
              f"{[max(r['pause_max_ms'][g] for r in results) for g in range(3)]} ms, gen2 pause total "
              f"{spread([r['pause_total_ms'][2] for r in results])} ms; tracked objects "
              f"{statistics.median(r['tracked_objects'] for r in results):.0f}, frozen "
              f"{statistics.median(r['frozen_objects'] for r in results):.0f}"
              + f"; malloc_trim(0) after the run {spread([r['malloc_trim_ms'] or 0 for r in results])} ms"
              + (f", of them garbage kept by the freeze (max) "
                 f"{max(r['frozen_garbage_objects'] for r in results)}" if results[0]['frozen_objects'] else ""))


if __name__ == "__main__":
    main()
