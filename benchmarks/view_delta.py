"""The cluster view at scale: building it whole vs making the next one from a one-pod delta,
and what goes to each worker process (a pickled whole view vs the pickled delta).

    .venv/bin/python -m benchmarks.view_delta [--pods 10000] [--runs 5]

Pure CPU, no lab; prints the median of the runs with their spread (min-max)."""

import argparse
import pickle
import statistics
import time

from nodeagent.cluster.model import ClusterView, Delta


def objects(pods: int):
    per_service = 10
    pod_objects = [{"kind": "Pod", "metadata": {"name": f"p{i}", "namespace": f"ns{i % 50}", "uid": f"u{i}",
                                                "labels": {"app": f"a{i // per_service}"}},
                    "spec": {"nodeName": f"node{i % 100}", "containers": [{"name": "c", "ports": [
                        {"name": "http", "containerPort": 8080}]}]},
                    "status": {"phase": "Running", "podIP": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"}}
                   for i in range(pods)]
    services = [{"kind": "Service", "metadata": {"name": f"a{s}", "namespace": f"ns{s * per_service % 50}"},
                 "spec": {"clusterIP": f"10.96.{s >> 8 & 255}.{s & 255}", "selector": {"app": f"a{s}"},
                          "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}
                for s in range(pods // per_service)]
    slices = [{"kind": "EndpointSlice", "metadata": {"name": f"a{s}-x", "namespace": f"ns{s * per_service % 50}",
                                                     "labels": {"kubernetes.io/service-name": f"a{s}"}},
               "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
               "endpoints": [{"addresses": [p["status"]["podIP"]], "conditions": {"ready": True}}
                             for p in pod_objects[s * per_service:(s + 1) * per_service]]}
              for s in range(pods // per_service)]
    namespaces = [{"kind": "Namespace", "metadata": {"name": f"ns{n}", "labels": {}}} for n in range(50)]
    return pod_objects, services, namespaces, slices


def timed(fn, runs: int) -> tuple[float, float, float, object]:
    samples, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), min(samples), max(samples), result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    pods, services, namespaces, slices = objects(args.pods)
    median, low, high, view = timed(lambda: ClusterView(pods, services, namespaces, slices), args.runs)
    print(f"{args.pods} pods, {len(services)} Services: whole view built in {median * 1000:.0f} ms "
          f"({low * 1000:.0f}-{high * 1000:.0f})")
    changed = dict(pods[7], metadata={**pods[7]["metadata"], "labels": {"app": "a0", "new": "label"}})
    delta = Delta()
    delta.parse("pods", "ns7/p7", changed)
    median, low, high, _ = timed(lambda: view.apply(delta), args.runs)
    print(f"next view from a one-pod delta: {median * 1000:.1f} ms ({low * 1000:.1f}-{high * 1000:.1f})")
    median, low, high, whole = timed(lambda: pickle.dumps(("view", view)), args.runs)
    print(f"to each worker, whole: {len(whole) / 1e6:.1f} MB pickled in {median * 1000:.0f} ms "
          f"({low * 1000:.0f}-{high * 1000:.0f})")
    median, low, high, small = timed(lambda: pickle.dumps(("delta", delta, 2)), args.runs)
    print(f"to each worker, delta: {len(small)} bytes pickled in {median * 1e6:.0f} us "
          f"({low * 1e6:.0f}-{high * 1e6:.0f})")


if __name__ == "__main__":
    main()
