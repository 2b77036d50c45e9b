"""What access logs and tracing cost the proxy per request, on the HTTP/1 keep-alive row.

    wrk (pod A, 1 thread, 16 keep-alive connections) -> the real Proxy (outbound hop, mutual TLS,
    inbound hop; benchmarks/podpair.py, in this process) -> nginx (pod B, HTTP/1.1, "ok")

Configurations, run in turn within each run (so a busy moment of the machine hits them all):
- off: no access log annotation, no --trace-collector (the proxy's default);
- on 1%: both pods annotated `config.nodeagent.io/access-log: json` (a line per hop, to a file),
  spans to a real OpenTelemetry Collector (tests' `make otelcol` build) at --trace-sampling 0.01;
- on 100%: the same, sampling 1.0 (a span per hop);
- and each alone, to tell their shares apart: the access log only, tracing only at 1% and 100%.
The clients send no trace headers, so every request starts a trace at the outbound hop and the
inbound hop follows its decision.

CPU per request: this process's utime + stime (the proxy's event loop and the writer and
exporter threads; not wrk, nginx or the collector) over the run, until the writers' queues are
empty, divided by the requests wrk completed. Lines and spans dropped are reported (a drop would
make a configuration look cheaper than it is). The median of --runs runs, with min and max.

    python -m benchmarks.telemetry_cost [--seconds 5] [--runs 5] [--json FILE]

Needs root (two network namespaces; no lab, no BPF); removes everything it made.

    python -m benchmarks.telemetry_cost --hooks [--runs 5]

The event loop's share alone, without the proxy around it, so that a busy machine blurs it
less: one hop's two hooks (`RequestLog.start` where a request starts, `RequestLog.response`
where its response is counted) on an HTTP/1 request as wrk sends it, per request, in µs, the
writers' threads stopped (their queues are emptied between rounds; no I/O). "off" is the target's
own check of its `log` attribute, as HttpTarget does it.
"""

import argparse
import asyncio
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.podpair import A_IP, B_IP, PodPair, pod_object
from benchmarks.proxy_cost import NGINX, NGINX_PORT
from nodeagent.cluster.model import ClusterView
from nodeagent.proxy.accesslog import ANNOTATION
from nodeagent.settings import parse

# name: (access log on both pods, trace sampling or None for no --trace-collector)
CONFIGS = {"off": (False, None), "on, 1% sampled": (True, 0.01), "on, 100% sampled": (True, 1.0),
           "access log only": (True, None), "tracing only, 1%": (False, 0.01), "tracing only, 100%": (False, 1.0)}


def view(access_log: bool) -> ClusterView:
    objects = []
    for name, ip in (("pod-a", A_IP), ("pod-b", B_IP)):
        obj = pod_object(name, ip)
        obj["metadata"]["annotations"] = {ANNOTATION: "json"} if access_log else {}
        objects.append(obj)
    return ClusterView(objects)


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def settle(log, tracer) -> None:
    """Until the writers' queues are empty (at most 10 s), and a batch taken from one is through."""
    for _ in range(200):
        if not log.entries and not (tracer and tracer.exporter.spans):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)


async def one_run(name: str, seconds: float, collector_url: str | None, workdir: Path) -> dict:
    access_log, sampling = CONFIGS[name]
    # 16 connections at once: each pod may run 16 handshakes by default, and wrk's first ones race.
    settings = replace(parse({"pod-limits": "handshakes=64"}), access_log=str(workdir / "access.log"))
    if sampling is not None:
        settings = replace(settings, trace_collector=collector_url, trace_sampling=sampling)
    pair = await PodPair(settings).start()
    nginx = None
    try:
        conf = workdir / "nginx.conf"
        conf.write_text(NGINX.format(dir=workdir, listen=f"{B_IP}:{NGINX_PORT}"))
        nginx = subprocess.Popen(["ip", "netns", "exec", pair.names[1], "nginx", "-c", str(conf)],
                                 stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            if pair._listening(NGINX_PORT):
                break
            await asyncio.sleep(0.05)
        pair.proxy.update_view(view(access_log))
        host, port = pair.aim(NGINX_PORT)
        url = f"http://{host}:{port}/"
        warm = await pair.run_in_a_async(["wrk", "-t1", "-c16", "-d1s", url], timeout=60)  # pools, TLS, caches
        assert warm.returncode == 0, warm.stderr
        telemetry = pair.proxy.telemetry
        log, tracer = telemetry.access_log, telemetry.tracer
        await settle(log, tracer)  # the warm-up's lines and spans out of the way
        lines0, dropped0 = log.written + len(log.entries), log.dropped  # the warm-up's count as written
        spans0 = (tracer.exporter.exported + len(tracer.exporter.spans), tracer.exporter.dropped) if tracer else (0, 0)
        before = cpu_s()
        done = await pair.run_in_a_async(["wrk", "-t1", "-c16", f"-d{seconds:g}s", url], timeout=seconds + 60)
        assert done.returncode == 0, done.stderr
        await settle(log, tracer)  # the writers' share of the run's work is done
        used = cpu_s() - before
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
        await pair.stop()
    requests = int(re.search(r"(\d+) requests in", done.stdout)[1])
    spans = ((tracer.exporter.exported - spans0[0], tracer.exporter.dropped - spans0[1]) if tracer else (0, 0))
    return {"config": name, "requests": requests, "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)[1]),
            "cpu_us_per_request": used / requests * 1e6, "lines": log.written - lines0,
            "lines_dropped": log.dropped - dropped0, "spans": spans[0], "spans_dropped": spans[1]}


def summary(results: list[dict]) -> list[dict]:
    rows = []
    for name in CONFIGS:
        runs = [r for r in results if r["config"] == name]
        cpu = [r["cpu_us_per_request"] for r in runs]
        rows.append({"config": name, "runs": len(runs), "cpu_us_per_request": statistics.median(cpu),
                     "cpu_min": min(cpu), "cpu_max": max(cpu), "rps": statistics.median(r["rps"] for r in runs),
                     "lines_per_request": sum(r["lines"] for r in runs) / sum(r["requests"] for r in runs),
                     "spans_per_request": sum(r["spans"] for r in runs) / sum(r["requests"] for r in runs),
                     "dropped": sum(r["lines_dropped"] + r["spans_dropped"] for r in runs)})
    return rows


def markdown(rows: list[dict], seconds: float) -> str:
    out = [f"HTTP/1 keep-alive (wrk, 16 connections, {seconds:g} s per run), proxy CPU per request "
           "(median of runs, min-max):", "",
           "| access log + tracing | µs/request | min-max | requests/s | lines/request | spans/request | dropped |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['config']} | {r['cpu_us_per_request']:.0f} | {r['cpu_min']:.0f}-{r['cpu_max']:.0f} | "
                   f"{r['rps']:.0f} | {r['lines_per_request']:.2f} | {r['spans_per_request']:.3f} | {r['dropped']} |")
    return "\n".join(out)


async def main_async(args) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from otel_collector import Collector

    results = []
    with Collector(verbosity="basic") as collector, tempfile.TemporaryDirectory(prefix="telemetry-cost-") as tmp:
        for run in range(args.runs):
            for name in CONFIGS:
                workdir = Path(tmp) / f"{run}-{len(results)}"
                workdir.mkdir()
                result = await one_run(name, args.seconds, collector.url, workdir)
                print(json.dumps(result), file=sys.stderr)
                results.append(result)
                time.sleep(0.5)
    return results


CHUNK = 2000
HOOK_CONFIGS = {"off": (False, None), "access log (json)": (True, None), "tracing, 1%": (False, 0.01),
                "tracing, 100%": (False, 1.0), "both, 1%": (True, 0.01), "both, 100%": (True, 1.0)}


def hooks(runs: int, requests: int = 20000) -> str:
    """Per-request µs of one hop's hooks, each configuration in turn within a run."""
    import logging
    import timeit

    from nodeagent.identity import naming
    from nodeagent.proxy.context import PodContext
    from nodeagent.proxy.http1 import Request
    from nodeagent.proxy.limits import PodLimits, Quota
    from nodeagent.proxy.metrics import Metrics
    from nodeagent.proxy.problems import ProblemLog
    from nodeagent.proxy.telemetry import Telemetry

    cluster = view(True)
    info = cluster.pods["bench/pod-a"]
    pod = PodContext(info, -1, 1, 0, naming.of_pod(info.namespace, info.service_account), Quota(PodLimits()))
    headers = [(b"Host", b"127.0.0.1:15001")]  # what wrk sends
    results = {name: [] for name in HOOK_CONFIGS}
    for _ in range(runs):
        for name, (access_log, sampling) in HOOK_CONFIGS.items():
            settings = replace(parse({}), access_log="/dev/null")
            if sampling is not None:
                settings = replace(settings, trace_collector="http://127.0.0.1:9", trace_sampling=sampling)
            metrics = Metrics()
            telemetry = Telemetry(settings, metrics, ProblemLog(logging.getLogger("bench")),
                                  lambda: cluster if access_log else view(False))
            log = telemetry.requests("outbound", pod, "pod/bench/pod-b", "pod/bench/pod-b:8090")
            writer, exporter = telemetry.access_log, telemetry.tracer.exporter if telemetry.tracer else None
            for queue_owner in filter(None, (writer, exporter)):  # a thread never started: nothing written or sent
                queue_owner._thread = threading.Thread(target=lambda: None)
            target = type("Target", (), {"log": log})()
            request = Request(method="GET", url=bytearray(b"/"), headers=headers, started=0.0)

            def one() -> None:
                request.headers = list(headers)
                request.span = None
                if target.log is not None:
                    target.log.start(request)
                if target.log is not None:
                    target.log.response(request, 200, True, None, ("10.255.0.2", 8090))

            def empty() -> None:
                request.headers = list(headers)
                request.span = None

            spent = 0.0
            for _ in range(requests // CHUNK):  # each chunk within the queues' bounds: no drops
                spent += timeit.timeit(one, number=CHUNK) - timeit.timeit(empty, number=CHUNK)
                writer.entries.clear()
                if exporter:
                    exporter.spans.clear()
            assert writer.dropped == 0 and (exporter is None or exporter.dropped == 0)
            results[name].append(spent / (requests // CHUNK * CHUNK) * 1e6)
    out = [f"One hop's hooks per HTTP/1 request, µs on the event loop (median of {runs} runs of {requests:,}, "
           "min-max; writers' threads stopped):", "", "| configuration | µs/request | min-max |", "|---|---|---|"]
    for name, values in results.items():
        out.append(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f}-{max(values):.2f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", help="write every run's numbers here")
    parser.add_argument("--hooks", action="store_true", help="only the hooks' cost on the event loop")
    args = parser.parse_args()
    if args.hooks:
        print(hooks(args.runs))
        return
    results = asyncio.run(main_async(args))
    rows = summary(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "summary": rows}, indent=1))
    print(markdown(rows, args.seconds))


if __name__ == "__main__":
    main()
