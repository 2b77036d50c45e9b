"""The lab's "cluster": Kubernetes manifests of its objects in a directory.

Layout: `<cluster>/<kind-plural>/<namespace>/<name>.yaml` (`nodes/` and
`namespaces/` have no namespace level). The agent reads this directory the way
it reads the Kubernetes API, so objects are written exactly as the API would
return them (apiVersion, kind, metadata, spec, status).
"""

import re
from pathlib import Path

import yaml

from nodeagent.lab.plan import LabPlan, NodePlan, PodPlan, ServicePlan, WORKLOAD_BY_KIND

_LABEL_NAME = r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)"
_DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_LABEL_KEY = re.compile(rf"^(({_DNS_SUBDOMAIN})/)?{_LABEL_NAME}$")
_LABEL_VALUE = re.compile(rf"^({_LABEL_NAME})?$")


class ManifestError(ValueError):
    pass


def parse_label_change(text: str) -> tuple[str, str | None]:
    """`KEY=VALUE` sets a label, `KEY-` removes it (as `kubectl label` does)."""
    if text.endswith("-") and "=" not in text:
        key, value = text[:-1], None
    elif "=" in text:
        key, value = text.split("=", 1)
    else:
        raise ManifestError(f"expected KEY=VALUE or KEY-, got {text!r}")
    prefix = key.split("/", 1)[0] if "/" in key else ""
    if not _LABEL_KEY.match(key) or len(prefix) > 253:
        raise ManifestError(f"invalid label key {key!r}")
    if value is not None and not _LABEL_VALUE.match(value):
        raise ManifestError(f"invalid label value {value!r}: up to 63 of [A-Za-z0-9-_.], alphanumeric at both ends")
    return key, value


def node_manifest(node: NodePlan) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name}},
        "spec": {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr]},
    }


def namespace_manifest(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {}}}


def pod_manifest(pod: PodPlan) -> dict:
    workload = WORKLOAD_BY_KIND[pod.workload]
    container = {"name": pod.workload, "image": f"nodeagent-lab/{pod.workload}"}
    if workload.port:
        container["ports"] = [{"name": workload.kind, "containerPort": workload.port, "protocol": "TCP"}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.name,
            "namespace": pod.namespace,
            "uid": pod.uid,
            "labels": dict(pod.labels),
        },
        "spec": {
            "nodeName": pod.node,
            "serviceAccountName": pod.service_account,
            "containers": [container],
        },
        "status": {
            "phase": "Running",
            "podIP": pod.ip,
            "podIPs": [{"ip": pod.ip}],
            "containerStatuses": [
                {"name": pod.workload, "containerID": f"containerd://{pod.container_id}", "ready": True}
            ],
        },
    }


def service_manifest(service: ServicePlan) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service.name, "namespace": service.namespace, "labels": {}},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": service.cluster_ip,
            "clusterIPs": [service.cluster_ip],
            "selector": dict(service.selector),
            "ports": [
                {"name": service.name, "port": service.port, "targetPort": service.target_port, "protocol": "TCP"}
            ],
        },
    }


def manifest_path(cluster: Path, manifest: dict) -> Path:
    kind = manifest["kind"].lower() + "s"
    meta = manifest["metadata"]
    if "namespace" in meta:
        return cluster / kind / meta["namespace"] / f"{meta['name']}.yaml"
    return cluster / kind / f"{meta['name']}.yaml"


def write_manifest(cluster: Path, manifest: dict) -> Path:
    """Write atomically, so a watcher never reads half a file."""
    path = manifest_path(cluster, manifest)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(manifest, sort_keys=False))
    tmp.replace(path)
    return path


def read_manifests(cluster: Path, kind_plural: str) -> list[dict]:
    root = cluster / kind_plural
    if not root.exists():
        return []
    return [yaml.safe_load(path.read_text()) for path in sorted(root.rglob("*.yaml"))]


def write_cluster(cluster: Path, plan: LabPlan) -> None:
    for manifest in [
        *(node_manifest(n) for n in plan.nodes),
        *(namespace_manifest(ns) for ns in sorted({p.namespace for p in plan.pods})),
        *(pod_manifest(p) for p in plan.pods),
        *(service_manifest(s) for s in plan.services),
    ]:
        write_manifest(cluster, manifest)


def relabel_pod(cluster: Path, namespace: str, name: str, key: str, value: str | None) -> dict:
    """Set (or with value None, remove) one label of a pod's manifest."""
    path = cluster / "pods" / namespace / f"{name}.yaml"
    if not path.exists():
        raise ManifestError(f"no pod {namespace}/{name} in {cluster}")
    manifest = yaml.safe_load(path.read_text())
    labels = manifest["metadata"].setdefault("labels", {})
    if value is None:
        labels.pop(key, None)
    else:
        labels[key] = value
    write_manifest(cluster, manifest)
    return manifest
