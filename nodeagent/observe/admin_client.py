"""Talking to agents' admin ports: which ones, their metrics, their tap streams."""

import http.client
import json
import urllib.parse
import urllib.request
from collections.abc import Iterator

from prometheus_client.parser import text_string_to_metric_families


def default_admins() -> list[str]:
    """The lab's agents if a lab with a mesh is up, else this node's agent."""
    from nodeagent.lab import lab as lab_ops

    try:
        lab = lab_ops.load()
    except lab_ops.LabError:
        return ["127.0.0.1:4191"]
    if lab.mesh == "none":
        return ["127.0.0.1:4191"]
    return [f"127.0.0.1:{n.admin_port}" for n in lab.plan.nodes]


def scrape(admin: str, timeout_s: float = 5.0) -> list[tuple[str, dict, float]]:
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=timeout_s) as response:
        text = response.read().decode()
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def tap_stream(admin: str, filters: dict, max_events: int, seconds: float) -> Iterator[dict]:
    """Events from one agent's /tap, as they happen."""
    host, _, port = admin.rpartition(":")
    query = urllib.parse.urlencode({**{k: v for k, v in filters.items() if v}, "max": max_events,
                                    "seconds": seconds})
    conn = http.client.HTTPConnection(host, int(port), timeout=seconds + 10)
    try:
        conn.request("GET", f"/tap?{query}")
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{admin}: {response.status} {response.read().decode().strip()}")
        while line := response.readline():
            if line.strip():
                yield json.loads(line)
    finally:
        conn.close()


def fetch_json(admin: str, path: str, timeout_s: float = 5.0) -> dict:
    """A JSON document from an agent's admin port (/edges, /stats)."""
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=timeout_s) as response:
        return json.loads(response.read())
