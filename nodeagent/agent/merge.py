"""The metrics of an agent's processes as one: pure.

Each process reports its registry as families (name, type, help, samples);
the same series from several processes are added up, except `_created`
timestamps (the earliest stands) and gauges that only the agent's main process
sets, which arrive once anyway.
"""

Family = tuple[str, str, str, list[tuple[str, dict, float]]]


def families_of(registry) -> list[Family]:
    """A registry's families as plain values (picklable, comparable)."""
    return [(f.name, f.type, f.documentation, [(s.name, dict(s.labels), s.value) for s in f.samples])
            for f in registry.collect()]


def merge(reports: list[list[Family]]) -> list[Family]:
    merged: dict[str, tuple[str, str, dict]] = {}
    for report in reports:
        for name, kind, documentation, samples in report:
            _, _, series = merged.setdefault(name, (kind, documentation, {}))
            for sample_name, labels, value in samples:
                key = (sample_name, tuple(sorted(labels.items())))
                if key not in series:
                    series[key] = value
                elif sample_name.endswith("_created"):
                    series[key] = min(series[key], value)
                else:
                    series[key] += value
    return [(name, kind, documentation, [(sample, dict(labels), value) for (sample, labels), value in series.items()])
            for name, (kind, documentation, series) in merged.items()]


class Merged:
    """A prometheus_client collector that yields already-merged families."""

    def __init__(self, families: list[Family]):
        self.families = families

    def collect(self):
        from prometheus_client.metrics_core import Metric

        for name, kind, documentation, samples in self.families:
            metric = Metric(name, documentation, kind)
            for sample_name, labels, value in samples:
                metric.add_sample(sample_name, labels, value)
            yield metric
