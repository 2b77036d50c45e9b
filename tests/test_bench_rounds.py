"""The benchmark's rounds: interleaved order, and rows summarized as median with min-max (pure)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed: run from the tree
from benchmarks import report  # noqa: E402
from benchmarks.rounds import median, schedule, summarize  # noqa: E402


def test_each_round_runs_every_variant_once_before_the_next_round():
    assert schedule(["a", "b", "c"], 3) == [(0, "a"), (0, "b"), (0, "c"), (1, "a"), (1, "b"), (1, "c"),
                                            (2, "a"), (2, "b"), (2, "c")]


def test_no_rounds_is_an_error_not_an_empty_benchmark():
    with pytest.raises(ValueError, match="at least 1"):
        schedule(["a"], 0)


def test_a_row_is_the_median_of_its_runs_with_min_and_max():
    runs = [{"mode": "node", "path": "p", "workload": "w", "rps": v, "round": i, "errors": None}
            for i, v in enumerate([30.0, 10.0, 20.0])]
    runs.append({"mode": "none", "path": "p", "workload": "w", "rps": 99.0, "round": 0})
    node, none = summarize(runs)
    assert node["rps"] == {"median": 20.0, "min": 10.0, "max": 30.0, "n": 3} and node["runs"] == 3
    assert none["rps"]["n"] == 1 and median(none, "rps") == 99.0
    assert "round" not in node and node["errors"] is None


def test_an_error_in_any_run_shows_in_the_row():
    runs = [{"mode": "m", "path": "p", "workload": "w", "errors": e} for e in (None, "Socket errors: 3", None)]
    (row,) = summarize(runs)
    assert row["errors"] == "Socket errors: 3"


def test_the_report_cell_shows_the_spread_only_when_runs_differ():
    assert report.cell({"x": {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}}, "x") == "2.0 (1.0-3.0)"
    assert report.cell({"x": {"median": 2.0, "min": 2.0, "max": 2.0, "n": 3}}, "x") == "2.0"
    assert report.cell({}, "x") == "-"


def test_a_section_the_report_does_not_know_gets_a_generic_table():
    results = {"machine": {"cpu": "c", "cores": 2, "memory_gib": 1, "kernel": "k", "python": "3"}, "smoke": True,
               "sizes": {"rounds": 2}, "upgrade": [{"mode": "node", "path": "same-node", "workload": "upgrade",
                                                    "p99_ms": v, "round": i} for i, v in enumerate((1.0, 3.0))]}
    text = report.markdown(results)
    assert "### upgrade" in text and "| node | same-node | upgrade | 2.00 (1.00-3.00) |" in text
