"""One proxy process serving two pods on one veth pair (benchmarks/podpair.py), HTTP/1 keep-alive
(or HTTP/2 with --protocol h2): what a request costs the proxy process in CPU, from the client's
request to the app's response.

    h2load --h1 (pod A, 16 connections) -> Proxy (this process) -> nginx (pod B, HTTP/1, "ok")
    h2load (h2c, 16 connections, a stream at a time each) -> Proxy -> nginx (pod B, h2c, "ok")

Modes (pod A is always meshed):
- mesh: pod B meshed too: A's outbound, the mutual-TLS hop and B's inbound, all in this one process,
  as when both pods are on one node (the two ends of `make bench`'s mesh CPU, without the kernel's
  capture);
- one-hop: the same pods with on-node plaintext on (--on-node-plaintext true): the proxy serves
  both ends in one pass (hop.py ON_NODE, on_node.py), no TLS (HTTP/2 too: one shared connection
  to B's app, from B's namespace);
- plain: pod B outside the mesh: A's outbound to B's address, plaintext.

CPU: the proxy process's utime + stime (getrusage, every thread: the TLS handshake threads too)
over the measured requests, after a warm-up; not wall time, so other work on the machine does
not enter it. Each run is a fresh process (one pair of pods, one proxy); the median of --runs
runs with min and max. Needs root (network namespaces); nothing leaves the pair.

    python -m benchmarks.proxy_cost [--modes mesh,plain] [--requests 20000] [--runs 5] [--baseline CHECKOUT ...]
    python -m benchmarks.proxy_cost --protocol h2 --modes mesh,one-hop   # HTTP/2 from client to app
    python -m benchmarks.proxy_cost --modes mesh --new-connections 5   # wrk, Connection: close, 5 s a run

With --baseline, the proxy of another checkout of this repository (e.g. a worktree of an older
commit) runs in turn with this one, run for run, so that a busy moment of the machine hits both;
given more than once, each checkout in turn (labelled by its commit).
"""

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import re
import resource
import statistics
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
CONNECTIONS = 16
WARMUP = 2000
NGINX_PORT = 8090
NGINX_H2_PORT = 8091  # the same "ok", in h2c (prior knowledge)
NGINX = """daemon off; worker_processes 1; pid {dir}/nginx.pid; error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off; client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  keepalive_requests 1000000;
  server {{ listen {listen}; location / {{ return 200 "ok\\n"; }} }}
}}
"""
# The same with the "ok" in h2c too (telemetry_cost.py formats NGINX with `listen` alone).
NGINX_H1_H2 = NGINX.replace("}}\n}}", '}}\n  server {{ listen {listen_h2} http2; location / {{ return 200 "ok\\n"; }} }}\n}}')
MODES = ("mesh", "one-hop", "plain")
PROTOCOLS = ("h1", "h2")


def cpu_seconds() -> tuple[float, float]:
    """(user, system) CPU seconds of this process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def wrk_close(pair, seconds: float, connections: int = CONNECTIONS) -> tuple[int, float]:
    """A new connection per request from pod A through the proxy (wrk, `Connection: close`), for
    `seconds`; (requests, req/s). Every response must be a 2xx with no socket error."""
    host, port = pair.aim(NGINX_PORT)
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "-H", "Connection: close", f"http://{host}:{port}/"]
    done = pair.run_in_a(argv)
    found = re.search(r"(\d+) requests in", done.stdout)
    if found is None or "Non-2xx" in done.stdout or "Socket errors" in done.stdout:
        raise RuntimeError(f"wrk: not every request succeeded\n{done.stdout}{done.stderr}")
    return int(found[1]), float(re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)[1])


def h2load(pair, requests: int, connections: int = CONNECTIONS, strict: bool = True, protocol: str = "h1") -> float:
    """Keep-alive HTTP/1 (or h2c) from pod A through the proxy; req/s. `strict`: every request must succeed."""
    host, port = pair.aim(NGINX_PORT if protocol == "h1" else NGINX_H2_PORT)
    argv = ["h2load", *(["--h1"] if protocol == "h1" else []), "-n", str(requests), "-c", str(connections),
            f"http://{host}:{port}/"]
    done = pair.run_in_a(argv)
    found = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", done.stdout)
    if found is None or (strict and int(found[1]) != requests):
        raise RuntimeError(f"h2load: not every request succeeded\n{done.stdout}{done.stderr}")
    return float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", done.stdout)[1])


@contextlib.asynccontextmanager
async def nginx_in_pod_b(pair):
    """nginx answering "ok" on NGINX_PORT in pod B while the block runs (stopped and its files
    removed after, whatever happens)."""
    workdir = tempfile.mkdtemp(prefix="proxy-cost-")
    with open(f"{workdir}/nginx.conf", "w") as conf:
        conf.write(NGINX_H1_H2.format(dir=workdir, listen=NGINX_PORT, listen_h2=NGINX_H2_PORT))
    nginx = subprocess.Popen(["ip", "netns", "exec", pair.names[1], "nginx", "-c", f"{workdir}/nginx.conf",
                              "-p", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if pair._listening(NGINX_PORT) and pair._listening(NGINX_H2_PORT):
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError("nginx in pod B did not start")
        yield
    finally:
        nginx.terminate()
        nginx.wait(5)
        subprocess.run(["rm", "-rf", workdir])


async def one_run(requests: int, mode: str, close_seconds: float | None = None, protocol: str = "h1") -> dict:
    """In a fresh process: two pods, nginx in B, the proxy here; the measured requests' cost.
    With `close_seconds`, a new connection per request for that long instead of `requests`."""
    import dataclasses

    from benchmarks.podpair import PodPair
    from nodeagent.settings import DEFAULT

    pair = await PodPair(dataclasses.replace(DEFAULT, on_node_plaintext=mode == "one-hop")).start()
    try:
        async with nginx_in_pod_b(pair):
            return await _measured(pair, requests, close_seconds, protocol)
    finally:
        await pair.stop()


async def _measured(pair, requests: int, close_seconds: float | None, protocol: str) -> dict:
    """The proxy's CPU over the measured requests, after a warm-up."""
    # Warm-up: the code paths, and the pooled connections in two steps (16 new mutual-TLS
    # handshakes at once would meet the pods' `handshakes` limit, rightly refused with a 502).
    for connections in (CONNECTIONS // 2, CONNECTIONS):
        await asyncio.to_thread(h2load, pair, WARMUP // 2, connections, False, protocol)
    if close_seconds is not None:  # the code paths of a new connection too, and a session to resume
        await asyncio.to_thread(wrk_close, pair, 1)
    before = cpu_seconds()
    if close_seconds is None:
        rate = await asyncio.to_thread(h2load, pair, requests, CONNECTIONS, True, protocol)
    else:
        requests, rate = await asyncio.to_thread(wrk_close, pair, close_seconds)
    user, system = (after - start for after, start in zip(cpu_seconds(), before))
    return {"requests": requests, "req_per_s": rate, "cpu_us_per_request": (user + system) / requests * 1e6,
            "system_us_per_request": system / requests * 1e6}


def run_child(code: pathlib.Path, mode: str, requests: int, close_seconds: float | None = None,
              protocol: str = "h1") -> dict:
    """One run in a fresh process importing the `nodeagent` (and podpair) of checkout `code`."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    env.pop("BENCH_PLAIN", None)
    if mode == "plain":
        env["BENCH_PLAIN"] = "1"  # podpair: pod B outside the mesh
    close = [] if close_seconds is None else [str(close_seconds)]
    done = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "one", str(requests), mode, *close,
                           protocol],
                          capture_output=True, text=True, env=env, cwd=code, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"a {mode} run of {code} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def commit_of(checkout: pathlib.Path) -> str:
    done = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or checkout.name


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": [round(v, 1) for v in values]}


def measure(modes: list[str], requests: int, runs: int, codes: dict[str, pathlib.Path],
            close_seconds: float | None = None, protocol: str = "h1") -> dict:
    measured = {(label, mode): [] for label in codes for mode in modes}
    for _ in range(runs):
        for mode in modes:
            for label, code in codes.items():  # in turn: a busy moment hits each
                measured[label, mode].append(run_child(code, mode, requests, close_seconds, protocol))
    return {f"{label} {mode}": {"requests_per_run": summary([r["requests"] for r in results]),
                                "req_per_s": summary([r["req_per_s"] for r in results]),
                                "cpu_us_per_request": summary([r["cpu_us_per_request"] for r in results]),
                                "system_us_per_request": summary([r["system_us_per_request"] for r in results])}
            for (label, mode), results in measured.items()}


def main() -> None:
    if sys.argv[1:2] == ["one"]:
        import uvloop

        # one REQUESTS MODE [CLOSE_SECONDS] [h1|h2]
        extra = sys.argv[4:]
        protocol = extra.pop() if extra and extra[-1] in PROTOCOLS else "h1"
        close_seconds = float(extra[0]) if extra else None
        print(json.dumps(uvloop.run(one_run(int(sys.argv[2]), sys.argv[3], close_seconds, protocol))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline", type=pathlib.Path, action="append", default=[],
                        help="another checkout to measure in turn (repeatable)")
    parser.add_argument("--new-connections", type=float, metavar="SECONDS",
                        help="a new connection per request (wrk, Connection: close) for SECONDS per run, "
                             "instead of --requests over keep-alive connections")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="h1", help="what pod A speaks to pod B's app")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    if args.protocol == "h2" and args.new_connections:
        parser.error("--new-connections measures HTTP/1 only")
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")
    codes = {"this checkout": REPO}
    for checkout in args.baseline:
        codes["baseline" if len(args.baseline) == 1 else f"at {commit_of(checkout)}"] = checkout.resolve()
    result = measure(modes, args.requests, args.runs, codes, args.new_connections, args.protocol)
    if args.json:
        print(json.dumps(result))
        return
    for label, measured in result.items():
        rate, cpu, system = measured["req_per_s"], measured["cpu_us_per_request"], measured["system_us_per_request"]
        print(f"{label:20} {args.protocol} proxy CPU {cpu['median']:6.1f} us per request (min {cpu['min']:.1f}, max {cpu['max']:.1f}; "
              f"kernel {system['median']:.1f}); "
              f"{rate['median']:6.0f} req/s (min {rate['min']:.0f}, max {rate['max']:.0f}); median of "
              f"{args.runs} runs x {measured['requests_per_run']['median']:.0f} requests"
              f"{' (a new connection each)' if args.new_connections else ''}")


if __name__ == "__main__":
    main()
