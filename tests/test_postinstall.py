"""nodeagent check --post-install, against the API server double."""

import base64
import datetime
import subprocess
import sys
from dataclasses import replace

import yaml
from prometheus_client import CollectorRegistry, generate_latest

from kube_double import ApiDouble
from nodeagent import postinstall
from nodeagent.agent.config_dir import CHECK_S
from nodeagent.agent.settings_reloads import SettingsCollector, SettingsReloads
from nodeagent.cluster.kube import ApiClient, KubeConfig
from nodeagent.identity.ca import Authority
from nodeagent.lab import config as lab_config
from nodeagent.settings import DEFAULT


def agent_metrics(tmp_path, changed: dict[str, str]) -> str:
    """An agent's /metrics text about its settings (the real SettingsReloads and collector), after
    the ConfigMap's directory changed to `changed` while it ran."""
    directory = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}"
    lab_config.write(directory, {"log-level": "info"})
    reloads = SettingsReloads(directory, replace(DEFAULT, node_name="node-1"), now=0.0)
    running = reloads.initial()
    lab_config.write(directory, {"log-level": "info", **changed})
    reloads.check(running, CHECK_S)
    registry = CollectorRegistry()
    registry.register(SettingsCollector(reloads))
    return generate_latest(registry).decode()


def agents(api: ApiDouble, metrics: dict[str, str]) -> None:
    """The agents' pods, one per node, each answering `metrics[node]` on its metrics port."""
    api.singles["/api/v1/namespaces/nodeagent/pods"] = {"kind": "PodList", "items": [
        {"metadata": {"name": f"nodeagent-{node}", "namespace": "nodeagent"},
         "spec": {"nodeName": node, "containers": [{"name": "agent", "ports": [
             {"name": "metrics", "containerPort": 4190}]}]}, "status": {"phase": "Running"}}
        for node in metrics]}
    for node, text in metrics.items():
        api.texts[f"/api/v1/namespaces/nodeagent/pods/nodeagent-{node}:4190/proxy/metrics"] = text


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
        agents(api, {f"node-{i}": agent_metrics(tmp_path, {}) for i in range(3)})
        done = subprocess.run([sys.executable, "-m", "nodeagent", "check", "--post-install", "--kubeconfig",
                               kubeconfig(tmp_path, api)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout
        assert "[ok]   agents rolled out and ready on every node: 3 of 3 nodes ready, rollout complete" in done.stdout
        assert "[ok]   API: system:serviceaccount:nodeagent:nodeagent may list and watch endpointslices: allowed" \
            in done.stdout
        assert "[ok]   issuer key matches the issuer certificate" in done.stdout
        assert "[ok]   identity issuer chains to a trust anchor" in done.stdout
        assert "[ok]   agents run with the ConfigMap's settings (none waits for a restart): 3 running agent(s) " \
            "asked" in done.stdout
    finally:
        api.close()


def test_settings_waiting_for_a_restart_are_reported_per_node_as_a_warning(tmp_path):
    api = ApiDouble()
    try:
        installed(api, ready=2, desired=2)
        agents(api, {"node-0": agent_metrics(tmp_path, {"log-level": "debug"}),  # applied live
                     "node-1": agent_metrics(tmp_path, {"workers": "3", "mesh-label": "a=b"})})
        done = subprocess.run([sys.executable, "-m", "nodeagent", "check", "--post-install", "--kubeconfig",
                               kubeconfig(tmp_path, api)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout  # the agents run on: a warning, not a failure
        assert ("[warn] agents run with the ConfigMap's settings (none waits for a restart): waiting for a "
                "restart on node-1: mesh-label, workers") in done.stdout
        assert "rollout restart daemonset nodeagent" in done.stdout
        client = ApiClient(KubeConfig(api.url, token=api.token), timeout_s=5)
        del api.texts["/api/v1/namespaces/nodeagent/pods/nodeagent-node-0:4190/proxy/metrics"]
        check = postinstall.check_restarts(client, "nodeagent")
        assert not check.ok and not check.required
        assert "cannot read the metrics of node-0: " in check.detail and "node-1: mesh-label, workers" in check.detail
    finally:
        api.close()


def test_restarts_pending_reads_only_config_needs_restart():
    text = ('# TYPE config_needs_restart gauge\nconfig_needs_restart{setting="workers"} 1.0\n'
            'config_needs_restart{setting="trust-domain"} 1.0\n# TYPE other gauge\nother{setting="x"} 1.0\n')
    assert postinstall.restarts_pending(text) == ["trust-domain", "workers"]
    assert postinstall.restarts_pending("") == []


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
