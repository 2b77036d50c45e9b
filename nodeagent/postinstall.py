"""`nodeagent check --post-install`: is the installed mesh healthy? Each check
is a pass/fail line with a hint, as preflight's are.

- the API is reachable, and the agent's ServiceAccount (not the caller) may list and watch
  every resource it follows: asked of the API server's own authorizer with a
  SubjectAccessReview for that ServiceAccount, so a broken binding fails here;
- the DaemonSet's rollout is complete (the controller saw the latest spec, every node runs
  the updated pod) and its agents are ready on every node it is scheduled on;
- the identity issuer chains to the trust anchors, its key is the key of its certificate,
  and none is near expiry;
- no agent runs with settings that wait for a restart (mesh label, trust domain, fast paths,
  workers differ between the ConfigMap and what the agent started with): each agent says so on
  its metrics port (`config_needs_restart{setting}`), read through the API server's pod proxy.
  A warning, not a failure: the agents run on, with the settings they started with.
"""

import base64
import datetime

from prometheus_client.parser import text_string_to_metric_families

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from nodeagent.cluster.kube import RESOURCES, ApiClient, ApiError, ConfigError
from nodeagent.deploy.render import APP_LABELS, NAME
from nodeagent.preflight import Check

EXPIRY_WARNING = datetime.timedelta(days=60)
SAR_PATH = "/apis/authorization.k8s.io/v1/subjectaccessreviews"


def _group_and_resource(path: str) -> tuple[str, str]:
    parts = path.strip("/").split("/")  # api/v1/pods or apis/GROUP/VERSION/RESOURCE
    return ("", parts[2]) if parts[0] == "api" else (parts[1], parts[3])


def check_api(client: ApiClient, namespace: str = NAME) -> list[Check]:
    """Whether the agent's ServiceAccount may list and watch what it follows."""
    user = f"system:serviceaccount:{namespace}:{NAME}"
    groups = ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"]
    checks = []
    for kind, path in RESOURCES.items():
        group, resource = _group_and_resource(path)
        name = f"API: {user} may list and watch {kind}"
        try:
            refused = []
            for verb in ("list", "watch"):
                review = client.post(SAR_PATH, {
                    "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                    "spec": {"user": user, "groups": groups,
                             "resourceAttributes": {"group": group, "resource": resource, "verb": verb}}})
                if not review.get("status", {}).get("allowed"):
                    refused.append(f"{verb}: {review.get('status', {}).get('reason') or 'no rule allows it'}")
            checks.append(Check(name, not refused, "; ".join(refused) or "allowed",
                                "apply the ClusterRole and ClusterRoleBinding from `nodeagent install`"))
        except ApiError as e:
            hint = ("your credentials must be allowed to create subjectaccessreviews" if e.status == 403 else
                    "check the kubeconfig's server and credentials")
            checks.append(Check(name, False, str(e)[:200], hint))
        except (OSError, ConfigError) as e:
            checks.append(Check(name, False, f"unreachable: {e}", "check the kubeconfig's server address"))
            break
    return checks


def check_daemonset(client: ApiClient, namespace: str) -> Check:
    name = "agents rolled out and ready on every node"
    hint = f"kubectl -n {namespace} rollout status daemonset {NAME}; the agent logs name what it refused"
    try:
        daemonset = client.get(f"/apis/apps/v1/namespaces/{namespace}/daemonsets/{NAME}")
    except (ApiError, OSError, ConfigError) as e:
        return Check(name, False, f"cannot read the DaemonSet: {e}",
                     "install with `nodeagent install | kubectl apply -f -`")
    status = daemonset.get("status", {})
    desired = status.get("desiredNumberScheduled", 0)
    counts = {key: status.get(key, 0) for key in ("updatedNumberScheduled", "numberReady", "numberAvailable")}
    if desired == 0:
        return Check(name, False, "scheduled on no node", hint)
    if status.get("observedGeneration", 0) < daemonset["metadata"].get("generation", 0):
        return Check(name, False, "the controller has not seen the latest spec yet", hint)
    lagging = [f"{key} {value}" for key, value in counts.items() if value != desired]
    return Check(name, not lagging, f"{counts['numberReady']} of {desired} nodes ready"
                 + (f" (of {desired}: {', '.join(lagging)})" if lagging else ", rollout complete"), hint)


def check_issuer(anchors_pem: bytes, issuer_pem: bytes, now: datetime.datetime | None = None,
                 key_pem: bytes | None = None) -> list[Check]:
    now = now or datetime.datetime.now(datetime.timezone.utc)
    try:
        anchors = x509.load_pem_x509_certificates(anchors_pem)
        issuer = x509.load_pem_x509_certificates(issuer_pem)[0]
        key = serialization.load_pem_private_key(key_pem, None) if key_pem is not None else None
    except (ValueError, TypeError) as e:
        return [Check("identity issuer", False, f"unreadable certificates or key: {e}",
                      "run `nodeagent identity init`")]
    chained = False
    for anchor in anchors:
        try:
            issuer.verify_directly_issued_by(anchor)
            chained = True
        except (ValueError, TypeError, InvalidSignature):
            continue
    checks = [Check("identity issuer chains to a trust anchor", chained,
                    f"{len(anchors)} anchor(s) trusted" if chained else "signed by none of the trust anchors",
                    "the Secret's issuer.crt must be signed by a certificate in ca.crt")]
    if key is not None:
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        matches = (key.public_key().public_bytes(serialization.Encoding.DER, public)
                   == issuer.public_key().public_bytes(serialization.Encoding.DER, public))
        checks.append(Check("issuer key matches the issuer certificate", matches,
                            "same public key" if matches else "issuer.key is not the key of issuer.crt",
                            "put issuer.crt and issuer.key from the same `nodeagent identity init` in the Secret"))
    for name, certificate in [("issuer", issuer), *((f"trust anchor {i + 1}", a) for i, a in enumerate(anchors))]:
        start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
        valid = start <= now < end
        checks.append(Check(f"{name} certificate is valid", valid, f"valid until {end:%Y-%m-%d}",
                            "rotate it (README: trust-anchor rotation)"))
        if valid:
            checks.append(Check(f"{name} certificate not near expiry", end - now > EXPIRY_WARNING,
                                f"{(end - now).days} days left", "rotate it before it expires", required=False))
    return checks


def check_issuer_secret(client: ApiClient, namespace: str) -> list[Check]:
    try:
        secret = client.get(f"/api/v1/namespaces/{namespace}/secrets/nodeagent-identity-issuer")
        data = secret["data"]
        return check_issuer(base64.b64decode(data["ca.crt"]), base64.b64decode(data["issuer.crt"]),
                            key_pem=base64.b64decode(data["issuer.key"]))
    except (ApiError, OSError, ConfigError, KeyError) as e:
        return [Check("identity issuer", False, f"cannot read the issuer Secret: {e}",
                      "install with `nodeagent install`, which creates it")]


def restarts_pending(metrics_text: str) -> list[str]:
    """The settings an agent's /metrics says wait for a restart (config_needs_restart{setting} 1)."""
    return sorted(sample.labels["setting"] for family in text_string_to_metric_families(metrics_text)
                  if family.name == "config_needs_restart" for sample in family.samples
                  if sample.value == 1 and "setting" in sample.labels)


def _metrics_port(pod: dict) -> int | None:
    for container in pod.get("spec", {}).get("containers", []):
        for port in container.get("ports", []):
            if port.get("name") == "metrics":
                return port.get("containerPort")
    return None


def check_restarts(client: ApiClient, namespace: str) -> Check:
    """Whether every running agent runs with the ConfigMap's settings, as it says on its metrics port."""
    name = "agents run with the ConfigMap's settings (none waits for a restart)"
    hint = (f"kubectl -n {namespace} rollout restart daemonset {NAME} (an agent changes these only when it "
            "starts; the kubelet brings a ConfigMap's change to the agents within about 2 minutes)")
    selector = ",".join(f"{key}={value}" for key, value in APP_LABELS.items())
    try:
        pods = client.get(f"/api/v1/namespaces/{namespace}/pods", {"labelSelector": selector}).get("items", [])
    except (ApiError, OSError, ConfigError) as e:
        return Check(name, False, f"cannot list the agents' pods: {e}", hint, required=False)
    waiting, unread, asked = [], [], 0
    for pod in pods:
        if pod.get("status", {}).get("phase") != "Running" or pod["metadata"].get("deletionTimestamp"):
            continue
        where = pod.get("spec", {}).get("nodeName") or pod["metadata"]["name"]
        asked += 1
        port = _metrics_port(pod)
        if port is None:
            unread.append(f"{where}: no metrics port")
            continue
        try:
            text = client.get_text(f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}:{port}"
                                   "/proxy/metrics")
            pending = restarts_pending(text)
        except (ApiError, OSError, ConfigError, ValueError) as e:
            unread.append(f"{where}: {str(e)[:120]}")
            continue
        if pending:
            waiting.append(f"{where}: {', '.join(pending)}")
    if not waiting and not unread:
        return Check(name, True, f"{asked} running agent(s) asked", hint, required=False)
    detail = "; ".join([*(f"waiting for a restart on {w}" for w in waiting),
                        *(f"cannot read the metrics of {u}" for u in unread)])
    return Check(name, False, detail, hint if waiting else "the check reads each agent's metrics port through "
                 "the API server (pods/proxy): your credentials must allow it", required=False)


def run_all(client: ApiClient, namespace: str) -> list[Check]:
    checks = check_api(client, namespace)
    if all(c.ok for c in checks):
        checks.append(check_daemonset(client, namespace))
        checks += check_issuer_secret(client, namespace)
        checks.append(check_restarts(client, namespace))
    return checks
