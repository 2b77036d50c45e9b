"""The manifests `nodeagent install` prints; deploy/helm/nodeagent renders the
same objects from the same values (a test compares them).

Least privilege: the agent reads Pods, Services, EndpointSlices and
Namespaces (get, list, watch) and nothing else; its container drops every
capability but those it uses: BPF (load programs, maps), NET_ADMIN (cgroup
and netns attachments), SYS_ADMIN (setns into pods, bpffs pins), SYS_PTRACE
(open other processes' /proc/<pid>/ns/net), SYS_RESOURCE (locked memory for
maps on older kernels), PERFMON (helpers bcc's compiled programs may use).
"""

import base64
from dataclasses import dataclass, field

from nodeagent import settings as settings_model
from nodeagent.settings import AgentSettings

NAME = "nodeagent"
APP_LABELS = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/part-of": NAME}


@dataclass(frozen=True)
class Values:
    """What the manifests are made of: where they go, and the agents' cluster-wide settings
    (validated by the settings model; they become the ConfigMap and the DaemonSet's arguments)."""

    namespace: str = "nodeagent"
    image: str = "ghcr.io/nodeagent/nodeagent:0.1.0"
    settings: AgentSettings = field(default_factory=AgentSettings)
    admin_port: int = 4191  # loopback only (/tap, /stats: kubectl port-forward)
    metrics_port: int = 4190  # the pod's addresses: /metrics, /live, /ready for Prometheus and kubelet
    anchors_pem: str = ""
    issuer_crt_pem: str = ""
    issuer_key_pem: str = ""


def _cluster_options() -> list:
    """The ConfigMap's settings in key order: the order Helm's `range` walks them."""
    return sorted(settings_model.cluster_options(), key=lambda option: option.flag)


def _meta(name: str, values: Values, namespaced: bool = True) -> dict:
    meta = {"name": name, "labels": dict(APP_LABELS)}
    if namespaced:
        meta["namespace"] = values.namespace
    return meta


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def render(values: Values) -> list[dict]:
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(values.namespace, values, namespaced=False)},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(NAME, values)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": _meta(NAME, values, namespaced=False),
         "rules": [
             {"apiGroups": [""], "resources": ["pods", "services", "namespaces"], "verbs": ["get", "list", "watch"]},
             {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": _meta(NAME, values, namespaced=False),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAME},
         "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": values.namespace}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(f"{NAME}-config", values),
         "data": dict(sorted(settings_model.config_map(values.settings).items()))},
        {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": _meta(f"{NAME}-identity-issuer", values),
         "data": {"ca.crt": _b64(values.anchors_pem), "issuer.crt": _b64(values.issuer_crt_pem),
                  "issuer.key": _b64(values.issuer_key_pem)}},
        daemonset(values),
    ]


def _config_env(name: str, key: str) -> dict:
    return {"name": name, "valueFrom": {"configMapKeyRef": {"name": f"{NAME}-config", "key": key}}}


def daemonset(values: Values) -> dict:
    host = lambda name, path, kind="Directory": {"name": name, "hostPath": {"path": path, "type": kind}}  # noqa: E731
    probe = lambda path: {"httpGet": {"path": path, "port": "metrics"}, "periodSeconds": 10}  # noqa: E731
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": _meta(NAME, values),
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": NAME}},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {
                    "labels": dict(APP_LABELS),
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(values.metrics_port),
                                    "prometheus.io/path": "/metrics"},
                },
                "spec": {
                    "serviceAccountName": NAME,
                    "hostPID": True,
                    "priorityClassName": "system-node-critical",
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [{
                        "name": "agent",
                        "image": values.image,
                        "args": ["run", "--kube", "--node-name=$(NODE_NAME)",
                                 "--identity-dir=/var/run/nodeagent/identity",
                                 f"--admin=127.0.0.1:{values.admin_port}", f"--metrics=0.0.0.0:{values.metrics_port}",
                                 "--pin-root=/sys/fs/bpf/nodeagent",
                                 *(f"--{o.flag}=$({settings_model.env_name(o)})" for o in _cluster_options())],
                        "env": [
                            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                            *(_config_env(settings_model.env_name(o), o.flag) for o in _cluster_options()),
                        ],
                        "ports": [{"name": "metrics", "containerPort": values.metrics_port, "protocol": "TCP"}],
                        "readinessProbe": probe("/ready"),
                        "livenessProbe": {**probe("/live"), "initialDelaySeconds": 30},
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                                      "limits": {"memory": "512Mi"}},
                        "securityContext": {
                            "privileged": False, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"], "add": ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE",
                                                                     "SYS_RESOURCE", "PERFMON"]},
                        },
                        "volumeMounts": [
                            {"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "HostToContainer"},
                            {"name": "cgroup", "mountPath": "/sys/fs/cgroup", "readOnly": True},
                            {"name": "modules", "mountPath": "/lib/modules", "readOnly": True},
                            {"name": "headers", "mountPath": "/usr/src", "readOnly": True},
                            {"name": "identity", "mountPath": "/var/run/nodeagent/identity", "readOnly": True},
                            {"name": "run", "mountPath": "/run"},
                            {"name": "tmp", "mountPath": "/tmp"},
                        ],
                    }],
                    "volumes": [
                        host("bpffs", "/sys/fs/bpf"), host("cgroup", "/sys/fs/cgroup"),
                        host("modules", "/lib/modules"), host("headers", "/usr/src"),
                        {"name": "identity", "secret": {"secretName": f"{NAME}-identity-issuer"}},
                        {"name": "run", "emptyDir": {"medium": "Memory"}},
                        {"name": "tmp", "emptyDir": {}},  # the root filesystem is read-only
                    ],
                },
            },
        },
    }
