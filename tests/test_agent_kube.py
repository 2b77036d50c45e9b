"""The agent on the Kubernetes API path: the lab's objects served by the API
double, the agent started with --kubeconfig, traffic through the mesh."""

import subprocess
import sys

import pytest
import yaml

from kube_double import ApiDouble
from nodeagent.identity import ca, naming
from nodeagent.lab import lab as lab_ops
from nodeagent.lab import manifests
from test_postinstall import kubeconfig
from test_proxy import agent_stats, curl, wait_until
from conftest import lab_fixture

pytestmark = pytest.mark.privileged


lab = lab_fixture(nodes=1, mesh="none")


def endpoint_slice(service: dict, pods: list[dict]) -> dict:
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    selected = [p for p in pods if all(p["metadata"]["labels"].get(k) == v
                                       for k, v in service["spec"]["selector"].items())]
    port = service["spec"]["ports"][0]
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-x1", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": port["name"], "port": port["targetPort"], "protocol": "TCP"}],
            "endpoints": [{"addresses": [p["status"]["podIP"]], "conditions": {"ready": True},
                           "targetRef": {"kind": "Pod", "name": p["metadata"]["name"], "namespace": namespace}}
                          for p in selected]}


def test_the_agent_follows_the_kubernetes_api(lab, tmp_path):
    api = ApiDouble()
    pods = manifests.read_manifests(lab.cluster_dir, "pods")
    for kind in ("namespaces", "pods", "services"):
        for obj in manifests.read_manifests(lab.cluster_dir, kind):
            api.put(kind, obj)
    for service in manifests.read_manifests(lab.cluster_dir, "services"):
        api.put("endpointslices", endpoint_slice(service, pods))
    identity = tmp_path / "identity"
    anchor = ca.Authority.new_anchor(naming.DEFAULT_TRUST_DOMAIN)
    ca.write_identity_files(identity, anchor, anchor.new_issuer(naming.DEFAULT_TRUST_DOMAIN))
    agent = subprocess.Popen(
        [sys.executable, "-m", "nodeagent", "run", "--node-name", "node0", "--kubeconfig", kubeconfig(tmp_path, api),
         "--cgroup", str(lab.cgroup_root / "node0"), "--pin-root", str(lab_ops.BPF_PIN_ROOT),
         "--identity-dir", str(identity)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: lab_ops.agent_ready(lab.plan.nodes[0]), "the agent", timeout_s=60)
        assert len(agent_stats(0)["pods"]) == 5
        assert curl(lab, "client-n0-0", "http://10.96.0.10/") == "hello from http-n0-0\n"
        # A label change through the API takes the pod out of the mesh, live.
        client = next(p for p in pods if p["metadata"]["name"] == "client-n0-0")
        client = yaml.safe_load(yaml.safe_dump(client))
        client["metadata"]["labels"]["nodeagent.io/mesh"] = "disabled"
        api.put("pods", client)
        wait_until(lambda: len(agent_stats(0)["pods"]) == 4, "the pod to leave")
        # Deleted from the API: its series and enrolment go.
        api.delete("pods", "default", "echo-n0-0")
        wait_until(lambda: len(agent_stats(0)["pods"]) == 3, "the deleted pod to go")
    finally:
        agent.terminate()
        agent.wait(10)
        api.close()
        lab_ops.datapath_cleanup.remove_all(lab_ops.BPF_PIN_ROOT)
