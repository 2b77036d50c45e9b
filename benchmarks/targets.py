"""The project's targets (issues 13 and 17, the brief's memory target), judged from one run's
results: each a line of the report with the medians it compared and met or missed. Pure."""

from benchmarks.rounds import median, summarize

KEEPALIVE = "http1 keep-alive (wrk, 16 conns)"
HTTP2 = "http2 (h2load, 4 conns x 10 streams)"
NEW_CONNECTION = "http1 new connection per request (wrk)"
DAEMONSET_MEMORY_LIMIT_MIB = 512  # deploy/helm/nodeagent/templates/daemonset.yaml
SOAK_FLAT_MIB = 5.0


def _verdict(ok) -> str:
    return "-" if ok is None else ("met" if ok else "missed")


def _traffic(results: dict) -> dict:
    return {(r["mode"], r["workload"], r["path"]): r for r in summarize(results.get("traffic", []))}


def _ratio_line(by: dict, workload: str, field: str, target: float, what: str) -> list[str]:
    lines = []
    for path in ("same-node", "cross-node"):
        node, ref = median(by.get(("node", workload, path), {}), field), \
            median(by.get(("haproxy", workload, path), {}), field)
        ratio = node / ref if node and ref else None
        lines.append(f"| {what}, {path}: node / haproxy >= {target:g} | "
                     f"{'-' if ratio is None else f'{ratio:.2f} ({node:,.0f} / {ref:,.0f})'} | "
                     f"{_verdict(None if ratio is None else ratio >= target)} |")
    return lines


def table(results: dict) -> str:
    by = _traffic(results)
    lines = ["| target | this run (medians) | verdict |", "|---|---|---|"]
    lines += _ratio_line(by, KEEPALIVE, "rps", 1.0, "HTTP/1 keep-alive throughput")
    for path in ("same-node", "cross-node"):
        node = median(by.get(("node", KEEPALIVE, path), {}), "cpu_us_per_request")
        ref = median(by.get(("haproxy", KEEPALIVE, path), {}), "cpu_us_per_request")
        ok = None if node is None or ref is None else node <= ref
        lines.append(f"| mesh CPU per HTTP/1 request, {path}: node <= haproxy | "
                     f"{'-' if ok is None else f'{node:,.1f} vs {ref:,.1f} µs'} | {_verdict(ok)} |")
    lines += _ratio_line(by, HTTP2, "rps", 0.5, "HTTP/2 per request")
    lines += _ratio_line(by, NEW_CONNECTION, "rps", 0.8, "a new connection per request")
    for path in ("same-node", "cross-node"):
        loop = next((k[1] for k in by if k[0] == "node" and "open-loop" in k[1] and k[2] == path), None)
        node, none = (median(by.get((m, loop, path), {}), "p99_ms") for m in ("node", "none"))
        added = node - none if node is not None and none is not None else None
        lines.append(f"| added p99 at {loop.split()[-1] if loop else '-'}, {path}: <= 1 ms | "
                     f"{'-' if added is None else f'{added:+.2f} ms'} | {_verdict(None if added is None else added <= 1)} |")
    cost = {(r["mode"], r["pods"]): r for r in summarize(results.get("cost", []), keys=("mode", "pods"))}
    node, side = median(cost.get(("node", 50), {}), "rss_mib"), median(cost.get(("sidecar", 50), {}), "rss_mib")
    lines.append(f"| node-mode memory at 50 pods <= 1/10 of sidecar mode | "
                 f"{'-' if not (node and side) else f'{node:,.1f} vs {side:,.1f} MiB (1/{side / node:.0f})'} | "
                 f"{_verdict(None if not (node and side) else node * 10 <= side)} |")
    lines += _noisy(results) + _soak(results)
    return "\n".join(lines)


def _noisy(results: dict) -> list[str]:
    rows = {(r["mode"], r["path"], r["workload"].split()[1]): r for r in summarize(results.get("noisy", []))}
    if not rows:
        return []
    lines = []
    for _, path, proto in [k for k in rows if k[0] == "quiet"]:
        quiet, hit = rows[("quiet", path, proto)], rows.get(("attacked", path, proto), {})
        success = hit.get("success_pct", {}).get("min") if isinstance(hit.get("success_pct"), dict) else None
        q99, a99 = median(quiet, "p99_ms"), median(hit, "p99_ms")
        lines.append(f"| noisy neighbour, {proto} {path}: victim success 100% in every attacked run | "
                     f"{'-' if success is None else f'{success:.2f}% at the least'} | "
                     f"{_verdict(None if success is None else success >= 100)} |")
        lines.append(f"| noisy neighbour, {proto} {path}: victim p99 attacked <= 2x quiet | "
                     f"{'-' if not (q99 and a99) else f'{a99:.2f} vs {q99:.2f} ms ({a99 / q99:.2f}x)'} | "
                     f"{_verdict(None if not (q99 and a99) else a99 <= 2 * q99)} |")
    peak = max((r["agent_rss_peak_mib"]["max"] for r in rows.values() if isinstance(r.get("agent_rss_peak_mib"), dict)),
               default=None)
    lines.append(f"| noisy neighbour: the agent's peak RSS below the DaemonSet's {DAEMONSET_MEMORY_LIMIT_MIB} MiB | "
                 f"{'-' if peak is None else f'{peak:,.1f} MiB'} | "
                 f"{_verdict(None if peak is None else peak < DAEMONSET_MEMORY_LIMIT_MIB)} |")
    return lines


def _soak(results: dict) -> list[str]:
    phases = [r for r in results.get("soak", []) if r["workload"].startswith("phase")]
    if len(phases) < 2:
        return []
    growth = max(r["rss_mib"] for r in phases[1:]) - phases[0]["rss_mib"]
    return [f"| soak: agents' RSS after the warm-up phase flat within {SOAK_FLAT_MIB:g} MiB | "
            f"{growth:+.1f} MiB at the most over {len(phases) - 1} more phases | {_verdict(growth <= SOAK_FLAT_MIB)} |"]
