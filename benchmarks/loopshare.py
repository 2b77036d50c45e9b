"""What one pod's churn of short mesh connections costs the shared proxy, without the lab: the
noisy neighbour's attack (attack.py) against one real Proxy (podpair.py), measured where it hurts
the other pods, in the proxy process.

    python -m benchmarks.loopshare [--rate 355] [--seconds 6] [--runs 2]

Pod A opens short opaque connections (100 bytes echoed) to pod B's echo server at `--rate`, each a
mutual-TLS hop whose both ends are in this one process, as for a same-node pair in the lab with
on-node plaintext off. Reported per variant, the median of `--runs` interleaved runs (min-max):
the connections served per second, the proxy process's CPU (every thread: the TLS handshake
threads too) in cores, and its event loop's lag: how late a 2 ms timer fires, p50 and p99. Every
request of every pod waits that long before the loop gets to it. Variants:

- `quiet (no attack)`: the proxy as built, pod A silent: the loop's lag on this machine as it is;
- `unpaced, threads at loop priority`: no handshake-rate (1,000,000/s), handshake threads at nice 0
  (the proxy before pacing);
- `unpaced, threads niced`: only the handshake threads' lower priority;
- `paced (default), threads at loop priority`: only the default handshake-rate;
- `paced (default), threads niced`: both, and the rates of the pods whose handshakes load a late
  loop cut (contention.py; the proxy as built);
- `paced, niced, refused only at the handshake`: as built but without refusal windows (a pod over
  its rate has each new connection accepted, detected and refused at its handshake, as before
  proxy/refusal.py; there is no kernel here, so the windows' refusals are the proxy's at accept);
- `paced, niced, rates not cut for a late loop`: as built but without contention.py's cut (each
  pod paced at its whole handshake-rate however late the loop);
- `refused at once`: handshakes=1 and no pacing: what connections that are refused cost, next to
  the handshakes that still complete.
Needs root (network namespaces); removes what it made.
"""

import argparse
import asyncio
import dataclasses
import json
import os
import resource
import statistics
import sys
import time

import uvloop

from benchmarks.podpair import PodPair

PROBE_S = 0.002
QUIET = "quiet (no attack)"
NO_WINDOWS = "paced, niced, refused only at the handshake"
NOT_CUT = "paced, niced, rates not cut for a late loop"
VARIANTS = {
    QUIET: ("", None),
    "unpaced, threads at loop priority": ("handshake-rate=1000000", 0),
    "unpaced, threads niced": ("handshake-rate=1000000", None),
    "paced (default), threads at loop priority": ("", 0),
    "paced (default), threads niced": ("", None),
    NOT_CUT: ("", None),
    NO_WINDOWS: ("", None),
    "refused at once": ("handshake-rate=1000000,handshakes=1", None),
}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _lag(stop: asyncio.Event, samples: list) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(PROBE_S)
        samples.append((time.perf_counter() - started - PROBE_S) * 1000)


def _percentile(values: list, p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] if ordered else 0.0


async def one_run(pod_limits: str, niceness: int | None, rate: float, seconds: float, quiet: bool = False,
                  windows: bool = True, cut: bool = True) -> dict:
    """One fresh proxy (and its handshake threads) in this process."""
    from nodeagent.proxy import contention, limits, tls
    from nodeagent.settings import DEFAULT

    if not windows:
        limits.Quota.refusing = lambda quota, direction, now: None  # this child process only
    if not cut:
        contention.LoopContention.rate = lambda self, key, limit: limit  # this child process only
    if niceness is not None:
        tls.HANDSHAKE_NICENESS = niceness  # before the threads start: read by their initializer
    settings = dataclasses.replace(DEFAULT, on_node_plaintext=False, pod_limits=limits.parse(pod_limits))
    pair = await PodPair(settings).start()
    try:
        host, port = pair.aim("echo")
        await asyncio.sleep(0.5)
        stop, samples = asyncio.Event(), []
        probe = asyncio.get_running_loop().create_task(_lag(stop, samples))
        cpu = _cpu()
        argv = [sys.executable, "-m", "benchmarks.attack", host, "--seconds", str(seconds), "--short-port", str(port),
                "--short-rate", str(rate)]
        done = await pair.run_in_a_async(["sleep", str(seconds)] if quiet else argv, timeout=seconds + 60)
        cpu = _cpu() - cpu
        stop.set()
        await probe
        attack = {"short_ok": 0} if quiet else json.loads(done.stdout.strip().splitlines()[-1])
        return {"served_per_s": attack["short_ok"] / seconds, "cores": cpu / seconds,
                "lag_p50_ms": _percentile(samples, 0.5), "lag_p99_ms": _percentile(samples, 0.99)}
    finally:
        await pair.stop()


def _run_in_child(variant: str, rate: float, seconds: float) -> dict:
    """Each run in a fresh process: the handshake threads are made once per process."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", "benchmarks.loopshare", "--one", variant, "--rate", str(rate),
                          "--seconds", str(seconds)], capture_output=True, text=True, timeout=seconds + 120)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cell(values: list, digits: int) -> str:
    median = statistics.median(values)
    if min(values) == max(values):
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=355)
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        pod_limits, niceness = VARIANTS[args.one]
        print(json.dumps(uvloop.run(one_run(pod_limits, niceness, args.rate, args.seconds, args.one == QUIET,
                                            windows=args.one != NO_WINDOWS, cut=args.one != NOT_CUT))))
        return
    results: dict[str, list] = {name: [] for name in VARIANTS}
    for _ in range(args.runs):
        for name in VARIANTS:  # interleaved: a busy moment of the machine hits every variant
            results[name].append(_run_in_child(name, args.rate, args.seconds))
    print(f"attack: {args.rate:g} short opaque mesh connections/s for {args.seconds:g} s; "
          f"median of {args.runs} runs (min-max); {os.cpu_count()} cores\n")
    print("| variant | served/s | proxy CPU, cores | loop lag p50 ms | loop lag p99 ms |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        print(f"| {name} | {_cell([r['served_per_s'] for r in runs], 0)} | {_cell([r['cores'] for r in runs], 2)} "
              f"| {_cell([r['lag_p50_ms'] for r in runs], 2)} | {_cell([r['lag_p99_ms'] for r in runs], 2)} |")


if __name__ == "__main__":
    main()
