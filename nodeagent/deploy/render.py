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
import hashlib
import json
from dataclasses import dataclass, field

from nodeagent import live_settings
from nodeagent import settings as settings_model
from nodeagent.admission import policy
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


# Pod Security Admission: the agent needs host PID, hostPath mounts and capabilities, which
# only the `privileged` level allows; clusters enforcing `baseline` reject it otherwise.
POD_SECURITY = {f"pod-security.kubernetes.io/{mode}": "privileged" for mode in ("enforce", "audit", "warn")}
PRIORITY_CLASS = "system-node-critical"
# A generous bound: one agent per node. GKE admits system-node-critical pods outside
# kube-system only against a ResourceQuota scoped to that priority class.
CRITICAL_PODS_QUOTA = "100000"
AGENT_MEMORY_LIMIT = "512Mi"  # with --workers 0, the agent runs as many processes as fit (workers.py)


def _meta(name: str, values: Values, namespaced: bool = True) -> dict:
    meta = {"name": name, "labels": dict(APP_LABELS)}
    if namespaced:
        meta["namespace"] = values.namespace
    return meta


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def config_data(values: Values) -> dict:
    return dict(sorted(settings_model.config_map(values.settings).items()))


def secret_data(values: Values) -> dict:
    return {"ca.crt": _b64(values.anchors_pem), "issuer.crt": _b64(values.issuer_crt_pem),
            "issuer.key": _b64(values.issuer_key_pem)}


def restart_keys() -> list[str]:
    """The ConfigMap's keys a running agent cannot take live (all but live_settings.LIVE)."""
    return sorted(o.flag for o in settings_model.cluster_options() if live_settings.waits_for_restart(o.attr))


def config_checksum(values: Values) -> str:
    """Changes with the ConfigMap's settings that need a restart, or the issuer Secret, so
    applying such a change rolls the agents (hitlessly); the other settings are taken live from
    the mounted ConfigMap, with no roll (the chart computes the same: sorted compact JSON, as
    Helm's toJson)."""
    config = {key: text for key, text in config_data(values).items() if key in restart_keys()}
    text = json.dumps({"config": config, "secret": secret_data(values)}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def render(values: Values) -> list[dict]:
    empty = [name for name, pem in (("trust anchors (ca.crt)", values.anchors_pem),
                                    ("issuer certificate (issuer.crt)", values.issuer_crt_pem),
                                    ("issuer key (issuer.key)", values.issuer_key_pem)) if not pem.strip()]
    if empty:
        raise ValueError(f"empty {', '.join(empty)}: make them with `nodeagent identity init`")
    namespace = _meta(values.namespace, values, namespaced=False)
    namespace["labels"].update(POD_SECURITY)
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": namespace},
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
         "data": config_data(values)},
        {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": _meta(f"{NAME}-identity-issuer", values),
         "data": secret_data(values)},
        {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": _meta(f"{NAME}-critical-pods", values),
         "spec": {"hard": {"pods": CRITICAL_PODS_QUOTA},
                  "scopeSelector": {"matchExpressions": [{"scopeName": "PriorityClass", "operator": "In",
                                                          "values": [PRIORITY_CLASS]}]}}},
        daemonset(values),
        *policy.manifests(values.image, values.settings.mesh_label, dict(APP_LABELS)),
    ]


CONFIG_DIR = "/etc/nodeagent/config"  # the ConfigMap, mounted: the agent watches it (--config-dir)
STATE_DIR = "/var/lib/nodeagent"  # on the node: what an agent keeps for the next one (--state-dir)


TERMINATION_MARGIN_S = live_settings.TERMINATION_MARGIN_S  # beyond the drain deadline: the agent cuts and exits


def termination_grace_s(drain_timeout: float) -> int:
    """The chart computes the same from the duration's text (whole units: 10m, 90s, 1h)."""
    return int(drain_timeout) + TERMINATION_MARGIN_S


def daemonset(values: Values) -> dict:
    host = lambda name, path, kind="Directory": {"name": name, "hostPath": {"path": path, "type": kind}}  # noqa: E731
    probe = lambda path, **more: {"httpGet": {"path": path, "port": "metrics"}, "periodSeconds": 10,  # noqa: E731
                                  **more}
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": _meta(NAME, values),
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": NAME}},
            # The new agent starts beside the old one and takes over its pods before the old one
            # drains (README, "Upgrades"): never a node without a serving agent.
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": dict(APP_LABELS),
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(values.metrics_port),
                                    "prometheus.io/path": "/metrics",
                                    "nodeagent.io/config-checksum": config_checksum(values)},
                },
                "spec": {
                    "serviceAccountName": NAME,
                    # SIGTERM drains for --drain-timeout; the kubelet's SIGKILL must come after it.
                    "terminationGracePeriodSeconds": termination_grace_s(values.settings.drain_timeout),
                    "hostPID": True,
                    "priorityClassName": PRIORITY_CLASS,
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [{
                        "name": "agent",
                        "image": values.image,
                        "args": ["run", "--kube", "--node-name=$(NODE_NAME)",
                                 "--identity-dir=/var/run/nodeagent/identity",
                                 f"--admin=127.0.0.1:{values.admin_port}", f"--metrics=0.0.0.0:{values.metrics_port}",
                                 "--pin-root=/sys/fs/bpf/nodeagent", f"--config-dir={CONFIG_DIR}",
                                 f"--state-dir={STATE_DIR}"],
                        "env": [
                            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                            # The grace period, for the agent to warn of a drain-timeout raised live beyond it.
                            {"name": live_settings.GRACE_ENV,
                             "value": str(termination_grace_s(values.settings.drain_timeout))},
                            # With --workers 0 the agent runs as many processes as this allows.
                            {"name": "NODEAGENT_MEMORY_LIMIT", "valueFrom": {"resourceFieldRef": {
                                "containerName": "agent", "resource": "limits.memory"}}},
                        ],
                        "ports": [{"name": "metrics", "containerPort": values.metrics_port, "protocol": "TCP"}],
                        # bcc compiles the programs before the metrics port opens: up to 5 minutes.
                        "startupProbe": probe("/live", periodSeconds=5, failureThreshold=60),
                        "readinessProbe": probe("/ready"),
                        "livenessProbe": probe("/live"),
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                                      "limits": {"memory": AGENT_MEMORY_LIMIT}},
                        "securityContext": {
                            "privileged": False, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            # containerd's and CRI-O's default AppArmor profile denies writes under
                            # /sys/fs/[^c]*: bpffs pins; their default seccomp profile, bpf() and
                            # perf_event_open() without CAP_SYS_ADMIN. Capabilities bound the agent.
                            "appArmorProfile": {"type": "Unconfined"},
                            "seccompProfile": {"type": "Unconfined"},
                            "capabilities": {"drop": ["ALL"], "add": ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE",
                                                                     "SYS_RESOURCE", "PERFMON"]},
                        },
                        "volumeMounts": [
                            {"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "HostToContainer"},
                            {"name": "cgroup", "mountPath": "/sys/fs/cgroup", "readOnly": True},
                            {"name": "modules", "mountPath": "/lib/modules", "readOnly": True},
                            {"name": "headers", "mountPath": "/usr/src", "readOnly": True},
                            {"name": "identity", "mountPath": "/var/run/nodeagent/identity", "readOnly": True},
                            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                            {"name": "run", "mountPath": "/run"},
                            {"name": "tmp", "mountPath": "/tmp"},
                            {"name": "state", "mountPath": STATE_DIR},
                        ],
                    }],
                    "volumes": [
                        host("bpffs", "/sys/fs/bpf"), host("cgroup", "/sys/fs/cgroup"),
                        # Kernel headers: absent on some nodes (bcc then uses /sys/kernel/kheaders).
                        host("modules", "/lib/modules"), host("headers", "/usr/src", "DirectoryOrCreate"),
                        {"name": "identity", "secret": {"secretName": f"{NAME}-identity-issuer"}},
                        {"name": "config", "configMap": {"name": f"{NAME}-config"}},
                        {"name": "run", "emptyDir": {"medium": "Memory"}},
                        {"name": "tmp", "emptyDir": {}},  # the root filesystem is read-only
                        # The last settings applied, for an agent that starts on a bad ConfigMap
                        # (a new pod, or after a reboot, too: not an emptyDir).
                        host("state", STATE_DIR, "DirectoryOrCreate"),
                    ],
                },
            },
        },
    }
