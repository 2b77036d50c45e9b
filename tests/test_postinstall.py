"""nodeagent check --post-install, against the API server double."""

import base64
import datetime
import subprocess
import sys

import yaml

from kube_double import ApiDouble
from nodeagent import postinstall
from nodeagent.cluster.kube import ApiClient, KubeConfig
from nodeagent.identity.ca import Authority


def installed(api: ApiDouble, ready: int, desired: int, anchor=None, issuer=None) -> None:
    anchor = anchor or Authority.new_anchor("cluster.local")
    issuer = issuer or anchor.new_issuer("cluster.local")
    api.singles["/apis/apps/v1/namespaces/nodeagent/daemonsets/nodeagent"] = {
        "kind": "DaemonSet", "metadata": {"generation": 2},
        "status": {"desiredNumberScheduled": desired, "numberReady": ready, "updatedNumberScheduled": desired,
                   "numberAvailable": ready, "observedGeneration": 2}}
    api.singles["/api/v1/namespaces/nodeagent/secrets/nodeagent-identity-issuer"] = {
        "kind": "Secret", "data": {"ca.crt": base64.b64encode(anchor.certificate_pem()).decode(),
                                   "issuer.crt": base64.b64encode(issuer.chain_pem()).decode(),
                                   "issuer.key": base64.b64encode(issuer.key_pem()).decode()}}


def kubeconfig(tmp_path, api) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({"current-context": "t", "contexts": [{"name": "t", "context": {
        "cluster": "c", "user": "u"}}], "clusters": [{"name": "c", "cluster": {"server": api.url}}],
        "users": [{"name": "u", "user": {"token": api.token}}]}))
    return str(path)


def test_a_healthy_install_passes_every_check(tmp_path):
    api = ApiDouble()
    try:
        installed(api, ready=3, desired=3)
        done = subprocess.run([sys.executable, "-m", "nodeagent", "check", "--post-install", "--kubeconfig",
                               kubeconfig(tmp_path, api)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout
        assert "[ok]   agents rolled out and ready on every node: 3 of 3 nodes ready, rollout complete" in done.stdout
        assert "[ok]   API: system:serviceaccount:nodeagent:nodeagent may list and watch endpointslices: allowed" \
            in done.stdout
        assert "[ok]   issuer key matches the issuer certificate" in done.stdout
        assert "[ok]   identity issuer chains to a trust anchor" in done.stdout
    finally:
        api.close()


def test_missing_permissions_and_unready_agents_fail_with_hints(tmp_path):
    api = ApiDouble()
    try:
        client = ApiClient(KubeConfig(api.url, token=api.token), timeout_s=5)
        api.forbidden.add("endpointslices")
        checks = postinstall.check_api(client)
        failed = [c for c in checks if not c.ok]
        assert [c.name for c in failed] == ["API: system:serviceaccount:nodeagent:nodeagent may list and watch "
                                            "endpointslices"]
        assert "no RBAC rule" in failed[0].detail and "ClusterRole" in failed[0].hint
        installed(api, ready=1, desired=3)
        check = postinstall.check_daemonset(client, "nodeagent")
        assert not check.ok and check.detail == "1 of 3 nodes ready (of 3: numberReady 1, numberAvailable 1)"
        api.singles["/apis/apps/v1/namespaces/nodeagent/daemonsets/nodeagent"]["metadata"]["generation"] = 3
        assert "not seen the latest spec" in postinstall.check_daemonset(client, "nodeagent").detail
    finally:
        api.close()


def test_issuer_checks_chain_expiry_and_a_foreign_issuer():
    anchor = Authority.new_anchor("cluster.local")
    issuer = anchor.new_issuer("cluster.local", lifetime=datetime.timedelta(days=30))
    checks = {c.name: c for c in postinstall.check_issuer(anchor.certificate_pem(), issuer.chain_pem())}
    assert checks["identity issuer chains to a trust anchor"].ok
    near = checks["issuer certificate not near expiry"]
    assert not near.ok and not near.required  # a warning, not a failure
    stranger = Authority.new_anchor("cluster.local").new_issuer("cluster.local")
    checks = {c.name: c for c in postinstall.check_issuer(anchor.certificate_pem(), stranger.chain_pem())}
    assert not checks["identity issuer chains to a trust anchor"].ok
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=40)
    checks = {c.name: c for c in postinstall.check_issuer(anchor.certificate_pem(), issuer.chain_pem(), now=later)}
    assert not checks["issuer certificate is valid"].ok


def test_an_issuer_key_that_is_not_the_certificates_fails():
    anchor = Authority.new_anchor("cluster.local")
    issuer, other = anchor.new_issuer("cluster.local"), anchor.new_issuer("cluster.local")
    checks = {c.name: c for c in postinstall.check_issuer(anchor.certificate_pem(), issuer.chain_pem(),
                                                          key_pem=issuer.key_pem())}
    assert checks["issuer key matches the issuer certificate"].ok
    checks = {c.name: c for c in postinstall.check_issuer(anchor.certificate_pem(), issuer.chain_pem(),
                                                          key_pem=other.key_pem())}
    assert not checks["issuer key matches the issuer certificate"].ok
