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
from dataclasses import dataclass

NAME = "nodeagent"
APP_LABELS = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/part-of": NAME}


@dataclass(frozen=True)
class Values:
    namespace: str = "nodeagent"
    image: str = "ghcr.io/nodeagent/nodeagent:0.1.0"
    mesh_label: str = "nodeagent.io/mesh=enabled"
    trust_domain: str = "cluster.local"
    default_policy: str = "all-unauthenticated"
    log_level: str = "info"
    fast_path: str = ""  # off; "splice" or "splice,loopback" (README, Fast paths)
    on_node_plaintext: bool = False
    workers: int = 0  # proxy processes per node; 0: one per core the agent's container may use
    admin_port: int = 4191
    anchors_pem: str = ""
    issuer_crt_pem: str = ""
    issuer_key_pem: str = ""

    def __post_init__(self):
        key, sep, value = self.mesh_label.partition("=")
        if not key or not sep or not value:
            raise ValueError(f"--label must be KEY=VALUE, not {self.mesh_label!r}")


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
         "data": {"mesh-label": values.mesh_label, "trust-domain": values.trust_domain,
                  "default-policy": values.default_policy, "log-level": values.log_level,
                  "fast-path": values.fast_path, "on-node-plaintext": str(values.on_node_plaintext).lower(),
                  "workers": str(values.workers)}},
        {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": _meta(f"{NAME}-identity-issuer", values),
         "data": {"ca.crt": _b64(values.anchors_pem), "issuer.crt": _b64(values.issuer_crt_pem),
                  "issuer.key": _b64(values.issuer_key_pem)}},
        daemonset(values),
    ]


def _config_env(name: str, key: str) -> dict:
    return {"name": name, "valueFrom": {"configMapKeyRef": {"name": f"{NAME}-config", "key": key}}}


def daemonset(values: Values) -> dict:
    host = lambda name, path, kind="Directory": {"name": name, "hostPath": {"path": path, "type": kind}}  # noqa: E731
    probe = lambda path: {"httpGet": {"path": path, "port": "admin"}, "periodSeconds": 10}  # noqa: E731
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": _meta(NAME, values),
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": NAME}},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {
                    "labels": dict(APP_LABELS),
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(values.admin_port),
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
                                 f"--admin=0.0.0.0:{values.admin_port}", "--pin-root=/sys/fs/bpf/nodeagent",
                                 "--mesh-label=$(MESH_LABEL)", "--trust-domain=$(TRUST_DOMAIN)",
                                 "--default-policy=$(DEFAULT_POLICY)", "--log-level=$(LOG_LEVEL)",
                                 "--fast-path=$(FAST_PATH)", "--on-node-plaintext=$(ON_NODE_PLAINTEXT)",
                                 "--workers=$(WORKERS)"],
                        "env": [
                            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                            _config_env("MESH_LABEL", "mesh-label"), _config_env("TRUST_DOMAIN", "trust-domain"),
                            _config_env("DEFAULT_POLICY", "default-policy"), _config_env("LOG_LEVEL", "log-level"),
                            _config_env("FAST_PATH", "fast-path"),
                            _config_env("ON_NODE_PLAINTEXT", "on-node-plaintext"), _config_env("WORKERS", "workers"),
                        ],
                        "ports": [{"name": "admin", "containerPort": values.admin_port, "protocol": "TCP"}],
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
