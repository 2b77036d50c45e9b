"""The agent's Kubernetes side against a real control plane (tests/k8s: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler), with its real RBAC, admission (Pod Security at
`baseline` by default, a GKE-like quota on system-node-critical), ServiceAccount tokens,
EndpointSlices and watch semantics."""

import json
import subprocess
import sys
import time

import pytest
import yaml

from nodeagent import postinstall
from nodeagent.cluster.kube import ApiClient, KubeConfig, KubeSource
from nodeagent.identity.ca import Authority, write_identity_files

# As root the cluster binds 10.97.0.1:443 on the test bridge: one per machine, so these take the
# lab lock like the other privileged tests (without root they run on loopback all the same).
pytestmark = pytest.mark.privileged
NAMESPACE = "nodeagent"


def wait_until(predicate, what: str, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def installed(kube, tmp_path_factory):
    """`nodeagent install | kubectl apply -f -`, and a Linux node object for the DaemonSet."""
    identity = tmp_path_factory.mktemp("identity")
    anchor = Authority.new_anchor("cluster.local")
    write_identity_files(identity, anchor, anchor.new_issuer("cluster.local"))
    manifests = subprocess.run([sys.executable, "-m", "nodeagent", "install", "--identity-dir", str(identity),
                                "--image", "nodeagent.test/nodeagent:test"],
                               capture_output=True, text=True, check=True).stdout
    kube.kubectl("apply", "-f", "-", input=manifests)
    for name, labels in (("linux-node", {"kubernetes.io/os": "linux"}), ("windows-node", {"kubernetes.io/os":
                                                                                          "windows"})):
        kube.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": name, "labels": labels}}))
    yield manifests
    kube.kubectl("delete", "node", "linux-node", "windows-node", "--wait=false", check=False)


def agent_kubeconfig(kube, path, token_file) -> KubeConfig:
    """The agent's own credentials: a token of its ServiceAccount, in a file (as projected)."""
    path.write_text(yaml.safe_dump({
        "current-context": "agent", "contexts": [{"name": "agent", "context": {"cluster": "test", "user": "agent"}}],
        "clusters": [{"name": "test", "cluster": {"server": kube.server, "certificate-authority": str(kube.ca)}}],
        "users": [{"name": "agent", "user": {"tokenFile": token_file.name}}]}))
    return KubeConfig.from_kubeconfig(path)


def service_account_token(kube) -> str:
    return kube.kubectl("-n", NAMESPACE, "create", "token", "nodeagent", "--duration=10m").stdout.strip()


def pod(name: str, namespace: str, labels: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"nodeName": "linux-node", "containers": [{"name": "app", "image": "nodeagent.test/app:1",
                                                               "ports": [{"name": "http", "containerPort": 8080}]}]}}


def pod_running(kube, name: str, namespace: str, ips: list[str]) -> None:
    """What the node's kubelet would report: running, ready, these addresses."""
    status = {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips],
              "conditions": [{"type": "Ready", "status": "True"}]}
    kube.kubectl("-n", namespace, "patch", "pod", name, "--subresource=status", "--type=merge",
                 "-p", json.dumps({"status": status}))


def test_the_agents_credentials_follow_pods_services_and_real_endpointslices(kube, installed, tmp_path):
    kube.kubectl("create", "namespace", "shop")
    kube.kubectl("label", "namespace", "shop", "nodeagent.io/mesh=enabled")
    for i, ips in enumerate((["10.244.9.1"], ["10.244.9.2", "fd00:9::2"])):
        kube.kubectl("apply", "-f", "-", input=json.dumps(pod(f"web-{i}", "shop", {"app": "web"})))
        pod_running(kube, f"web-{i}", "shop", ips)
    kube.kubectl("-n", "shop", "create", "service", "clusterip", "web", "--tcp=80:8080")
    kube.kubectl("-n", "shop", "patch", "service", "web", "--type=merge",
                 "-p", json.dumps({"spec": {"selector": {"app": "web"}}}))
    token = tmp_path / "token"
    token.write_text(service_account_token(kube))
    source = KubeSource(ApiClient(agent_kubeconfig(kube, tmp_path / "config", token)), stale_after_s=5)
    try:
        def endpoints():
            source.poll()
            view = source.view
            service = view.services.get("shop/web") if view else None
            return service and sorted(e.ip for e in view.endpoints(service, service.ports[0]))

        # The controller-manager's EndpointSlices, read with the agent's ServiceAccount's rights.
        assert wait_until(endpoints, "endpoints from EndpointSlices") == ["10.244.9.1", "10.244.9.2"]
        view = source.view
        assert view.meshed(view.pods["shop/web-0"]) and view.pods["shop/web-1"].ips == ("10.244.9.2", "fd00:9::2")
        # Rotation: the ServiceAccount's tokens die with it; the kubelet writes a new one.
        kube.kubectl("-n", NAMESPACE, "delete", "serviceaccount", "nodeagent")
        kube.kubectl("-n", NAMESPACE, "create", "serviceaccount", "nodeagent")
        token.write_text(service_account_token(kube))
        kube.kubectl("-n", "shop", "label", "pod", "web-0", "nodeagent.io/mesh=disabled")
        wait_until(lambda: (source.poll() or True) and not source.view.meshed(source.view.pods["shop/web-0"]),
                   "the label change, seen with the new token", timeout_s=60)
        assert source.problems() == []
    finally:
        source.close()


def test_post_install_asks_for_the_agents_own_permissions(kube, installed, tmp_path):
    admin = ApiClient(KubeConfig.from_kubeconfig(kube.admin_kubeconfig))
    assert all(c.ok for c in postinstall.check_api(admin, NAMESPACE))
    binding = kube.kubectl("get", "clusterrolebinding", "nodeagent", "-o", "json").stdout
    kube.kubectl("delete", "clusterrolebinding", "nodeagent")
    try:
        # The caller (cluster admin) may read everything; the agent may not: the check fails.
        failed = [c for c in postinstall.check_api(admin, NAMESPACE) if not c.ok]
        assert len(failed) == 4 and all("list" in c.detail and "watch" in c.detail for c in failed)
    finally:
        kube.kubectl("create", "-f", "-", input=binding)
    check = postinstall.check_daemonset(admin, NAMESPACE)
    assert not check.ok and "0 of 1 nodes ready" in check.detail  # no kubelet runs the pod here
    issuer_checks = postinstall.check_issuer_secret(admin, NAMESPACE)
    assert all(c.ok for c in issuer_checks if c.required), issuer_checks


def test_the_daemonset_passes_pod_security_and_the_critical_pods_quota_on_linux_nodes_only(kube, installed):
    def pods() -> list[dict]:
        listed = kube.kubectl("-n", NAMESPACE, "get", "pods", "-o", "json").stdout
        return json.loads(listed)["items"]

    # Created at all: Pod Security (the cluster enforces baseline) and the quota admitted it.
    (created,) = wait_until(pods, "the DaemonSet's pod")
    terms = created["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchFields"][0]["values"] == ["linux-node"]  # not the Windows node
    # Without the namespace's label or the quota, admission refuses the same pod.
    template = next(d for d in yaml.safe_load_all(installed) if d["kind"] == "DaemonSet")["spec"]["template"]
    spec = {**template["spec"], "serviceAccountName": "default", "priorityClassName": None}
    probe = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe", "namespace": "default"},
             "spec": {k: v for k, v in spec.items() if v is not None}}
    done = kube.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(probe), check=False)
    assert done.returncode != 0 and "violates PodSecurity" in done.stderr
    kube.kubectl("-n", NAMESPACE, "delete", "resourcequota", "nodeagent-critical-pods")
    try:
        probe = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe", "namespace": NAMESPACE},
                 "spec": template["spec"]}
        done = kube.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(probe), check=False)
        assert done.returncode != 0 and "insufficient quota to match these scopes" in done.stderr
    finally:
        kube.kubectl("apply", "-f", "-", input=installed)


def test_exec_credential_plugins_against_the_real_server(kube, installed, tmp_path):
    token = service_account_token(kube)
    plugin = tmp_path / "credential"
    plugin.write_text("#!/bin/sh\nprintf '%s' '" + json.dumps({
        "apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
        "status": {"token": token}}) + "'\n")
    plugin.chmod(0o755)
    config = tmp_path / "config"
    config.write_text(yaml.safe_dump({
        "current-context": "c", "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "clusters": [{"name": "c", "cluster": {"server": kube.server, "certificate-authority": str(kube.ca)}}],
        "users": [{"name": "u", "user": {"exec": {"apiVersion": "client.authentication.k8s.io/v1",
                                                  "command": str(plugin), "interactiveMode": "Never"}}}]}))
    client = ApiClient(KubeConfig.from_kubeconfig(config))
    items, _ = client.list("/api/v1/namespaces", {})
    assert NAMESPACE in {n["metadata"]["name"] for n in items}


def test_the_api_server_puts_the_enrolment_gate_first_in_every_meshed_pod(kube, installed):
    """The MutatingAdmissionPolicy, applied by the real API server: the gate goes first in pods
    the label covers, whether or not any agent is up, and nowhere else."""
    kube.kubectl("create", "namespace", "meshed")
    kube.kubectl("label", "namespace", "meshed", "nodeagent.io/mesh=enabled")
    kube.kubectl("create", "namespace", "plain")

    def created(name: str, namespace: str, labels: dict | None = None, **spec) -> list[str]:
        obj = pod(name, namespace, labels or {})
        obj["spec"].update(spec)
        kube.kubectl("apply", "-f", "-", input=json.dumps(obj))
        got = json.loads(kube.kubectl("-n", namespace, "get", "pod", name, "-o", "json").stdout)
        return [c["name"] for c in got["spec"].get("initContainers", [])]

    assert created("a", "meshed") == ["nodeagent-enrolment"]
    setup = [{"name": "setup", "image": "nodeagent.test/app:1"}]
    assert created("b", "meshed", initContainers=setup) == ["nodeagent-enrolment", "setup"]
    assert created("c", "meshed", {"nodeagent.io/mesh": "disabled"}) == []
    assert created("d", "plain") == []
    assert created("e", "plain", {"nodeagent.io/mesh": "enabled"}) == ["nodeagent-enrolment"]
    kube.kubectl("create", "namespace", "meshed-host")
    kube.kubectl("label", "namespace", "meshed-host", "nodeagent.io/mesh=enabled",
                 "pod-security.kubernetes.io/enforce=privileged")
    assert created("f", "meshed-host", hostNetwork=True) == []
    # The gate passes Pod Security `restricted`: a namespace enforcing it admits gated pods.
    kube.kubectl("label", "namespace", "meshed", "pod-security.kubernetes.io/enforce=restricted")
    strict = {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
              "containers": [{"name": "app", "image": "nodeagent.test/app:1", "securityContext": {
                  "runAsUser": 1000, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}]}
    assert created("g", "meshed", **strict) == ["nodeagent-enrolment"]
