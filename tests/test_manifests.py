import pytest
import yaml

from nodeagent.lab import manifests
from nodeagent.lab.plan import plan_lab


@pytest.mark.parametrize("text,expected", [
    ("app=web", ("app", "web")),
    ("nodeagent.io/mesh=enabled", ("nodeagent.io/mesh", "enabled")),
    ("nodeagent.io/mesh-", ("nodeagent.io/mesh", None)),
    ("empty=", ("empty", "")),
    ("a.b-c_d=x.y-z_1", ("a.b-c_d", "x.y-z_1")),
    ("k=" + "v" * 63, ("k", "v" * 63)),
])
def test_label_changes_accepted(text, expected):
    assert manifests.parse_label_change(text) == expected


@pytest.mark.parametrize("text", [
    "novalue", "=value", "bad key=x", "-lead=x", "k=-lead", "k=trail-", "k=" + "v" * 64,
    "UPPER.Prefix/k=v", "a/b/c=v", "/k=v", "k=sp ace",
])
def test_label_changes_refused(text):
    with pytest.raises(manifests.ManifestError):
        manifests.parse_label_change(text)


def test_pod_manifest_is_a_kubernetes_pod():
    pod = plan_lab(1, 1, new_uid=lambda: "1f7c6b3e-0000-4000-8000-000000000001").pods[0]
    m = manifests.pod_manifest(pod)
    assert (m["apiVersion"], m["kind"]) == ("v1", "Pod")
    assert m["metadata"] == {"name": "http-n0-0", "namespace": "default",
                             "uid": "1f7c6b3e-0000-4000-8000-000000000001",
                             "labels": {"app": "http", "nodeagent.io/mesh": "enabled"}}
    assert m["spec"]["nodeName"] == "node0"
    assert m["spec"]["serviceAccountName"] == "http"
    assert m["spec"]["containers"][0]["ports"][0]["containerPort"] == 8080
    assert m["status"]["podIP"] == pod.ip
    assert m["status"]["containerStatuses"][0]["containerID"] == f"containerd://{pod.container_id}"


def test_cluster_directory_round_trip_and_relabel(tmp_path):
    plan = plan_lab(2, 5)
    manifests.write_cluster(tmp_path, plan)
    assert len(manifests.read_manifests(tmp_path, "pods")) == 10
    assert [m["metadata"]["name"] for m in manifests.read_manifests(tmp_path, "nodes")] == ["node0", "node1"]
    assert len(manifests.read_manifests(tmp_path, "services")) == 4
    assert [m["metadata"]["name"] for m in manifests.read_manifests(tmp_path, "namespaces")] == ["default"]
    assert not list(tmp_path.rglob("*.tmp"))

    manifests.relabel_pod(tmp_path, "default", "echo-n1-0", "nodeagent.io/mesh", "disabled")
    on_disk = yaml.safe_load((tmp_path / "pods/default/echo-n1-0.yaml").read_text())
    assert on_disk["metadata"]["labels"]["nodeagent.io/mesh"] == "disabled"
    manifests.relabel_pod(tmp_path, "default", "echo-n1-0", "nodeagent.io/mesh", None)
    on_disk = yaml.safe_load((tmp_path / "pods/default/echo-n1-0.yaml").read_text())
    assert on_disk["metadata"]["labels"] == {"app": "echo"}


def test_relabel_of_a_missing_pod_is_a_clear_error(tmp_path):
    with pytest.raises(manifests.ManifestError, match="no pod default/ghost"):
        manifests.relabel_pod(tmp_path, "default", "ghost", "a", "b")
