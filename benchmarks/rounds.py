"""Interleaved rounds and their summary. Pure: no I/O, no clocks.

Every row of `make bench` is the median of several runs of one variant (a mode, a fast-path
setting, a pod count, ...). The runs alternate between variants (A B C A B C ..., never
A A A B B B), so a slow minute of a shared machine falls on every variant alike instead of
on one; the report shows the median and the spread (min-max) of each row.
"""

import statistics
from collections.abc import Iterable, Sequence

# What identifies a row: its runs share these fields and differ in everything measured.
ROW_KEYS = ("mode", "path", "workload")


def schedule(variants: Sequence, rounds: int) -> list[tuple[int, object]]:
    """(round, variant) in the order to run them: each round runs every variant once."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, not {rounds}")
    return [(r, v) for r in range(rounds) for v in variants]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def spread(values: Iterable[float]) -> dict:
    values = sorted(values)
    return {"median": round(statistics.median(values), 3), "min": values[0], "max": values[-1], "n": len(values)}


def summarize(runs: Iterable[dict], keys: Sequence[str] = ROW_KEYS) -> list[dict]:
    """One row per distinct `keys`, in first-seen order: every numeric field becomes a
    spread {median, min, max, n} over the runs that have it; other fields keep their distinct
    values (joined, so an error in any run shows); `runs` counts the runs."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(tuple(run.get(k) for k in keys), []).append(run)
    rows = []
    for key, group in groups.items():
        row = dict(zip(keys, key))
        row["runs"] = len(group)
        fields = dict.fromkeys(f for run in group for f in run if f not in keys and f != "round")
        for field in fields:
            values = [run[field] for run in group if field in run]
            numbers = [v for v in values if _number(v)]
            if numbers and len(numbers) == len([v for v in values if v is not None]):
                row[field] = spread(numbers)
            else:
                distinct = list(dict.fromkeys(str(v) for v in values if v not in (None, "", 0)))
                row[field] = "; ".join(distinct) if distinct else None
        rows.append(row)
    return rows


def median(row: dict, field: str):
    """The median of a summarized field (None if the row has no such number)."""
    value = row.get(field)
    return value["median"] if isinstance(value, dict) else None
