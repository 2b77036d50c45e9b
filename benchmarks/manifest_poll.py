"""What the agent's 0.25 s poll of the lab's manifest directory (cluster/files.py) holds its event
loop for when nothing changed: 20 pods and 10 Services (about the traffic section's lab), 200
polls, median and max in ms. No root, no lab.

    python -m benchmarks.manifest_poll
    PYTHONPATH=<another checkout> python benchmarks/manifest_poll.py   # that checkout's source
"""

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from nodeagent.cluster.files import ManifestDirSource

PODS, SERVICES, POLLS = 20, 10, 200


def pod(i: int) -> dict:
    return {"metadata": {"name": f"pod{i}", "namespace": "bench", "uid": f"uid-{i}",
                         "labels": {"app": "web", "nodeagent.io/mesh": "enabled"}},
            "spec": {"nodeName": "node0", "serviceAccountName": "web", "containers": [{}]},
            "status": {"phase": "Running", "podIP": f"10.244.0.{10 + i}"}}


def service(i: int) -> dict:
    return {"metadata": {"name": f"svc{i}", "namespace": "bench"},
            "spec": {"selector": {"app": "web"}, "clusterIP": f"10.96.0.{10 + i}", "ports": [{"port": 80}]}}


def measure() -> dict:
    root = Path(tempfile.mkdtemp(prefix="manifest-poll-"))
    try:
        for kind, make, count in (("pods", pod, PODS), ("services", service, SERVICES)):
            (root / kind).mkdir()
            for i in range(count):
                (root / kind / f"{i}.yaml").write_text(yaml.safe_dump(make(i)))
        source = ManifestDirSource(root)
        if source.poll() is None:
            raise RuntimeError("the first poll read no view")
        times = []
        for _ in range(POLLS):
            started = time.perf_counter()
            if source.poll() is not None:
                raise RuntimeError("an unchanged directory read as changed")
            times.append((time.perf_counter() - started) * 1000)
        return {"median_ms": round(statistics.median(times), 3), "max_ms": round(max(times), 3)}
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    result = measure()
    print(f"unchanged poll of {PODS + SERVICES} manifests: median {result['median_ms']} ms, "
          f"max {result['max_ms']} ms ({POLLS} polls)")
