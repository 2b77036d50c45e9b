"""What of a new mesh connection's CPU the handshake steps take, as proxy/contention.py charges
them, through one real Proxy serving two pods (podpair.py, both ends of each hop in this process):

    python -m benchmarks.handshake_cpu [--connections 40] [--runs 3]

Pod A opens `--connections` short opaque connections (4 bytes echoed) to pod B's echo server one
after another, 20 ms apart. Reported, the median of `--runs` fresh proxies (min-max): the CPU the
handshake steps charged per connection, as client (pod A, outbound) and as server (pod B, inbound;
the first connection is a full handshake, the rest resume its session), and the process's whole
CPU per connection (the loop, the handshake threads and pod B's echo app). contention.HANDSHAKE_PART
is named from these. Needs root (network namespaces); removes what it made.
"""

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import replace

from benchmarks.podpair import A_IP, B_IP, NAMESPACE, PodPair, pod_object
from nodeagent.cluster.model import ClusterView
from nodeagent.proxy import contention
from nodeagent.settings import DEFAULT

CLIENT = """
import socket, time
for _ in range({count}):
    with socket.create_connection(("127.0.0.1", {port}), timeout=5) as s:
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
    time.sleep(0.02)
"""


async def one_run(connections: int) -> dict:
    charged = {"outbound": 0.0, "inbound": 0.0}
    charge = contention.LoopContention.charge

    def counted(self, key, cpu_s):
        charged[key[1]] += cpu_s
        charge(self, key, cpu_s)
    contention.LoopContention.charge = counted
    pair = await PodPair(replace(DEFAULT, on_node_plaintext=False)).start()
    try:
        pair.proxy.update_view(ClusterView([pod_object("pod-a", A_IP), pod_object("pod-b", B_IP)],
                                           namespaces=[{"metadata": {"name": NAMESPACE}}]))
        _, port = pair.aim("echo")
        cpu = time.process_time()
        done = await pair.run_in_a_async([sys.executable, "-c", CLIENT.format(count=connections, port=port)])
        cpu = time.process_time() - cpu
        if done.returncode != 0:
            raise SystemExit(done.stderr)
    finally:
        await pair.stop()
        contention.LoopContention.charge = charge
    return {"steps as client, ms": 1e3 * charged["outbound"] / connections,
            "steps as server, ms": 1e3 * charged["inbound"] / connections,
            "process, ms": 1e3 * cpu / connections}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=40)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    runs = [asyncio.run(one_run(args.connections)) for _ in range(args.runs)]
    print(json.dumps({name: f"{statistics.median(r[name] for r in runs):.2f} "
                            f"({min(r[name] for r in runs):.2f}-{max(r[name] for r in runs):.2f})"
                      for name in runs[0]}, indent=1))


if __name__ == "__main__":
    main()
