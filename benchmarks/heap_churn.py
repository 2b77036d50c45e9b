"""glibc's heap under short mutual-TLS connections, with and without the proxy's decrypt buffer.

    python -m benchmarks.heap_churn [--rate 45] [--seconds 15] [--rounds 5]

The real proxy serves two pods (`podpair.PodPair`: no lab, no BPF, no lock; root); pod A opens
short opaque connections to pod B's echo server at `rate` a second (each a resumed mTLS
handshake, 100 bytes echoed; under the pod's `handshake-rate` of 50) for `rounds` rounds of
`seconds`. After each round: glibc's heap (mallinfo2: its size, in use, kept free), then the
RSS before and after a malloc_trim(0). Two variants, each in a fresh process:
- `buffer`: as the proxy runs (tls_transport.read_records decrypts into one reused buffer);
- `allocating read`: SSLObject.read(256 KiB) per read, as before (a 256 KiB block per read,
  shrunk to what was read).
Prints one JSON line per round.
"""

import argparse
import asyncio
import ctypes
import json
import subprocess
import sys

VARIANTS = ("buffer", "allocating read")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


async def _rounds(variant: str, rate: float, seconds: float, rounds: int) -> None:
    from benchmarks import podpair
    from nodeagent.agent import heap
    from nodeagent.proxy import tls_transport

    if variant == "allocating read":
        tls_transport.read_records = lambda sslobj: sslobj.read(tls_transport.READ_CHUNK)
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    pair = await podpair.PodPair().start()
    try:
        host, port = pair.aim("echo")
        for index in range(rounds):
            done = await pair.run_in_a_async([sys.executable, "-m", "benchmarks.attack", host, "--seconds",
                                              str(seconds), "--short-port", str(port), "--short-kind", "echo",
                                              "--short-rate", str(rate)])
            await asyncio.sleep(1.0)
            info, before = libc.mallinfo2(), _rss_mib()
            heap.trim()
            print(json.dumps({"variant": variant, "round": index + 1, **json.loads(done.stdout),
                              "heap_mib": round(info.arena / 2**20, 1), "in_use_mib": round(info.uordblks / 2**20, 1),
                              "kept_free_mib": round(info.fordblks / 2**20, 1), "rss_mib": round(before, 1),
                              "rss_after_trim_mib": round(_rss_mib(), 1)}), flush=True)
    finally:
        await pair.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=45)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variant", choices=VARIANTS, help="one variant, in this process")
    args = parser.parse_args()
    if args.variant:
        import uvloop

        from nodeagent.agent import heap
        heap.limit_arenas()  # as the agent: before any thread
        uvloop.run(_rounds(args.variant, args.rate, args.seconds, args.rounds))
        return
    for variant in VARIANTS:
        subprocess.run([sys.executable, "-m", "benchmarks.heap_churn", "--variant", variant, "--rate", str(args.rate),
                        "--seconds", str(args.seconds), "--rounds", str(args.rounds)], check=True)


if __name__ == "__main__":
    main()
