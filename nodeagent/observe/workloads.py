"""Which workload a pod belongs to, from what the pod itself carries: pure.

Linkerd names workloads by their owner (a Deployment, a StatefulSet ...). The cluster view
keeps pods' labels but not their owner references, and the controllers leave enough in the
labels and the name to say it:

- Deployment: its ReplicaSet's pods carry `pod-template-hash=<h>` and are named
  `<deployment>-<h>-<suffix>`: `deploy/<deployment>`;
- StatefulSet: `statefulset.kubernetes.io/pod-name`, named `<set>-<ordinal>`: `sts/<set>`;
- DaemonSet: `controller-revision-hash` and `pod-template-generation`, named `<set>-<suffix>`: `ds/<set>`;
- Job (and a CronJob's jobs): `batch.kubernetes.io/job-name` (or `job-name`): `job/<job>`;
- otherwise an `app.kubernetes.io/name` or `app` label: `app/<value>` (the lab's pods);
- otherwise the pod alone: `pod/<name>`.

A workload is named within its namespace. Their number is bounded by the cluster's pods.
"""

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Workload:
    namespace: str
    name: str  # "deploy/web", "sts/db", "app/http", "pod/debug"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def workload_of(namespace: str, name: str, labels: dict) -> Workload:
    return Workload(namespace, _name(name, labels))


def _name(pod: str, labels: dict) -> str:
    template_hash = labels.get("pod-template-hash")
    if template_hash and f"-{template_hash}-" in pod:
        return "deploy/" + pod[:pod.rfind(f"-{template_hash}-")]
    if template_hash and pod.endswith(f"-{template_hash}"):  # a bare ReplicaSet's naming, rarely seen
        return "rs/" + pod[:-len(template_hash) - 1]
    if "statefulset.kubernetes.io/pod-name" in labels and "-" in pod:
        return "sts/" + pod.rsplit("-", 1)[0]
    if "controller-revision-hash" in labels and "pod-template-generation" in labels and "-" in pod:
        return "ds/" + pod.rsplit("-", 1)[0]
    job = labels.get("batch.kubernetes.io/job-name") or labels.get("job-name")
    if job:
        return f"job/{job}"
    app = labels.get("app.kubernetes.io/name") or labels.get("app")
    if app:
        return f"app/{app}"
    return f"pod/{pod}"


def of_pod(pod) -> Workload:
    """A cluster.model.PodInfo's workload."""
    return workload_of(pod.namespace, pod.name, pod.labels)
