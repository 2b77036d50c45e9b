"""results.json -> a Markdown report and PNG plots. Every cell is the median of a row's runs
with their min-max (rounds.summarize); ratios are of medians from the same run."""

from pathlib import Path

from benchmarks import targets
from benchmarks.rounds import median, summarize

MODE_ORDER = ("none", "node", "sidecar", "haproxy")
MESH_MODES = ("node", "sidecar", "haproxy")
FAST_COLUMNS = ("none", "node", "node, on-node plaintext", "+ splice", "+ splice + skb", "+ splice + skb + loopback")
WORKER_COLUMNS = ("node, 1 process", "node")


def _fmt(value, digits=1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def cell(row: dict | None, field: str, digits: int = 1) -> str:
    """'median (min-max)' of a summarized field; just the value when there was one run."""
    value = (row or {}).get(field)
    if not isinstance(value, dict):
        return "-"
    if value["n"] == 1 or value["min"] == value["max"]:
        return _fmt(value["median"], digits)
    return f"{_fmt(value['median'], digits)} ({_fmt(value['min'], digits)}-{_fmt(value['max'], digits)})"


def _main_field(row: dict) -> tuple[str, str, bool, int]:
    """(unit, field, higher is better, digits) of a traffic row."""
    if "mib_per_s" in row:
        return "MiB/s", "mib_per_s", True, 1
    if "rps" in row:
        return "req/s", "rps", True, 0
    return "p99 ms", "p99_ms", False, 2


def _grid(rows: list[dict]) -> tuple[list[tuple], dict]:
    """(workload, path) keys in first-seen order, and (mode, workload, path) -> row."""
    keys = list(dict.fromkeys((r["workload"], r["path"]) for r in rows))
    return keys, {(r["mode"], r["workload"], r["path"]): r for r in rows}


def _mode_grid(rows: list[dict], allowed: tuple[str, ...]) -> tuple[list[str], list[tuple], dict]:
    """The modes present (in `allowed` order), the (workload, path) keys, (mode, workload, path) -> row."""
    rows = [r for r in rows if r["mode"] in allowed]
    return [m for m in allowed if any(r["mode"] == m for r in rows)], *_grid(rows)


def _first(by: dict, workload: str, path: str) -> dict:
    return next(by[k] for k in by if k[1:] == (workload, path))


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def traffic_table(rows: list[dict]) -> str:
    modes, keys, by = _mode_grid(rows, MODE_ORDER)
    lines = ["| workload | path | unit | " + " | ".join(modes) + " | node / none | node / haproxy |",
             "|---|---|---|" + "---|" * len(modes) + "---|---|"]
    for workload, path in keys:
        if not any((m, workload, path) in by for m in modes if m != "node") and "64 conns" in workload:
            continue  # node only: the worker section's
        unit, field, _, digits = _main_field(_first(by, workload, path))
        values = {m: median(by.get((m, workload, path), {}), field) for m in modes}
        lines.append(f"| {workload} | {path} | {unit} | "
                     + " | ".join(cell(by.get((m, workload, path)), field, digits) for m in modes)
                     + f" | {_ratio(values.get('node'), values.get('none'))}"
                     + f" | {_ratio(values.get('node'), values.get('haproxy'))} |")
    return "\n".join(lines)


def latency_table(rows: list[dict]) -> str:
    rows = [r for r in rows if "open-loop" in r["workload"] and r["mode"] in MODE_ORDER]
    lines = ["| mode | path | p50 ms | p90 ms | p99 ms | max ms | added p99 vs none | errors |",
             "|---|---|---|---|---|---|---|---|"]
    base = {r["path"]: median(r, "p99_ms") for r in rows if r["mode"] == "none"}
    for r in sorted(rows, key=lambda r: (MODE_ORDER.index(r["mode"]), r["path"])):
        p99 = median(r, "p99_ms")
        added = p99 - base[r["path"]] if base.get(r["path"]) is not None and p99 is not None else None
        errors = median(r, "errors")
        lines.append(f"| {r['mode']} | {r['path']} | {cell(r, 'p50_ms', 2)} | {cell(r, 'p90_ms', 2)} | "
                     f"{cell(r, 'p99_ms', 2)} | {cell(r, 'max_ms', 2)} | {_fmt(added, 2)} | "
                     f"{_fmt(r['errors']['max'], 0) if isinstance(r.get('errors'), dict) else errors} |")
    return "\n".join(lines)


def cpu_table(rows: list[dict]) -> str:
    """µs of the mesh's CPU per request (per MiB: ms), every mode with a mesh, every workload."""
    modes, keys, by = _mode_grid(rows, MESH_MODES)
    lines = ["| workload | path | unit | " + " | ".join(modes) + " | node / haproxy |",
             "|---|---|---|" + "---|" * len(modes) + "---|"]
    for workload, path in keys:
        sample = _first(by, workload, path)
        field, unit = ("cpu_ms_per_mib", "ms per MiB") if "cpu_ms_per_mib" in sample else \
            ("cpu_us_per_request", "µs per request")
        values = {m: median(by.get((m, workload, path), {}), field) for m in modes}
        lines.append(f"| {workload} | {path} | {unit} | "
                     + " | ".join(cell(by.get((m, workload, path)), field, 1) for m in modes)
                     + f" | {_ratio(values.get('node'), values.get('haproxy'))} |")
    return "\n".join(lines)


def load_memory_table(rows: list[dict]) -> str:
    """Peak RSS of all the mesh's processes (both nodes) while each workload ran."""
    modes, keys, by = _mode_grid(rows, MESH_MODES)
    lines = ["| workload | path | " + " | ".join(f"{m} MiB" for m in modes) + " |", "|---|---|" + "---|" * len(modes)]
    for workload, path in keys:
        lines.append(f"| {workload} | {path} | "
                     + " | ".join(cell(by.get((m, workload, path)), "rss_load_mib", 1) for m in modes) + " |")
    return "\n".join(lines)


def variants_table(rows: list[dict], columns: tuple[str, ...], spliced: bool) -> str:
    present = [c for c in columns if any(r["mode"] == c for r in rows)]
    own = [c for c in present if c not in MODE_ORDER]
    if not own:
        return "(not run)"
    keys, by = _grid([r for r in rows if r["mode"] in own])
    lines = ["| workload | path | unit | " + " | ".join(present) + (" | spliced MiB |" if spliced else " |"),
             "|---|---|---|" + "---|" * len(present) + ("---|" if spliced else "")]
    for workload, path in keys:
        unit, field, _, digits = _main_field(_first(by, workload, path))
        cells = {c: next((r for r in rows if (r["mode"], r["workload"], r["path"]) == (c, workload, path)), None)
                 for c in present}
        line = f"| {workload} | {path} | {unit} | " + " | ".join(cell(cells[c], field, digits) for c in present)
        if spliced:
            line += " | " + " / ".join(_fmt(median(cells[c] or {}, "spliced_mib")) for c in own)
        lines.append(line + " |")
    return "\n".join(lines)


def cost_table(runs: list[dict]) -> str:
    if not runs:
        return "(not run)"
    rows = summarize(runs, keys=("mode", "pods"))
    lines = ["| pods per node | node mode RSS MiB | sidecar mode RSS MiB | node / sidecar | node start-up s | "
             "sidecars start-up s | processes (node / sidecar) |", "|---|---|---|---|---|---|---|"]
    for count in sorted({r["pods"] for r in rows}):
        node = next((r for r in rows if r["mode"] == "node" and r["pods"] == count), None)
        side = next((r for r in rows if r["mode"] == "sidecar" and r["pods"] == count), None)
        lines.append(f"| {count} | {cell(node, 'rss_mib')} | {cell(side, 'rss_mib')} | "
                     f"{_ratio(median(node or {}, 'rss_mib'), median(side or {}, 'rss_mib'))} | "
                     f"{cell(node, 'startup_s', 2)} | {cell(side, 'startup_s', 2)} | "
                     f"{cell(node, 'processes', 0)} / {cell(side, 'processes', 0)} |")
    enrol = [r for r in rows if isinstance(r.get("enrol_ms"), dict)]
    if enrol:
        lines.append("\nTime to enrol a pod (label change to served), node mode: "
                     + ", ".join(f"{cell(r, 'enrol_ms')} ms ({r['pods']} pods)" for r in enrol) + ".")
    return "\n".join(lines)


def noisy_table(runs: list[dict], sizes: dict) -> str:
    if not runs:
        return "(not run)"
    rows = summarize(runs)
    by = {(r["mode"], r["path"], r["workload"].split()[1]): r for r in rows}
    lines = ["| victim | path | quiet p50 ms | attacked p50 ms | quiet p99 ms | attacked p99 ms | p99 attacked / quiet | "
             "success % quiet / attacked | node0 agent peak RSS MiB quiet / attacked |",
             "|---|---|---|---|---|---|---|---|---|"]
    for path, proto in dict.fromkeys(key[1:] for key in by):
        quiet, hit = by.get(("quiet", path, proto)), by.get(("attacked", path, proto))
        lines.append(f"| {proto} | {path} | {cell(quiet, 'p50_ms', 2)} | {cell(hit, 'p50_ms', 2)} | "
                     f"{cell(quiet, 'p99_ms', 2)} | {cell(hit, 'p99_ms', 2)} | "
                     f"{_ratio(median(hit or {}, 'p99_ms'), median(quiet or {}, 'p99_ms'))} | "
                     f"{cell(quiet, 'success_pct', 2)} / {cell(hit, 'success_pct', 2)} | "
                     f"{cell(quiet, 'agent_rss_peak_mib')} / {cell(hit, 'agent_rss_peak_mib')} |")
    extra = [(key, r) for key, r in by.items() if key[0] not in ("quiet", "attacked")]
    if extra:
        lines += ["\nOther variants against the same quiet runs. `floor`: the same attack with every connect of the "
                  "attacker refused in the kernel for the whole run (the agent never sees it): what is left is the "
                  "attacker's own processes on the shared cores. `attacked, attacker at N cores`: the attack with "
                  "the attacker's process under a CPU limit (an extra, not the default run).\n",
                  "| variant | victim | path | p99 ms | p99 / quiet | success % |", "|---|---|---|---|---|---|"]
        for (mode, path, proto), row in extra:
            quiet = by.get(("quiet", path, proto))
            lines.append(f"| {mode} | {proto} | {path} | {cell(row, 'p99_ms', 2)} | "
                         f"{_ratio(median(row, 'p99_ms'), median(quiet or {}, 'p99_ms'))} | "
                         f"{cell(row, 'success_pct', 2)} |")
    modes = {key[0]: r for key, r in reversed(list(by.items()))}  # one row of each mode (the CPU is per run)
    if any("agent_cpu_cores" in r for r in modes.values()):
        lines += ["\nCPU over the victim's run, in cores (of 2): node0's agent (with its workers), the attacker's pod.\n",
                  "| variant | node0 agent | attacker pod |", "|---|---|---|"]
        lines += [f"| {mode} | {cell(r, 'agent_cpu_cores', 2)} | {cell(r, 'attacker_cpu_cores', 2)} |"
                  for mode, r in reversed(list(modes.items()))]
    hit = next((r for r in rows if r["mode"] == "attacked"), None)
    if hit:
        lines.append(
            f"\nThe attack, per run (median (min-max)): short opaque connections {cell(hit, 'attack_short_ok', 0)} "
            f"answered of {cell(hit, 'attack_short_attempted', 0)} attempted ({sizes.get('attack_rate')}/s); "
            f"idle connections held at the end {cell(hit, 'attack_idle_held_at_end', 0)} of "
            f"{cell(hit, 'attack_idle_opened', 0)} opened; slowloris {cell(hit, 'attack_slowloris_held_at_end', 0)} of "
            f"{cell(hit, 'attack_slowloris_opened', 0)}. The DaemonSet's memory limit is 512 MiB.")
    return "\n".join(lines)


FLAT_MIB = 5.0  # issue 13's target: the agents' RSS after the warm-up flat within this


def soak_table(runs: list[dict]) -> str:
    if not runs:
        return "(not run)"
    streams = ("http1_keepalive", "http1_close", "opaque_short", "http2")
    lines = ["| phase | requests and connections served | errors (" + ", ".join(streams) + ") | mesh CPU s | "
             "peak RSS MiB | RSS after MiB | RSS after, each process's own reading MiB | "
             "RSS after, then trimmed MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        errors = ", ".join(str(r.get(f"{s}_errors", "-")) for s in streams) if "requests" in r else "-"
        lines.append(f"| {r['workload']} | {_fmt(r.get('requests'), 0)} | {errors} | {_fmt(r.get('cpu_s'))} | "
                     f"{_fmt(r.get('rss_peak_mib'))} | {_fmt(r.get('rss_mib'))} | {_fmt(_own_rss(r))} | "
                     f"{_fmt(_trimmed_rss(r))} |")
    phases = [r for r in runs if r["workload"].startswith("phase")]
    if len(phases) >= 2:
        lines.append("\n" + soak_verdict(phases))
    if any("memory" in r for r in runs):
        lines.append("\n" + soak_memory_table(runs))
    if runs[-1].get("refusals"):
        counted = ", ".join(f"{name} {value:,.0f}" for name, value in sorted(runs[-1]["refusals"].items()))
        lines.append(f"\nThe agents' refusal, failure and handshake counters at the end (/metrics, both agents, "
                     f"since they started; each row's in results.json): {counted}.")
    return "\n".join(lines)


def _own_rss(row: dict) -> float | None:
    """The agents' RSS as each process read it at the start of its /debug/memory report, summed."""
    held = row.get("memory", {})
    if _after_trim(row):  # the row's RSS is the one after the trim
        return None
    kib = held.get("process_rss_kib")
    return None if kib is None else round(kib / 1024, 1)


def _after_trim(row: dict) -> bool:
    """The row whose RSS is read after a malloc_trim (before soak.py trimmed in every report, the
    only row with a trim)."""
    return row.get("rss_after_trim", "trim_rss_before_kib" in row.get("memory", {}))


def _trimmed_rss(row: dict) -> float | None:
    """The agents' RSS right after each process's malloc_trim in its report, summed: the floor the
    periodic trim brings them back to, whatever the moment of the reading within its period."""
    kib = row.get("memory", {}).get("trim_rss_after_kib")
    return None if kib is None else round(kib / 1024, 1)


def soak_verdict(phases: list[dict]) -> str:
    """The RSS after each phase from the end of the warm-up (the first phase) on: how far it moved
    and its range, against the target. The processes' own readings where there are any: each
    is taken before that process's report allocates anything."""
    served = sum(r["requests"] for r in phases)
    own = all(_own_rss(r) is not None for r in phases)
    after = [_own_rss(r) if own else r["rss_mib"] for r in phases]
    spread, growth = max(after) - min(after), after[-1] - after[0]
    errors = sum(r.get(f"{s}_errors", 0) for r in phases for s in ("http1_keepalive", "http1_close",
                                                                     "opaque_short", "http2")
                 if isinstance(r.get(f"{s}_errors", 0), int))
    verdict = "met" if spread <= FLAT_MIB else "missed"
    return (f"{served:,} requests and connections in {len(phases)} phases ({errors:,} errors). From the end of "
            f"the warm-up phase to the end of the last, the agents' RSS (both agents, with their workers"
            f"{', as each process read it' if own else ''}) moved "
            f"by {growth:+.1f} MiB; its range over those {len(phases)} readings was {spread:.1f} MiB "
            f"({min(after):.1f} to {max(after):.1f}): the target (flat within {FLAT_MIB:g} MiB) is {verdict}."
            + _floor_verdict(phases))


def _floor_verdict(phases: list[dict]) -> str:
    floor = [_trimmed_rss(r) for r in phases]
    if None in floor:
        return ""
    spread, growth = max(floor) - min(floor), floor[-1] - floor[0]
    return (f" Right after each process's trim, the same RSS moved by {growth:+.1f} MiB, range {spread:.1f} MiB "
            f"({min(floor):.1f} to {max(floor):.1f}): within {FLAT_MIB:g} MiB "
            f"{'yes' if spread <= FLAT_MIB else 'no'}.")


# What /debug/memory says the agents hold (summed over both agents' processes): (column, key, divisor).
HELD = (("anonymous MiB", "process_anon_kib", 1024), ("file-backed MiB", "process_file_kib", 1024),
        ("glibc heap MiB", "heap_heap_kib", 1024), ("in use MiB", "heap_in_use_kib", 1024),
        ("kept free MiB", "heap_free_kib", 1024), ("mmapped MiB", "heap_mmapped_kib", 1024),
        ("Python blocks k", "python_blocks", 1000), ("gc objects k", "gc_tracked", 1000),
        ("HTTP/1 idle pooled", "outbound_http1_idle", 1), ("inbound app HTTP/1 idle", "inbound_app_http1_idle", 1),
        ("HTTP/2 upstreams", "outbound_http2_connections", 1), ("TLS sessions", "tls_sessions", 1),
        ("metric samples", "metric_samples", 1), ("connections open", "connections_open", 1),
        ("arenas", "heap_arenas", 1), ("periodic trims", "trims", 1))


def soak_memory_table(runs: list[dict]) -> str:
    """Where the RSS is: the allocator, Python's objects, the proxy's tables, per soak row; then
    the Python types whose counts grew most after the warm-up."""
    lines = ["| row | RSS MiB | " + " | ".join(name for name, _, _ in HELD) + " |",
             "|---|---|" + "---|" * len(HELD)]
    for r in runs:
        held = r.get("memory", {})
        lines.append(f"| {r['workload']} | {_fmt(r.get('rss_mib'))} | "
                     + " | ".join(_fmt(held[key] / div if key in held else None, 1 if div > 1 else 0)
                                  for _, key, div in HELD) + " |")
    trimmed = [r["memory"] for r in runs if _after_trim(r) and "trim_rss_before_kib" in r.get("memory", {})]
    if trimmed:
        before, after = trimmed[0]["trim_rss_before_kib"] / 1024, trimmed[0]["trim_rss_after_kib"] / 1024
        lines.append(f"\nmalloc_trim(0) in every process took the agents' RSS from {before:.1f} to {after:.1f} MiB "
                     f"({after - before:+.1f} MiB).")
    last = runs[-1].get("memory", {})
    if last.get("trims"):
        lines.append(f"\nThe periodic trim (agent/heap.py): {last['trims']:,} trims in all the agents' processes, "
                     f"{last['trims_total_ms']:.0f} ms in all, the longest {last['trims_max_ms']:.1f} ms; "
                     f"{last['trims_released_kib'] / 1024:.1f} MiB given back in all.")
    phases = [r for r in runs if r["workload"].startswith("phase") and "memory" in r]
    if len(phases) >= 2:
        first, last = phases[0]["memory"]["types"], phases[-1]["memory"]["types"]
        grew = sorted(((last.get(t, 0) - first.get(t, 0), t) for t in set(first) | set(last)), reverse=True)[:6]
        lines.append("\nPython objects by type, after phase 1 -> after the last phase (the most grown among each "
                     "process's most numerous): " + ", ".join(f"{t} {first.get(t, 0):,} -> {last.get(t, 0):,}"
                                                               for _, t in grew) + ".")
    return "\n".join(lines)


def conncost_table(runs: list[dict]) -> str:
    if not runs:
        return "(not run)"
    measured = summarize([r for r in runs if r["workload"] == "memory per connection"], keys=("mode",))
    bounds = {r["mode"]: r for r in runs if r["workload"] == "held at the default limit"}
    lines = ["| held connection | KiB per connection | per-pod limit | default | worst case per pod MiB | "
             "opened at the default limit: open at the client / in the proxy |", "|---|---|---|---|---|---|"]
    for r in measured:
        kib, bound = median(r, "kib_per_connection"), bounds.get(r["mode"], {})
        limit = bound.get("default_limit") or median(r, "default_limit")
        worst = kib * limit / 1024 if kib is not None and limit else None
        lines.append(f"| {r['mode']} | {cell(r, 'kib_per_connection', 1)} | {r['limit']} | {_fmt(limit, 0)} | "
                     f"{_fmt(worst, 1)} | {bound.get('opened', '-')}: {bound.get('held', '-')} / {bound.get('in_proxy', '-')} |")
    return "\n".join(lines)


def generic_table(runs: list[dict]) -> str:
    """A section without a table of its own: each row's numbers as median (min-max)."""
    rows = summarize(runs)
    fields = list(dict.fromkeys(f for r in rows for f, v in r.items() if isinstance(v, dict)))
    lines = ["| mode | path | workload | " + " | ".join(fields) + " |", "|---|---|---|" + "---|" * len(fields)]
    for r in rows:
        lines.append(f"| {r.get('mode')} | {r.get('path')} | {r.get('workload')} | "
                     + " | ".join(cell(r, f, 2) for f in fields) + " |")
    return "\n".join(lines)


def _or_not_run(rows: list[dict], table) -> str:
    return table(rows) if rows else "(not run)"


KNOWN = ("machine", "smoke", "sizes", "modes", "section_s", "duration_s", "traffic", "cost", "noisy", "soak", "conncost")


def markdown(results: dict) -> str:
    m, sizes = results["machine"], results["sizes"]
    traffic = summarize(results.get("traffic", []))
    times = ", ".join(f"{name} {seconds:g} s" for name, seconds in results.get("section_s", {}).items())
    parts = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}. Run took {results.get('duration_s', '?')} s ({times})"
        + (" (smoke sizes: not a measurement)." if results["smoke"] else ".")
        + f" Each row: the median of {sizes['rounds']} interleaved runs, (min-max) when they differ. "
        f"Sizes: {', '.join(f'{k}={v}' for k, v in sizes.items())}.",
        "### Against the targets\n\n" + targets.table(results),
        "### Traffic\n\n" + _or_not_run(traffic, traffic_table),
        "### Open-loop latency\n\n" + _or_not_run(traffic, latency_table),
        "### CPU of the mesh's processes (per request; bulk: per MiB)\n\n" + _or_not_run(traffic, cpu_table),
        "### Memory of the mesh under load (peak RSS while the workload ran)\n\n"
        + _or_not_run(traffic, load_memory_table),
        "### Kernel fast paths (node mode)\n\n" + variants_table(traffic, FAST_COLUMNS, spliced=True),
        "### Worker processes (node mode; `node` is the default, one per core)\n\n"
        + variants_table(traffic, WORKER_COLUMNS, spliced=False),
        "### Cost as pods per node grow (idle)\n\n" + cost_table(results.get("cost", [])),
        "### Noisy neighbour\n\n" + noisy_table(results.get("noisy", []), sizes),
        "### Soak\n\n" + soak_table(results.get("soak", [])),
        "### Memory per held connection\n\n" + conncost_table(results.get("conncost", [])),
    ]
    parts += [f"### {name}\n\n" + generic_table(runs) for name, runs in results.items()
              if name not in KNOWN and isinstance(runs, list) and runs]
    return "\n\n".join(parts) + "\n"


def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    traffic = [r for r in summarize(results.get("traffic", [])) if r["mode"] in MODE_ORDER]
    latency = [r for r in traffic if "open-loop" in r["workload"] and r["path"] == "same-node"]
    if latency:
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.2
        for i, q in enumerate(("p50_ms", "p90_ms", "p99_ms")):
            ax.bar([x + i * width for x in range(len(latency))], [median(r, q) or 0 for r in latency], width,
                   label=q[:-3])
        ax.set_xticks([x + width for x in range(len(latency))], [r["mode"] for r in latency])
        ax.set_ylabel("ms (median of runs)")
        ax.set_title(f"Open-loop latency, same node ({latency[0]['workload']})")
        ax.legend()
        written.append(_save(fig, out / "latency.png"))
    cost = summarize(results.get("cost", []), keys=("mode", "pods"))
    if cost:
        fig, ax = plt.subplots(figsize=(7, 4))
        for mode in ("node", "sidecar"):
            rows = sorted((r for r in cost if r["mode"] == mode), key=lambda r: r["pods"])
            ax.plot([r["pods"] for r in rows], [median(r, "rss_mib") for r in rows], marker="o", label=f"{mode} mode")
        ax.set_xlabel("pods per node")
        ax.set_ylabel("resident memory of the mesh, MiB")
        ax.set_title("Memory vs pods")
        ax.legend()
        written.append(_save(fig, out / "memory.png"))
    throughput = [r for r in traffic if "16 conns" in r["workload"] and r["path"] == "same-node"]
    if throughput:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar([r["mode"] for r in throughput], [median(r, "rps") for r in throughput],
               yerr=[[median(r, "rps") - r["rps"]["min"] for r in throughput],
                     [r["rps"]["max"] - median(r, "rps") for r in throughput]], capsize=4)
        ax.set_ylabel("requests/s (median, min-max)")
        ax.set_title("HTTP/1.1 keep-alive throughput, same node")
        written.append(_save(fig, out / "throughput.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
