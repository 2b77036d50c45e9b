"""What registering the proxy's sockets with the data path costs per upstream connection.

  python -m benchmarks.socket_registration      (root; seconds; needs strace for the syscall count)

The proxy registers each socket it opens in a pod by its cookie (`proxy_socks`) before it
connects, instead of setting a mark (which any process in a pod could set too). This compiles
the data path into a scratch pin directory (no cgroup, nothing attached), then:
- syscalls: `strace -f -c` of N `upstream.open_socket` calls to a local listener, with the
  registration, against the same calls with the old `setsockopt(SO_MARK)` in its place;
- time: the median of ROUNDS rounds of N registrations (`Datapath.register_proxy_socket` on
  fresh sockets), per registration, with the spread. One JSON line.
"""

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nodeagent.datapath.control import Datapath
from nodeagent.datapath.loader import compile_and_load
from nodeagent.datapath.pins import DEFAULT_ROOT, PinLayout

N, ROUNDS = 2000, 5
OLD_MARK = 0x4E41
TRACED = ("getsockopt", "setsockopt", "bpf")

OPEN_SOCKETS = """
import asyncio, socket, sys
from pathlib import Path
from nodeagent.proxy import upstream
with_registration = sys.argv[1] == "cookie"
if with_registration:
    from nodeagent.datapath.control import Datapath
    from nodeagent.datapath.pins import PinLayout
    upstream.register_sockets_with(Datapath(PinLayout(Path(sys.argv[2]), "bench")).register_proxy_socket)
else:
    upstream.register_sockets_with(lambda s: s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, {mark}))
async def main():
    listener = socket.create_server(("127.0.0.1", 0), backlog={n})
    for _ in range({n}):
        sock = await upstream.open_socket("/proc/self/ns/net", listener.getsockname(), 5)
        sock.close()
        listener.accept()[0].close()
asyncio.run(main())
""".format(mark=OLD_MARK, n=N)


def syscalls_per_connection(way: str, root: Path) -> dict[str, float]:
    """strace -c counts of TRACED calls, per connection, for one way of telling the data path."""
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        subprocess.run(["strace", "-f", "-c", "-e", f"trace={','.join(TRACED)}", "-o", out.name,
                        sys.executable, "-c", OPEN_SOCKETS, way, str(root)], check=True, capture_output=True)
        counts = {}
        for line in out.read().splitlines():  # % time, seconds, usecs/call, calls, [errors], syscall
            fields = line.split()
            if len(fields) >= 5 and fields[-1] in TRACED:
                counts[fields[-1]] = int(fields[3]) / N
    return {name: round(counts.get(name, 0.0), 2) for name in TRACED}


def registration_us(datapath: Datapath) -> list[float]:
    import socket

    rounds = []
    for _ in range(ROUNDS):
        socks = [socket.socket() for _ in range(N)]
        started = time.perf_counter()
        for sock in socks:
            datapath.register_proxy_socket(sock)
        rounds.append((time.perf_counter() - started) / N * 1e6)
        for sock in socks:
            sock.close()
    return sorted(rounds)


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="nodeagent-bench-", dir=DEFAULT_ROOT.parent))
    try:
        layout = PinLayout(root, "bench")
        layout.maps.mkdir(parents=True)
        module, _, _ = compile_and_load(layout)
        del module
        with Datapath(layout) as datapath:
            timings = registration_us(datapath)
        result = {"connections": N, "syscalls_per_connection": {
            "mark": syscalls_per_connection("mark", root) if shutil.which("strace") else None,
            "cookie": syscalls_per_connection("cookie", root) if shutil.which("strace") else None},
            "registration_us_median": round(statistics.median(timings), 2),
            "registration_us_rounds": [round(t, 2) for t in timings]}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
