"""Memory per held connection, measured, and the per-pod limit that bounds each kind.

The real proxy serves two pods (`podpair.PodPair`: no lab, no BPF); a client in pod A holds
connections of one kind, and the proxy process's RSS is read with `step` of them held and with
`count` (the marginal cost: what one more such connection holds, whatever one-time costs the
first ones paid). Each measurement runs in a fresh process, with the per-pod limits raised so
that all `count` are admitted. Kinds:

| kind | what the client does | the per-pod limit that bounds it (and the timeout) |
|---|---|---|
| idle-detecting | connects to the proxy, sends nothing | detections (10 s, then opaque) |
| idle-keepalive | one HTTP/1.1 request, answered, then nothing | outbound-connections (keep-alive idle 60 s) |
| slowloris | a request head started, never finished | outbound-connections (the head must arrive within 10 s) |
| half-handshake | to pod B's mesh port, half a TLS ClientHello | handshakes, counted for the destination (10 s) |

`bound` runs the proxy with its default limits, opens each kind's limit + `OVER` and reports
how many the proxy kept (the rest it refused). Needs root; leaves nothing behind.

    python -m benchmarks.conncost measure KIND --count 500    # JSON: KiB per connection
    python -m benchmarks.conncost bound                       # JSON: held against each limit
"""

import argparse
import asyncio
import dataclasses
import json
import os
import resource
import ssl
import subprocess
import sys
import time

import uvloop

from nodeagent.ports import MESH_PORT
from nodeagent.proxy import limits
from nodeagent.proxy.limits import Limit

from benchmarks import podpair
from benchmarks.rounds import schedule

KINDS = {
    "idle-detecting": Limit.DETECTIONS,
    "idle-keepalive": Limit.OUTBOUND_CONNECTIONS,
    "slowloris": Limit.OUTBOUND_CONNECTIONS,
    "half-handshake": Limit.INBOUND_HANDSHAKES,
}
OVER = 50  # connections beyond the limit in `bound`
SETTLE_MAX_S = 5.0  # well inside the 10 s timeouts that would start closing what is measured
REQUEST = b"GET / HTTP/1.1\r\nhost: pod-b\r\n\r\n"
SLOWLORIS_START = b"GET / HTTP/1.1\r\nhost: pod-b\r\nx-slow: "


# --- the client, in pod A ---

def _half_client_hello() -> bytes:
    bio_in, bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(bio_in, bio_out, server_hostname="pod-b")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = bio_out.read()
    return hello[:len(hello) // 2]


async def _one(kind: str, host: str, port: int):
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        if kind == "idle-keepalive":
            writer.write(REQUEST)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = next((int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                           if line.startswith(b"content-length:")), 0)
            await asyncio.wait_for(reader.readexactly(length), 10)
        elif kind == "slowloris":
            writer.write(SLOWLORIS_START)
        elif kind == "half-handshake":
            writer.write(HALF_HELLO)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
        writer.close()
        return None
    return reader, writer


HALF_HELLO = _half_client_hello()


async def client(kind: str, host: str, port: int, steps: list[int]) -> None:
    """Open connections up to each step in turn; after each, print how many are held and wait
    for a line on stdin. Then close them all."""
    held: list = []
    stdin = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    for step in steps:
        opened = await asyncio.gather(*(_one(kind, host, port) for _ in range(step - len(held))))
        held += [c for c in opened if c]
        await asyncio.sleep(0.3)  # a refusal arrives as a reset shortly after the connect
        alive = sum(1 for reader, writer in held if not reader.at_eof() and not writer.is_closing())
        print(json.dumps({"opened": len(held), "held": alive}), flush=True)
        await stdin.readline()
    for _, writer in held:
        writer.close()


# --- the proxy's side ---

def _rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def _settled_rss() -> int:
    """RSS once the proxy has done what the new connections asked (RSS still for 0.3 s)."""
    deadline, last = time.monotonic() + SETTLE_MAX_S, _rss_kib()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        now = _rss_kib()
        if abs(now - last) < 64:
            return now
        last = now
    return _rss_kib()


def _target(pair: podpair.PodPair, kind: str) -> tuple[str, int]:
    if kind == "half-handshake":
        return podpair.B_IP, MESH_PORT
    return pair.aim("http")


async def _steps(pair: podpair.PodPair, kind: str, steps: list[int]) -> list[dict]:
    """Run a client of `kind` through `steps`; each step's client report and the proxy's RSS."""
    host, port = _target(pair, kind)
    served = pair.pods["pod-b" if kind == "half-handshake" else "pod-a"]
    already = pair.proxy.connections.count(served.key)  # e.g. pooled tunnels into B from an earlier kind
    process = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", pair.names[0], sys.executable, "-m", "benchmarks.conncost", "client", kind, host,
        str(port), *map(str, steps), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    reports = []
    try:
        for _ in steps:
            line = await asyncio.wait_for(process.stdout.readline(), 60)
            if not line:
                raise RuntimeError(f"the {kind} client ended early")
            rss = await _settled_rss()
            in_proxy = pair.proxy.connections.count(served.key) - already
            reports.append({**json.loads(line), "rss_kib": rss, "in_proxy": in_proxy})
            process.stdin.write(b"\n")
        await asyncio.wait_for(process.wait(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return reports


def _raise_nofile(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(wanted, hard)))


async def measure(kind: str, count: int) -> dict:
    from nodeagent.settings import DEFAULT

    roomy = limits.parse(",".join(f"{limit.value}={count * 4}" for limit in Limit))
    pair = await podpair.PodPair(dataclasses.replace(DEFAULT, pod_limits=roomy)).start()
    try:
        step = max(1, count // 5)
        first, last = await _steps(pair, kind, [step, count])
    finally:
        await pair.stop()
    added = last["held"] - first["held"]
    if added <= 0:
        raise RuntimeError(f"{kind}: no connection was held ({first}, {last})")
    return {"mode": kind, "workload": "memory per connection", "connections": last["held"],
            "kib_per_connection": round((last["rss_kib"] - first["rss_kib"]) / added, 2),
            "limit": KINDS[kind].value, "default_limit": limits.DEFAULTS[KINDS[kind]]}


async def bound() -> list[dict]:
    pair = await podpair.PodPair().start()
    rows = []
    try:
        for kind, limit in KINDS.items():
            wanted = limits.DEFAULTS[limit] + OVER
            (report,) = await _steps(pair, kind, [wanted])
            rows.append({"mode": kind, "workload": "held at the default limit", "limit": limit.value,
                         "default_limit": limits.DEFAULTS[limit], "opened": wanted, "held": report["held"],
                         "in_proxy": report["in_proxy"]})
            await asyncio.sleep(1.0)  # the proxy sees the closes and gives the pod's share back
    finally:
        await pair.stop()
    return rows


def _python_module(*args: str, timeout: float) -> str:
    try:
        done = subprocess.run([sys.executable, "-m", "benchmarks.conncost", *args], capture_output=True, text=True,
                              timeout=timeout)
    finally:
        _remove_orphans()
    if done.returncode != 0:
        raise RuntimeError(f"conncost {' '.join(args)} failed: {done.stderr.strip()[-800:]}")
    return done.stdout


def _remove_orphans() -> None:
    """The pod pairs of a measurement that was killed (its process gone, its namespaces left)."""
    for name in podpair.leftovers():
        pid = name[len(podpair.PREFIX):].split("-")[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def section(sizes, choice) -> list[dict]:
    """Each kind `sizes.rounds` times, interleaved, each in a fresh process; then the bounds."""
    if "node" not in choice.modes:
        return []
    rows = []
    for round_, kind in schedule(list(KINDS), sizes.rounds):
        row = json.loads(_python_module("measure", kind, "--count", str(sizes.conn_count), timeout=180))
        rows.append({**row, "round": round_})
        print(f"  conncost {kind}: {row['kib_per_connection']} KiB per connection ({row['connections']} held)",
              flush=True)
    for row in json.loads(_python_module("bound", timeout=300)):
        rows.append({**row, "round": 0})
        print(f"  conncost bound {row['mode']}: {row['held']} of {row['opened']} open at the client, "
              f"{row['in_proxy']} in the proxy (limit {row['default_limit']})", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure")
    m.add_argument("kind", choices=list(KINDS))
    m.add_argument("--count", type=int, default=500)
    sub.add_parser("bound")
    c = sub.add_parser("client")  # internal: run in pod A by `_steps`
    c.add_argument("kind", choices=list(KINDS))
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("steps", type=int, nargs="+")
    args = parser.parse_args()
    _raise_nofile(8 * max([getattr(args, "count", 0), *getattr(args, "steps", [0]), 2000]) + 256)
    if args.command == "client":
        uvloop.run(client(args.kind, args.host, args.port, args.steps))
    elif args.command == "measure":
        print(json.dumps(uvloop.run(measure(args.kind, args.count))))
    else:
        print(json.dumps(uvloop.run(bound())))


if __name__ == "__main__":
    main()
