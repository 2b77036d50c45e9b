"""results.json -> a Markdown report and PNG plots, with each mode's ratio to
no mesh and to HAProxy from the same run."""

from pathlib import Path

MODE_ORDER = ("none", "node", "sidecar", "haproxy")


def _fmt(value, digits=1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _main_metric(row: dict) -> tuple[str, float | None, bool]:
    """(unit, value, higher is better) of one traffic result."""
    if "mib_per_s" in row:
        return "MiB/s", row["mib_per_s"], True
    if "rps" in row:
        return "req/s", row["rps"], True
    return "p99 ms", row.get("p99_ms"), False


def traffic_table(results: dict) -> str:
    rows = results["traffic"]
    modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in rows)]
    lines = ["| workload | path | unit | " + " | ".join(modes) + " | node / none | node / haproxy |",
             "|---|---|---|" + "---|" * len(modes) + "---|---|"]
    keys = []
    for r in rows:
        if (r["workload"], r["path"]) not in keys:
            keys.append((r["workload"], r["path"]))
    for workload, path in keys:
        cells = {r["mode"]: r for r in rows if r["workload"] == workload and r["path"] == path}
        unit = _main_metric(next(iter(cells.values())))[0]
        values = {m: _main_metric(cells[m])[1] if m in cells else None for m in modes}

        def ratio(a, b):
            return f"{values[a] / values[b]:.2f}" if values.get(a) and values.get(b) else "-"

        lines.append(f"| {workload} | {path} | {unit} | " + " | ".join(_fmt(values[m]) for m in modes)
                     + f" | {ratio('node', 'none')} | {ratio('node', 'haproxy')} |")
    return "\n".join(lines)


def latency_table(results: dict) -> str:
    rows = [r for r in results["traffic"] if "open-loop" in r["workload"]]
    lines = ["| mode | path | p50 ms | p90 ms | p99 ms | max ms | added p99 vs none | errors |",
             "|---|---|---|---|---|---|---|---|"]
    base = {r["path"]: r["p99_ms"] for r in rows if r["mode"] == "none"}
    for r in sorted(rows, key=lambda r: (MODE_ORDER.index(r["mode"]), r["path"])):
        added = r["p99_ms"] - base[r["path"]] if r["path"] in base and r["p99_ms"] is not None else None
        lines.append(f"| {r['mode']} | {r['path']} | {_fmt(r['p50_ms'], 2)} | {_fmt(r['p90_ms'], 2)} | "
                     f"{_fmt(r['p99_ms'], 2)} | {_fmt(r['max_ms'], 2)} | {_fmt(added, 2)} | {r['errors']} |")
    return "\n".join(lines)


def cpu_table(results: dict) -> str:
    rows = [r for r in results["traffic"] if "keep-alive" in r["workload"] and r["mode"] != "none"]
    lines = ["| mode | path | req/s | mesh CPU s | mesh CPU ms per 1,000 requests |", "|---|---|---|---|---|"]
    for r in rows:
        requests = r["rps"] * results["sizes"]["seconds"]
        per_k = r["mesh_cpu_s"] * 1000 / (requests / 1000) if requests else None
        lines.append(f"| {r['mode']} | {r['path']} | {_fmt(r['rps'])} | {_fmt(r['mesh_cpu_s'], 2)} | "
                     f"{_fmt(per_k, 1)} |")
    return "\n".join(lines)


def cost_table(results: dict) -> str:
    rows = results["cost"]
    lines = ["| pods per node | node mode RSS MiB | sidecar mode RSS MiB | node / sidecar | node start-up s | "
             "sidecars start-up s | processes (node / sidecar) |", "|---|---|---|---|---|---|---|"]
    for count in sorted({r["pods"] for r in rows}):
        node = next((r for r in rows if r["mode"] == "node" and r["pods"] == count), {})
        side = next((r for r in rows if r["mode"] == "sidecar" and r["pods"] == count), {})
        ratio = f"{node['rss_mib'] / side['rss_mib']:.3f}" if node and side and side["rss_mib"] else "-"
        lines.append(f"| {count} | {_fmt(node.get('rss_mib'))} | {_fmt(side.get('rss_mib'))} | {ratio} | "
                     f"{_fmt(node.get('startup_s'), 2)} | {_fmt(side.get('startup_s'), 2)} | "
                     f"{node.get('processes', '-')} / {side.get('processes', '-')} |")
    enrol = [r["enrol_ms"] for r in rows if r.get("enrol_ms") is not None]
    if enrol:
        lines.append(f"\nTime to enrol a pod (label change to served), node mode: {', '.join(map(str, enrol))} ms.")
    return "\n".join(lines)


def fast_path_table(results: dict) -> str:
    """Each fast-path setting beside no mesh, per workload and path; 'spliced' is what the
    kernel carried past the proxy during that workload."""
    rows = results.get("fast_paths", [])
    if not rows:
        return "(not run)"
    variants = list(dict.fromkeys(r["mode"] for r in rows))
    lines = ["| workload | path | unit | " + " | ".join(variants) + " | best fast / none | spliced MiB |",
             "|---|---|---|" + "---|" * len(variants) + "---|---|"]
    keys = list(dict.fromkeys((r["workload"], r["path"]) for r in rows))
    for workload, path in keys:
        cells = {r["mode"]: r for r in rows if r["workload"] == workload and r["path"] == path}
        unit, _, higher = _main_metric(next(iter(cells.values())))
        values = {v: _main_metric(cells[v])[1] if v in cells else None for v in variants}
        fast = [values[v] for v in variants if v.startswith("+") and values[v] is not None]
        best = (max(fast) if higher else min(fast)) if fast else None
        ratio = f"{best / values['none']:.2f}" if best and values.get("none") else "-"
        spliced = " / ".join(_fmt(cells[v].get("spliced_mib")) for v in variants if v.startswith("+") and v in cells)
        lines.append(f"| {workload} | {path} | {unit} | " + " | ".join(_fmt(values[v]) for v in variants)
                     + f" | {ratio} | {spliced} |")
    return "\n".join(lines)


def workers_table(results: dict) -> str:
    rows = results.get("workers", [])
    if not rows:
        return "(not run)"
    variants = list(dict.fromkeys(r["mode"] for r in rows))
    lines = ["| workload | path | unit | " + " | ".join(f"{v} (median; runs)" for v in variants) + " |",
             "|---|---|---|" + "---|" * len(variants)]
    for workload, path in dict.fromkeys((r["workload"], r["path"]) for r in rows):
        cells = {r["mode"]: r for r in rows if r["workload"] == workload and r["path"] == path}
        unit = _main_metric(next(iter(cells.values())))[0]

        def cell(variant):
            r = cells.get(variant)
            if r is None:
                return "-"
            return f"{_fmt(_main_metric(r)[1], 2 if unit.endswith('ms') else 1)} ({', '.join(_fmt(v, 2 if unit.endswith('ms') else 0) for v in r['runs'])})"

        lines.append(f"| {workload} | {path} | {unit} | " + " | ".join(cell(v) for v in variants) + " |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    m = results["machine"]
    return "\n\n".join([
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}. Run took {results.get('duration_s', '?')} s"
        + (" (smoke sizes: not a measurement)." if results["smoke"] else "."),
        "### Traffic\n\n" + traffic_table(results),
        "### Open-loop latency\n\n" + latency_table(results),
        "### CPU of the mesh's processes\n\n" + cpu_table(results),
        "### Kernel fast paths (node mode)\n\n" + fast_path_table(results),
        "### Worker processes (node mode)\n\n" + workers_table(results),
        "### Cost as pods per node grow\n\n" + cost_table(results),
    ]) + "\n"


def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    latency = [r for r in results["traffic"] if "open-loop" in r["workload"] and r["path"] == "same-node"]
    if latency:
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.2
        for i, q in enumerate(("p50_ms", "p90_ms", "p99_ms")):
            ax.bar([x + i * width for x in range(len(latency))], [r[q] or 0 for r in latency], width, label=q[:-3])
        ax.set_xticks([x + width for x in range(len(latency))], [r["mode"] for r in latency])
        ax.set_ylabel("ms")
        ax.set_title(f"Open-loop latency, same node ({latency[0]['workload']})")
        ax.legend()
        written.append(_save(fig, out / "latency.png"))
    cost = results["cost"]
    if cost:
        fig, ax = plt.subplots(figsize=(7, 4))
        for mode in ("node", "sidecar"):
            rows = sorted((r for r in cost if r["mode"] == mode), key=lambda r: r["pods"])
            ax.plot([r["pods"] for r in rows], [r["rss_mib"] for r in rows], marker="o", label=f"{mode} mode")
        ax.set_xlabel("pods per node")
        ax.set_ylabel("resident memory of the mesh, MiB")
        ax.set_title("Memory vs pods")
        ax.legend()
        written.append(_save(fig, out / "memory.png"))
    throughput = [r for r in results["traffic"] if "keep-alive" in r["workload"] and r["path"] == "same-node"]
    if throughput:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar([r["mode"] for r in throughput], [r["rps"] for r in throughput])
        ax.set_ylabel("requests/s")
        ax.set_title("HTTP/1.1 keep-alive throughput, same node")
        written.append(_save(fig, out / "throughput.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
