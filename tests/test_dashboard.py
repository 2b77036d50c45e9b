"""The Grafana dashboard only queries metrics the agent exports."""

import json
import re
from pathlib import Path

from nodeagent.agent.node_metrics import KERNEL_COUNTERS
from nodeagent.proxy.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "nodeagent-dashboard.json"


def exported_names() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        names |= {family.name, f"{family.name}_total", f"{family.name}_bucket", f"{family.name}_count",
                  f"{family.name}_sum"}
    names |= {f"{name}_total" for _, name, _ in KERNEL_COUNTERS}
    return names | {"enrolled_pods", "bpf_programs_attached"}


def test_every_query_uses_exported_metrics_and_panels_do_not_overlap():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    bare = [re.sub(r"by \([^)]*\)", "", e) for e in exprs]  # grouping labels are not metrics
    used = {m for e in bare for m in re.findall(r"\b([a-z_]+)\{", e) + re.findall(r"\(([a-z_]+)\)", e)}
    unknown = used - {"time"} - exported_names()
    assert unknown == set()
    cells = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & area, panel["title"]
        cells |= area
