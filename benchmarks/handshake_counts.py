"""Does a pod within its handshake rate get refused by the counts of handshakes in progress when
the node is busy?

    python -m benchmarks.handshake_counts [--rate 40] [--seconds 20] [--busy 0.5] [--hogs 0] [--runs 3]

The real proxy serves two pods (`podpair.PodPair`: no lab, no BPF, no lock; root); pod A opens
short opaque connections to pod B's echo server at `rate` a second (the soak's pace, under the
pod's `handshake-rate` of 50), each a mutual-TLS handshake, while a callback on the proxy's event
loop keeps it busy `busy` of the time (a stand-in for the requests of other pods: the handshake
threads run below the loop's priority, so they wait), and `hogs` processes spin beside it at its
own priority (other work on the node, in the same scheduling group: the lab's, or a node without
CPU cgroups), each for the run's length. Variants, each run in turn: the default
limits, and the counts before 5a72ce8 (`handshakes=16,inbound-handshakes=64`). Prints one JSON
line per run: connections served and failed, and the proxy's refusals (limit_exceeded_total)
and handshake failures by reason.
"""

import argparse
import asyncio
import dataclasses
import json
import re
import subprocess
import sys
import time

VARIANTS = {"default": "", "16 and 64": "handshakes=16,inbound-handshakes=64"}
BURN_SLICE_S = 0.005


def _counters(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(("limit_exceeded_total", "tls_handshake_failures_total")):
            name, value = line.rsplit(" ", 1)
            name = re.sub(r'(namespace|pod)="[^"]*",?', "", name).replace(",}", "}")  # one pod each way
            out[name] = float(value)
    return out


async def one_run(variant: str, rate: float, seconds: float, busy: float, hogs: int) -> dict:
    from prometheus_client import generate_latest

    from benchmarks import podpair
    from nodeagent.proxy import limits
    from nodeagent.settings import DEFAULT

    settings = DEFAULT
    if VARIANTS[variant]:
        settings = dataclasses.replace(DEFAULT, pod_limits=limits.parse(VARIANTS[variant]))
    pair = await podpair.PodPair(settings).start()
    loop, stop = asyncio.get_running_loop(), time.monotonic() + seconds + 1

    def burn() -> None:  # busy for busy / (1 - busy) of each idle slice
        started = time.perf_counter()
        while time.perf_counter() - started < BURN_SLICE_S * busy / (1 - busy):
            pass
        if time.monotonic() < stop:
            loop.call_later(BURN_SLICE_S, burn)

    try:
        host, port = pair.aim("echo")
        loop.call_soon(burn)
        spinning = [subprocess.Popen(["timeout", str(seconds), sys.executable, "-c", "while True: pass"])
                    for _ in range(hogs)]
        done = await pair.run_in_a_async([sys.executable, "-m", "benchmarks.attack", host, "--seconds", str(seconds),
                                          "--short-port", str(port), "--short-kind", "echo", "--short-rate", str(rate)])
        for hog in spinning:
            hog.wait()
        served = json.loads(done.stdout)
        return {"variant": variant, "busy": busy, "hogs": hogs, "rate": rate, "ok": served["short_ok"],
                "failed": served["short_failed"] + served["short_skipped"],
                **_counters(generate_latest(pair.proxy.metrics.registry).decode())}
    finally:
        await pair.stop()


def main() -> None:
    import uvloop

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=40)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--busy", type=float, default=0.5)
    parser.add_argument("--hogs", type=int, default=0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for _ in range(args.runs):
        for variant in VARIANTS:
            print(json.dumps(uvloop.run(one_run(variant, args.rate, args.seconds, args.busy, args.hogs))), flush=True)


if __name__ == "__main__":
    main()
