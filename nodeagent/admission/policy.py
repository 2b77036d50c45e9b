"""No pod of a meshed namespace runs unmeshed: a MutatingAdmissionPolicy (admission inside the
API server, CEL; GA in Kubernetes 1.36) that makes the enrolment gate (admission/gate.py) the
first init container of every pod the mesh label covers. The API server applies it to every
such pod it admits, with nothing of ours to be up or reachable: a pod created while the
agents are down, or before they are installed, is admitted with its gate and waits on its
node until that node's agent enrols it. ARCHITECTURE.md, "Admission", says why this and not
a webhook or a CNI plugin.

The label's opt-in rules are the view's (cluster/model.py, `meshed`): the pod's own label
if it is the mesh value or "disabled", else its namespace's. Host-network pods are never
meshed, and a pod that already has the gate is left alone.
"""

from nodeagent.cluster.model import OPT_OUT

GATE_NAME = "nodeagent-enrolment"
POLICY_NAME = "nodeagent-enrolment-gate"
GATE_COMMAND = ["/opt/venv/bin/python", "-m", "nodeagent.admission.gate"]  # deploy/Dockerfile's venv


def _cel(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def meshed_condition(mesh_label: str) -> str:
    key, _, value = mesh_label.partition("=")
    own = f"object.metadata.?labels[?{_cel(key)}].orValue(\"\")"
    namespace = f"namespaceObject.metadata.?labels[?{_cel(key)}].orValue(\"\")"
    return f"{own} in [{_cel(value)}, {_cel(OPT_OUT)}] ? {own} == {_cel(value)} : {namespace} == {_cel(value)}"


def gate_container(image: str) -> str:
    """The init container, as a CEL object (PSA `restricted` compliant: it only reads /proc)."""
    command = ", ".join(_cel(part) for part in GATE_COMMAND)
    c = "Object.spec.initContainers"
    return (f"{c}{{name: {_cel(GATE_NAME)}, image: {_cel(image)}, command: [{command}], "
            f"resources: {c}.resources{{requests: {{\"cpu\": \"10m\", \"memory\": \"32Mi\"}}, "
            f"limits: {{\"memory\": \"64Mi\"}}}}, "
            f"securityContext: {c}.securityContext{{runAsNonRoot: true, runAsUser: 65534, "
            f"allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, "
            f"capabilities: {c}.securityContext.capabilities{{drop: [\"ALL\"]}}, "
            f"seccompProfile: {c}.securityContext.seccompProfile{{type: \"RuntimeDefault\"}}}}}}")


def gate_patch(image: str, mesh_label: str) -> str:
    """The gate first among the init containers if the pod is meshed, else no change. (The
    namespace's labels are visible to mutations, not to matchConditions.)"""
    gate = gate_container(image)
    return (f"!({meshed_condition(mesh_label)}) ? [] : "
            "object.spec.?initContainers.orValue([]).size() > 0 ? "
            f"[JSONPatch{{op: \"add\", path: \"/spec/initContainers/0\", value: {gate}}}] : "
            f"[JSONPatch{{op: \"add\", path: \"/spec/initContainers\", value: [{gate}]}}]")


def manifests(image: str, mesh_label: str, labels: dict) -> list[dict]:
    api = "admissionregistration.k8s.io/v1"
    return [
        {"apiVersion": api, "kind": "MutatingAdmissionPolicy", "metadata": {"name": POLICY_NAME,
                                                                            "labels": dict(labels)},
         "spec": {
             "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"],
                                                     "operations": ["CREATE"], "resources": ["pods"]}]},
             "matchConditions": [
                 {"name": "not-host-network", "expression": "!object.spec.?hostNetwork.orValue(false)"},
                 {"name": "not-gated-yet", "expression":
                     f"!object.spec.?initContainers.orValue([]).exists(c, c.name == {_cel(GATE_NAME)})"},
             ],
             "mutations": [{"patchType": "JSONPatch",
                            "jsonPatch": {"expression": gate_patch(image, mesh_label)}}],
             "failurePolicy": "Fail",
             "reinvocationPolicy": "Never",
         }},
        {"apiVersion": api, "kind": "MutatingAdmissionPolicyBinding", "metadata": {"name": POLICY_NAME,
                                                                                   "labels": dict(labels)},
         "spec": {"policyName": POLICY_NAME}},
    ]
