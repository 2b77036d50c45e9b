"""`nodeagent check --post-install`: is the installed mesh healthy? Each check
is a pass/fail line with a hint, as preflight's are.

- the API is reachable and the agent's ServiceAccount permissions work
  (list and watch of every resource it follows);
- the DaemonSet's agents are ready on every node it is scheduled on;
- the identity issuer chains to the trust anchors and is not near expiry.
"""

import base64
import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from nodeagent.cluster.kube import RESOURCES, ApiClient, ApiError
from nodeagent.preflight import Check

EXPIRY_WARNING = datetime.timedelta(days=60)


def check_api(client: ApiClient) -> list[Check]:
    checks = []
    for kind, path in RESOURCES.items():
        try:
            _, version = client.list(path, {})
            for _ in client.watch(path, {}, version, timeout_s=1):
                break  # the stream opened: watching is allowed
            checks.append(Check(f"API: list and watch {kind}", True, "allowed"))
        except ApiError as e:
            hint = ("apply the ClusterRole from `nodeagent install`" if e.status == 403 else
                    "check the kubeconfig's server and credentials")
            checks.append(Check(f"API: list and watch {kind}", False, str(e)[:200], hint))
        except OSError as e:
            checks.append(Check(f"API: list and watch {kind}", False, f"unreachable: {e}",
                                "check the kubeconfig's server address"))
            break
    return checks


def check_daemonset(client: ApiClient, namespace: str) -> Check:
    try:
        daemonset = client.get(f"/apis/apps/v1/namespaces/{namespace}/daemonsets/nodeagent")
    except (ApiError, OSError) as e:
        return Check("agents ready on every node", False, f"cannot read the DaemonSet: {e}",
                     "install with `nodeagent install | kubectl apply -f -`")
    status = daemonset.get("status", {})
    desired, ready = status.get("desiredNumberScheduled", 0), status.get("numberReady", 0)
    ok = desired > 0 and ready == desired
    return Check("agents ready on every node", ok, f"{ready} of {desired} nodes ready",
                 "kubectl -n %s describe daemonset nodeagent; the agent logs name what it refused" % namespace)


def check_issuer(anchors_pem: bytes, issuer_pem: bytes, now: datetime.datetime | None = None) -> list[Check]:
    now = now or datetime.datetime.now(datetime.timezone.utc)
    try:
        anchors = x509.load_pem_x509_certificates(anchors_pem)
        issuer = x509.load_pem_x509_certificates(issuer_pem)[0]
    except ValueError as e:
        return [Check("identity issuer", False, f"unreadable certificates: {e}", "run `nodeagent identity init`")]
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
        return check_issuer(base64.b64decode(data["ca.crt"]), base64.b64decode(data["issuer.crt"]))
    except (ApiError, OSError, KeyError) as e:
        return [Check("identity issuer", False, f"cannot read the issuer Secret: {e}",
                      "install with `nodeagent install`, which creates it")]


def run_all(client: ApiClient, namespace: str) -> list[Check]:
    checks = check_api(client)
    if all(c.ok for c in checks):
        checks.append(check_daemonset(client, namespace))
        checks += check_issuer_secret(client, namespace)
    return checks
