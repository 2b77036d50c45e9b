"""Talking to agents' admin ports: which ones, their metrics, their tap streams."""

import http.client
import json
import socket
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


class TapStream:
    """One agent's /tap, as it happens; `close()` (from any thread) ends it at once."""

    def __init__(self, admin: str, filters: dict, max_events: int, seconds: float):
        host, _, port = admin.rpartition(":")
        query = urllib.parse.urlencode({**{k: v for k, v in filters.items() if v}, "max": max_events,
                                        "seconds": seconds})
        self.admin, self.closed = admin, False
        self.conn = http.client.HTTPConnection(host, int(port), timeout=seconds + 10)
        try:
            self.conn.request("GET", f"/tap?{query}")
            self.response = self.conn.getresponse()
            if self.response.status != 200:
                raise RuntimeError(f"{admin}: {self.response.status} {self.response.read().decode().strip()}")
        except BaseException:
            self.conn.close()
            raise

    def __iter__(self) -> Iterator[dict]:
        try:
            while line := self.response.readline():
                if line.strip():
                    yield json.loads(line)
        except (OSError, ValueError):
            if not self.closed:  # a real failure, not our close()
                raise
        finally:
            self.conn.close()

    def close(self) -> None:
        self.closed = True
        sock = self.conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked in readline
            except OSError:
                pass


def tap_stream(admin: str, filters: dict, max_events: int, seconds: float) -> Iterator[dict]:
    """Events from one agent's /tap, as they happen."""
    yield from TapStream(admin, filters, max_events, seconds)


def fetch_json(admin: str, path: str, timeout_s: float = 5.0) -> dict:
    """A JSON document from an agent's admin port (/edges, /stats)."""
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=timeout_s) as response:
        return json.loads(response.read())
