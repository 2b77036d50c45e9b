"""The lab for real: namespaces, cgroups, processes and traffic between pods."""

import errno
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nodeagent import cgroups, netns
from nodeagent.lab import client, pods
from nodeagent.lab import lab as lab_ops
from nodeagent.lab.plan import FABRIC_NETNS, WORKLOAD_BY_KIND
from conftest import lab_fixture

pytestmark = pytest.mark.privileged
NODEAGENT = [sys.executable, "-m", "nodeagent"]


lab = lab_fixture()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*NODEAGENT, *args], capture_output=True, text=True, timeout=60)


def probe_from(lab, source: str, kind: str, target: str) -> dict:
    pod, dest = lab.plan.pod(source), lab.plan.pod(target)
    argv = [sys.executable, "-m", "nodeagent.lab.client", kind, dest.ip, str(WORKLOAD_BY_KIND[kind].port)]
    done = pods.run(pod, lab.pod_cgroup(pod), argv)
    return json.loads(done.stdout)


def test_status_lists_nodes_pods_and_services(lab):
    done = cli("lab", "status", "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert [(n["name"], n["admin"], n["pods"]) for n in status["nodes"]] == [
        ("node0", "127.0.0.1:4191", 5), ("node1", "127.0.0.1:4192", 5)]
    assert len(status["pods"]) == 10
    assert {p["labels"]["nodeagent.io/mesh"] for p in status["pods"]} == {"enabled"}
    http = next(s for s in status["services"] if s["name"] == "http")
    assert sorted(http["endpoints"]) == [lab.plan.pod("http-n0-0").ip, lab.plan.pod("http-n1-0").ip]
    table = cli("lab", "status")
    assert table.returncode == 0 and "http-n1-0" in table.stdout and "10.96.0.10" in table.stdout


def test_manifests_are_kubernetes_objects(lab):
    pod = lab.plan.pod("echo-n1-0")
    manifest = yaml.safe_load((lab.cluster_dir / "pods/default/echo-n1-0.yaml").read_text())
    assert manifest["kind"] == "Pod"
    assert manifest["metadata"]["uid"] == pod.uid
    assert manifest["spec"]["nodeName"] == "node1"
    assert manifest["status"]["podIP"] == pod.ip
    service = yaml.safe_load((lab.cluster_dir / "services/default/echo.yaml").read_text())
    assert service["spec"]["clusterIP"].startswith("10.96.")


def test_workloads_run_in_their_pods_namespace_and_kubelet_style_cgroup(lab):
    for pod in lab.plan.pods:
        cgroup_dir = lab.pod_cgroup(pod)
        assert f"/{pod.node}/kubepods/besteffort/pod{pod.uid}/" in str(cgroup_dir)
        (pid,) = cgroups.pids_in(cgroup_dir)
        net = Path(f"/proc/{pid}/ns/net").stat().st_ino
        assert net == Path(netns.named_path(pod.netns)).stat().st_ino


@pytest.mark.parametrize("kind", ["http", "h2c", "echo", "banner"])
@pytest.mark.parametrize("target_node", ["n0", "n1"])
def test_pods_reach_pods_on_the_same_and_the_other_node(lab, kind, target_node):
    result = probe_from(lab, "client-n0-0", kind, f"{kind}-{target_node}-0")
    assert result["ok"], result


def test_real_clients_curl_http1_and_h2c(lab):
    done = cli("lab", "exec", "client-n1-0", "--", "curl", "-sS", f"http://{lab.plan.pod('http-n0-0').ip}:8080/")
    assert done.stdout == "hello from http-n0-0\n", done.stderr
    done = cli("lab", "exec", "client-n1-0", "--", "curl", "-sS", "--http2-prior-knowledge",
               f"http://{lab.plan.pod('h2c-n1-0').ip}:8081/")
    assert done.stdout == "hello from h2c-n1-0\n", done.stderr


def test_exec_runs_in_the_pod_cgroup_and_passes_the_exit_status(lab):
    pod = lab.plan.pod("client-n0-0")
    done = cli("lab", "exec", "client-n0-0", "--", "cat", "/proc/self/cgroup")
    assert f"pod{pod.uid}/{pod.container_id}" in done.stdout
    assert cli("lab", "exec", "client-n0-0", "--", "sh", "-c", "exit 3").returncode == 3
    missing = cli("lab", "exec", "client-n0-0", "--", "no-such-command")
    assert missing.returncode == 1 and "cannot run 'no-such-command'" in missing.stderr
    unknown = cli("lab", "exec", "ghost", "--", "true")
    assert unknown.returncode == 1 and "no pod 'ghost'" in unknown.stderr


def test_label_changes_the_manifest(lab):
    done = cli("lab", "label", "http-n1-0", "nodeagent.io/mesh=disabled")
    assert done.returncode == 0, done.stderr
    status = json.loads(cli("lab", "status", "--json").stdout)
    labels = next(p["labels"] for p in status["pods"] if p["name"] == "http-n1-0")
    assert labels["nodeagent.io/mesh"] == "disabled"
    bad = cli("lab", "label", "http-n1-0", "no spaces=x")
    assert bad.returncode == 1 and "invalid label key" in bad.stderr
    assert cli("lab", "label", "http-n1-0", "nodeagent.io/mesh=enabled").returncode == 0


def _host_address() -> str:
    """An address of this host's own outward interface (on this machine)."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True,
                         text=True).stdout
    return out.split()[3].split("/")[0] if out else "127.0.0.1"


@pytest.mark.parametrize("outside", ["198.51.100.1", "host"])
def test_a_pod_cannot_reach_outside_the_lab(lab, outside):
    address = _host_address() if outside == "host" else outside
    pod = lab.plan.pod("client-n0-0")
    with netns.entered(netns.named_path(pod.netns)):
        with pytest.raises(OSError) as caught:
            socket.create_connection((address, 80), timeout=2)
    # No route at all: refused before a packet is built.
    assert caught.value.errno == errno.ENETUNREACH


def test_the_host_cannot_reach_into_the_lab_by_accident(lab):
    for address in (lab.plan.pod("http-n0-0").ip, lab.plan.services[0].cluster_ip):
        with pytest.raises(OSError) as caught:
            socket.create_connection((address, 80), timeout=2)
        assert caught.value.errno == errno.EHOSTUNREACH


def _links(ns: str) -> list[str]:
    out = subprocess.run(["ip", "-n", ns, "-o", "link", "show"], capture_output=True, text=True).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


def test_the_lab_network_has_no_uplink(lab):
    fabric = _links(FABRIC_NETNS)
    assert all(name == "lo" or name.startswith("nalab") for name in fabric), fabric
    pod = lab.plan.pod("echo-n0-0")
    assert sorted(_links(pod.netns)) == ["eth0", "lo"]
    routes = subprocess.run(["ip", "-n", pod.netns, "route", "show", "default"], capture_output=True,
                            text=True).stdout
    assert routes == ""


def test_a_second_lab_is_refused_while_one_is_up(lab):
    with pytest.raises(lab_ops.LabError, match="already here"):
        lab_ops.up(1, 1)


def test_client_probe_reports_failures_instead_of_raising(lab):
    pod = lab.plan.pod("client-n0-0")
    with netns.entered(netns.named_path(pod.netns)):
        result = client.run("http", lab.plan.pod("echo-n0-0").ip, 8080)
    assert not result["ok"] and "ConnectionRefused" in result["detail"]


def test_an_agent_that_never_gets_ready_is_an_error_carrying_its_logs_end(tmp_path, monkeypatch):
    """A failed `up` removes the lab and its logs: the error itself must say why the agent failed."""
    monkeypatch.setattr(lab_ops, "AGENT_READY_TIMEOUT_S", 0.3)
    log = tmp_path / "agent-node0.log"
    log.write_text("x" * 5000 + "\nCgroupError: no cgroup2 mount found\n")
    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(lab_ops.LabError) as raised:
        lab_ops.wait_ready(port, "the agent of node0", log)
    message = str(raised.value)
    assert "the agent of node0 is not ready" in message and "CgroupError: no cgroup2 mount found" in message
    assert len(message) < 3300  # the end of the log, not all of it
    with pytest.raises(lab_ops.LabError, match="no log"):
        lab_ops.wait_ready(port, "the sidecar of web-0", tmp_path / "missing.log")
