"""How much a sender can queue toward an app that does not read, with each fast-path setting.

  python -m benchmarks.backpressure        (root; brings a lab up and down; about a minute)

Toward a pod: for each setting, a client outside the mesh (so the connection is plaintext and
spliceable) connects to a meshed pod on the other node whose app reads the first 8 MiB (time
for a splice to start) and then stops reading, and sends for 3 s (at most 1 GiB).
Inside a pod: the same reader and sender as two processes of one meshed pod, over loopback
(what the `loopback` fast path takes). TCP's flow control stops a sender after socket buffers'
worth; a fast path without backpressure lets it queue in the kernel. One JSON line per case.
"""

import json
import subprocess
import sys
import time

from nodeagent.lab import lab as lab_ops
from nodeagent.lab import pods

SETTINGS = {"off": [], "splice": ["--fast-path", "splice"], "splice,skb": ["--fast-path", "splice,skb"],
            "splice,loopback": ["--fast-path", "splice,loopback"]}
LIMIT = 1 << 30

HOLDER = """
import socket, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(('0.0.0.0', 7000)); srv.listen()
print('listening', flush=True)
conn, _ = srv.accept()
read = 0
while read < (8 << 20):
    read += len(conn.recv(1 << 20))
time.sleep(10)
"""

SENDER = """
import socket
s = socket.create_connection(({ip!r}, 7000)); s.settimeout(3)
sent = 0
try:
    while sent < {limit}:
        sent += s.send(b'x' * (1 << 20))
except OSError:
    pass
print(sent)
"""


def measure(agent_args: list[str], in_pod: bool) -> int:
    lab_ops.down()
    lab_ops.AGENT_EXTRA_ARGS = agent_args
    lab = lab_ops.up(nodes=2, pods_per_node=5, mesh="node")
    try:
        server = lab.plan.pod("echo-n0-0")
        client = server if in_pod else lab.plan.pod("client-n1-0")
        if not in_pod:
            lab_ops.label("client-n1-0", "nodeagent.io/mesh=disabled")
            time.sleep(1.0)  # the agent's next poll: the client is outside the mesh
        holder = subprocess.Popen(["ip", "netns", "exec", server.netns, sys.executable, "-c", HOLDER],
                                  stdout=subprocess.PIPE, text=True,
                                  preexec_fn=lambda: (lab.pod_cgroup(server) / "cgroup.procs").write_text("0"))
        try:
            holder.stdout.readline()
            target = "127.0.0.1" if in_pod else server.ip
            done = pods.run(client, lab.pod_cgroup(client),
                            [sys.executable, "-c", SENDER.format(ip=target, limit=LIMIT)], timeout_s=60)
            return int(done.stdout.strip())
        finally:
            holder.kill()
            holder.wait()
    finally:
        lab_ops.down()


def main() -> None:
    for in_pod in (False, True):
        for name, args in SETTINGS.items():
            if in_pod and name not in ("off", "splice,loopback"):
                continue  # only the loopback fast path acts between two processes of a pod
            sent = measure(args, in_pod)
            print(json.dumps({"case": "inside a pod" if in_pod else "toward a pod", "fast_path": name,
                              "queued_mib": round(sent / 2 ** 20, 1), "capped": sent >= LIMIT}), flush=True)


if __name__ == "__main__":
    main()
