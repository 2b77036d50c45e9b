"""deploy/: the manifests `nodeagent install` prints, the Helm chart, and the schemas they must pass."""

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from nodeagent import live_settings, settings
from nodeagent.agent.workers import MEMORY_LIMIT_ENV, PROCESS_MEMORY_BYTES, automatic_processes
from nodeagent.deploy.render import CONFIG_DIR, Values, render, restart_keys
from nodeagent.identity.ca import Authority

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "nodeagent"
HELM = shutil.which("helm") or str(ROOT / ".tools" / "helm")
K8S_VERSION = "1.30.0"
# GA in 1.36, newer than the schemas kubernetes_validate has: the real API server checks them
# (tests/test_kube_apiserver.py applies every manifest).
NEWER_KINDS = {"MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding"}


def validate(manifest: dict) -> None:
    if manifest["kind"] not in NEWER_KINDS:
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


@pytest.fixture(scope="module")
def identity(tmp_path_factory):
    directory = tmp_path_factory.mktemp("identity")
    anchor = Authority.new_anchor("cluster.local")
    issuer = anchor.new_issuer("cluster.local")
    (directory / "ca.crt").write_bytes(anchor.certificate_pem())
    (directory / "issuer.crt").write_bytes(issuer.chain_pem())
    (directory / "issuer.key").write_bytes(issuer.key_pem())
    return directory


def values_for(identity: Path, agent: dict | None = None, **overrides) -> Values:
    """`agent`: settings by flag name, as `nodeagent install --FLAG VALUE` takes them."""
    return Values(anchors_pem=(identity / "ca.crt").read_text(), issuer_crt_pem=(identity / "issuer.crt").read_text(),
                  issuer_key_pem=(identity / "issuer.key").read_text(), settings=settings.parse(agent or {}),
                  **overrides)


def by_kind(docs: list[dict]) -> dict:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs if d}


def helm_template(identity: Path, *settings: str, namespace: str = "nodeagent") -> list[dict]:
    """The chart as `helm template` renders it into `namespace`, with the Namespace (as install)."""
    done = subprocess.run([HELM, "template", "nodeagent", str(CHART), "--namespace", namespace,
                           "--set", "createNamespace=true",
                           "--set-file", f"identity.trustAnchorsPEM={identity / 'ca.crt'}",
                           "--set-file", f"identity.issuerCrtPEM={identity / 'issuer.crt'}",
                           "--set-file", f"identity.issuerKeyPEM={identity / 'issuer.key'}", *settings],
                          capture_output=True, text=True, check=True)
    return list(yaml.safe_load_all(done.stdout))


@pytest.mark.parametrize("overrides", [{}, {"namespace": "mesh-system", "image": "registry.test/na:1",
                                             "agent": {"mesh-label": "example.com/meshed=yes"}}])
def test_every_rendered_manifest_validates_against_the_kubernetes_schemas(identity, overrides):
    for manifest in render(values_for(identity, **overrides)):
        validate(manifest)


needs_helm = pytest.mark.skipif(not Path(HELM).exists(), reason="helm is installed by `make tools`")


@needs_helm
def test_the_helm_chart_validates_and_equals_install_for_the_same_values(identity):
    chart = helm_template(identity, "--set", "image=registry.test/na:1",
                          "--set", "config.mesh-label=example.com/meshed=yes", "--set", "config.fast-path=splice",
                          "--set", "config.on-node-plaintext=true", "--set", "config.workers=4",
                          namespace="mesh-system")  # the release's namespace
    for manifest in chart:
        validate(manifest)
    expected = render(values_for(identity, namespace="mesh-system", image="registry.test/na:1",
                                 agent={"mesh-label": "example.com/meshed=yes", "fast-path": "splice",
                                        "on-node-plaintext": "true", "workers": "4"}))
    assert by_kind(chart) == by_kind(expected)


def test_the_charts_settings_are_the_settings_models_with_its_defaults():
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart_values["config"] == settings.config_map(settings.DEFAULT)


def test_every_cluster_setting_reaches_the_agent_through_the_mounted_config_map(identity):
    manifests = by_kind(render(values_for(identity, agent={"workers": "3"})))
    data = manifests[("ConfigMap", "nodeagent-config")]["data"]
    assert set(data) == {option.flag for option in settings.cluster_options()} and data["workers"] == "3"
    spec = manifests[("DaemonSet", "nodeagent")]["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert f"--config-dir={CONFIG_DIR}" in container["args"]
    assert not any(arg.startswith(("--workers", "--log-level")) for arg in container["args"])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == CONFIG_DIR)
    assert "subPath" not in mount  # a subPath mount is never updated by the kubelet
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "nodeagent-config"


@needs_helm
def test_install_prints_what_the_chart_renders_with_its_defaults(identity):
    done = subprocess.run([sys.executable, "-m", "nodeagent", "install", "--identity-dir", str(identity)],
                          capture_output=True, text=True, check=True)
    assert by_kind(list(yaml.safe_load_all(done.stdout))) == by_kind(helm_template(identity))


def test_the_daemonset_asks_only_for_what_the_agent_needs(identity):
    manifests = by_kind(render(values_for(identity)))
    pod = manifests[("DaemonSet", "nodeagent")]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    security = container["securityContext"]
    assert pod["spec"]["hostPID"] is True and "hostNetwork" not in pod["spec"]
    assert security["privileged"] is False and security["capabilities"]["drop"] == ["ALL"]
    assert set(security["capabilities"]["add"]) <= {"BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE", "SYS_RESOURCE",
                                                    "PERFMON"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/live", "port": "metrics"}
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    # Only /metrics, /live and /ready face the cluster; /tap and /stats stay on the pod's loopback.
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "4190"
    assert container["ports"] == [{"name": "metrics", "containerPort": 4190, "protocol": "TCP"}]
    assert {"--admin=127.0.0.1:4191", "--metrics=0.0.0.0:4190"} <= set(container["args"])
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/sys/fs/bpf", "/sys/fs/cgroup", "/lib/modules", "/usr/src", "/var/run/nodeagent/identity"} <= mounts
    rules = manifests[("ClusterRole", "nodeagent")]["rules"]
    assert {v for r in rules for v in r["verbs"]} == {"get", "list", "watch"}  # read-only


def test_a_bad_label_is_refused():
    with pytest.raises(settings.SettingsError, match="--mesh-label: must be KEY=VALUE"):
        settings.parse({"mesh-label": "nodeagent.io/mesh"})


def test_an_unknown_fast_path_is_refused_with_the_choices(identity):
    done = subprocess.run([sys.executable, "-m", "nodeagent", "install", "--identity-dir", str(identity),
                           "--fast-path", "splice,warp"], capture_output=True, text=True)
    assert done.returncode == 2 and "'warp': a list of splice, skb, loopback" in done.stderr


def test_the_daemonset_starts_on_stock_nodes(identity):
    """What real clusters need (issue 16): Pod Security `privileged` on the namespace, a quota
    for system-node-critical (GKE), Linux nodes only, no AppArmor/seccomp default profile in
    the way of bpffs pins and bpf(), kernel headers optional, a startup probe while bcc
    compiles, and as many processes as the memory limit holds."""
    manifests = by_kind(render(values_for(identity)))
    labels = manifests[("Namespace", "nodeagent")]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    quota = manifests[("ResourceQuota", "nodeagent-critical-pods")]["spec"]
    assert quota["scopeSelector"]["matchExpressions"][0]["values"] == ["system-node-critical"]
    pod = manifests[("DaemonSet", "nodeagent")]["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    container = pod["containers"][0]
    security = container["securityContext"]
    assert security["appArmorProfile"] == {"type": "Unconfined"} and security["seccompProfile"]["type"] == "Unconfined"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["headers"]["hostPath"] == {"path": "/usr/src", "type": "DirectoryOrCreate"}
    # The last settings applied outlive the pod: a new agent on a bad ConfigMap starts from them.
    assert volumes["state"]["hostPath"] == {"path": "/var/lib/nodeagent", "type": "DirectoryOrCreate"}
    assert "--state-dir=/var/lib/nodeagent" in container["args"]
    assert {"name": "state", "mountPath": "/var/lib/nodeagent"} in container["volumeMounts"]
    assert container["startupProbe"]["httpGet"]["path"] == "/live"
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 300
    assert "initialDelaySeconds" not in container["livenessProbe"]  # the startup probe holds it
    env = {e["name"]: e.get("valueFrom", e.get("value")) for e in container["env"]}
    assert env[MEMORY_LIMIT_ENV] == {"resourceFieldRef": {"containerName": "agent", "resource": "limits.memory"}}
    # The agent knows its grace period, to warn of a drain-timeout raised live beyond it.
    assert env[live_settings.GRACE_ENV] == str(pod["terminationGracePeriodSeconds"]) == "630"


def test_automatic_processes_fit_the_memory_limit():
    limit = str(512 << 20)
    assert automatic_processes(4, limit) == 4
    assert automatic_processes(64, limit) == (512 << 20) // PROCESS_MEMORY_BYTES < 13  # 13 were OOM-killed
    assert automatic_processes(64, str(1 << 20)) == 1  # always one
    assert automatic_processes(8, None) == 8 and automatic_processes(8, "") == 8


def test_a_new_issuer_or_a_setting_that_needs_a_restart_rolls_the_agents_and_no_other(identity):
    def checksum(values):
        daemonset = by_kind(render(values))[("DaemonSet", "nodeagent")]
        return daemonset["spec"]["template"]["metadata"]["annotations"]["nodeagent.io/config-checksum"]

    base = checksum(values_for(identity))
    assert checksum(values_for(identity)) == base
    assert checksum(values_for(identity, agent={"log-level": "debug", "pod-limits": "handshakes=3",
                                                "access-log": "/var/log/access.log",
                                                "trace-collector": "http://127.0.0.1:4318"})) == base
    for flag in restart_keys():
        changed = {"workers": "3", "fast-path": "splice", "mesh-label": "a=b", "trust-domain": "example.org"}[flag]
        assert checksum(values_for(identity, agent={flag: changed})) != base, flag
    other = Authority.new_anchor("cluster.local")
    assert checksum(dataclasses.replace(values_for(identity), anchors_pem=other.certificate_pem().decode())) != base


def test_an_empty_issuer_is_refused_by_install_and_the_chart(identity):
    with pytest.raises(ValueError, match="empty issuer key"):
        render(dataclasses.replace(values_for(identity), issuer_key_pem=""))
    if Path(HELM).exists():
        done = subprocess.run([HELM, "template", "nodeagent", str(CHART),
                               "--set-file", f"identity.trustAnchorsPEM={identity / 'ca.crt'}",
                               "--set-file", f"identity.issuerCrtPEM={identity / 'issuer.crt'}"],
                              capture_output=True, text=True)
        assert done.returncode != 0 and "identity.issuerKeyPEM is empty" in done.stderr


@needs_helm
def test_the_chart_goes_into_the_release_namespace(identity):
    chart = helm_template(identity, namespace="mesh-system")
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", *NEWER_KINDS}
    namespaced = [d for d in chart if d["kind"] not in cluster_scoped]
    assert {d["metadata"]["namespace"] for d in namespaced} == {"mesh-system"}
    binding = by_kind(chart)[("ClusterRoleBinding", "nodeagent")]
    assert binding["subjects"][0]["namespace"] == "mesh-system"
    assert by_kind(chart)[("Namespace", "mesh-system")]
