"""What the proxy counts: plain counters keyed by name and labels.

The admin server renders them; issue #7 maps them onto Linkerd's metric names.
"""

from collections import Counter


class Stats:
    def __init__(self):
        self.counters: Counter = Counter()
        self.open_connections = 0

    def inc(self, name: str, amount: int = 1, **labels) -> None:
        self.counters[(name, tuple(sorted(labels.items())))] += amount

    def get(self, name: str, **labels) -> int:
        """Sum over every series of `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.counters.items() if n == name and wanted <= set(ls))

    def snapshot(self) -> list[dict]:
        return [{"name": n, "labels": dict(ls), "value": v} for (n, ls), v in sorted(self.counters.items())]
