"""One proxy process on loopback, HTTP/2 per request: what a request costs the proxy's HTTP/2
layer (its codec, its exchanges, its pooled connection), with nothing else in the way.

    h2load (4 connections x 10 streams) -> proxy (one process, uvloop) -> nginx (h2c, "ok")

all on 127.0.0.1. The proxy is `Http2Server` with a target of one fixed endpoint (no mesh, no
TLS, no metrics: the same stages as in the agent from the client's stream to the endpoint's).
Per run: requests per second (h2load) and the proxy's CPU per request (utime + stime from
/proc/<pid>/stat over the run); the median of --runs runs, with min and max.

    python -m benchmarks.h2proxy [--requests 20000] [--runs 5] [--baseline CHECKOUT ...]

With --baseline (repeatable), the proxy of another checkout of this repository (e.g. a worktree
of an older commit) runs in turn with this one, run for run, so that a busy moment of the
machine hits each alike. On a shared machine the CPU per request is the number to trust: the
rate also measures what else ran meanwhile.
"""

import argparse
import asyncio
import json
import os
import pathlib
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

NGINX = """daemon off; worker_processes 1; pid {dir}/nginx.pid; error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off; client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  http2_max_requests 1000000; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{port} http2; location / {{ return 200 "ok\\n"; }} }}
}}
"""


class OneEndpoint:
    """The target of every request: one address, no retries, nothing counted."""

    request_timeout_s = None

    def __init__(self, address):
        from nodeagent.proxy.h2upstream import H2Pool
        self.address, self.pool = address, H2Pool()

    def retries(self, facts, request):
        from nodeagent.proxy.retry import Retries

        return Retries(facts, 0, frozenset(), None)  # a limit of 0: the budget is never asked

    def choose(self, tried):
        return None, self.address

    def pooled_h2(self, address):
        return self.pool.ready(0, address)

    async def acquire_h2(self, address):
        return await self.pool.acquire(None, 0, address, 5.0)

    def connect_failed(self, state, exc):
        pass

    @staticmethod
    def connect_failure_reason(exc):
        return "connect failed"

    def take_stream(self):
        return True

    def give_stream(self):
        pass

    def sending(self, request, address):
        pass

    def request_started(self, state, address):
        return None

    def request_finished(self, state, token, status, grpc_status=None):
        pass

    def request_abandoned(self, state, token):
        pass

    def count_response(self, request, status, address=None, failure=None):
        pass

    def count_error(self, status, reason):
        pass

    def count_limit(self, limit):
        pass

    def count_cut(self, reason):
        pass

    def count_http2_refusal(self, flood):
        pass


def serve(upstream_port: int) -> None:
    """The proxy process: prints its port, serves until killed."""
    import uvloop

    from nodeagent.proxy.http2 import Http2Server

    async def main():
        target = OneEndpoint(("127.0.0.1", upstream_port))
        server = await asyncio.get_running_loop().create_server(lambda: Http2Server(target), "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()
    uvloop.run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def h2load(port: int, requests: int) -> float:
    done = subprocess.run(["h2load", "-n", str(requests), "-c", "4", "-m", "10", f"http://127.0.0.1:{port}/"],
                          capture_output=True, text=True, timeout=300, check=True)
    succeeded = int(re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", done.stdout)[1])
    if succeeded != requests:
        raise RuntimeError(f"h2load: {succeeded} of {requests} succeeded\n{done.stdout}")
    return float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", done.stdout)[1])


REPO = pathlib.Path(__file__).resolve().parent.parent


def start_proxy(code: pathlib.Path, nginx_port: int) -> tuple[subprocess.Popen, int]:
    """A proxy process running the `nodeagent` of checkout `code`; its port."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    proxy = subprocess.Popen([sys.executable, str(pathlib.Path(__file__).resolve()), "serve", str(nginx_port)],
                             stdout=subprocess.PIPE, text=True, env=env, cwd=code)
    return proxy, int(proxy.stdout.readline())


def one_run(code: pathlib.Path, nginx_port: int, requests: int) -> tuple[float, float]:
    """(req/s, proxy CPU us per request) of a fresh proxy, after a warm-up."""
    proxy, port = start_proxy(code, nginx_port)
    try:
        h2load(port, 2000)  # warm-up: the pooled connection, the code paths
        before = cpu_seconds(proxy.pid)
        rate = h2load(port, requests)
        return rate, (cpu_seconds(proxy.pid) - before) / requests * 1e6
    finally:
        proxy.kill()
        proxy.wait(5)


def measure(requests: int, runs: int, codes: dict[str, pathlib.Path]) -> dict:
    workdir = tempfile.mkdtemp(prefix="h2proxy-bench-")
    nginx_port = free_port()
    with open(f"{workdir}/nginx.conf", "w") as conf:
        conf.write(NGINX.format(dir=workdir, port=nginx_port))
    nginx = subprocess.Popen(["nginx", "-c", f"{workdir}/nginx.conf", "-p", workdir],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    measured = {label: ([], []) for label in codes}
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", nginx_port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        for _ in range(runs):
            for label, code in codes.items():  # in turn: a busy moment hits each
                rate, cpu = one_run(code, nginx_port, requests)
                measured[label][0].append(rate)
                measured[label][1].append(cpu)
    finally:
        nginx.terminate()
        nginx.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)

    def summary(values):
        return {"median": statistics.median(values), "min": min(values), "max": max(values),
                "runs": [round(v, 1) for v in values]}
    return {label: {"requests_per_run": requests, "req_per_s": summary(rates), "cpu_us_per_request": summary(cpu)}
            for label, (rates, cpu) in measured.items()}


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        serve(int(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline", type=pathlib.Path, action="append", default=[],
                        help="another checkout to measure in turn (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    codes = {"this checkout": REPO}
    for baseline in args.baseline:
        codes[str(baseline)] = baseline.resolve()
    result = measure(args.requests, args.runs, codes)
    if args.json:
        print(json.dumps(result))
        return
    for label, measured in result.items():
        rate, cpu = measured["req_per_s"], measured["cpu_us_per_request"]
        print(f"{label:20} {rate['median']:6.0f} req/s (min {rate['min']:.0f}, max {rate['max']:.0f}); proxy CPU "
              f"{cpu['median']:6.1f} us per request (min {cpu['min']:.1f}, max {cpu['max']:.1f}); median of "
              f"{args.runs} runs x {args.requests} requests")


if __name__ == "__main__":
    main()
