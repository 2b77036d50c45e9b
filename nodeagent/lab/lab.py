"""Bring a lab up, show it, change it, take it down.

State lives in STATE_DIR (tmpfs, like the namespaces it describes):
`lab.json` (the plan), `cluster/` (the manifests: the lab's "cluster"),
`config/` (the agents' settings ConfigMap, as mounted: lab/config.py),
`logs/` (each pod's workload output). Cleanup never depends on that state:
`down` also finds the leftovers of a crashed run by the project prefix.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from nodeagent import PREFIX, cgroups, netns
from nodeagent.datapath import cleanup as datapath_cleanup
from nodeagent.identity import ca, naming
from nodeagent.lab import config, lock, manifests, pods
from nodeagent.lab.plan import (WORKLOAD_BY_KIND, LabPlan, NodePlan, PodPlan, plan_from_dict, plan_lab,
                                plan_to_dict)

STATE_DIR = Path(os.environ.get("NODEAGENT_LAB_DIR", "/run/nodeagent-lab"))
# The lab's agents pin their data paths apart from a real node's (/sys/fs/bpf/nodeagent).
BPF_PIN_ROOT = Path("/sys/fs/bpf") / PREFIX
READY_TIMEOUT_S = 15.0
AGENT_READY_TIMEOUT_S = 60.0
MESH_MODES = ("none", "node", "sidecar")
SIDECAR_ADMIN_BASE = 5000  # sidecar k (k-th pod of the plan) serves its admin on 5000+k
# Extra `nodeagent run` arguments for the lab's agents (tests use it for short certificate lifetimes).
AGENT_EXTRA_ARGS = os.environ.get("NODEAGENT_LAB_AGENT_ARGS", "").split()


class LabError(RuntimeError):
    pass


@dataclass(frozen=True)
class Lab:
    plan: LabPlan
    cgroup_root: Path  # the lab's subtree of the cgroup v2 hierarchy
    mesh: str

    @property
    def cluster_dir(self) -> Path:
        return STATE_DIR / "cluster"

    def pod_cgroup(self, pod: PodPlan) -> Path:
        return self.cgroup_root / pod.cgroup


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root: it creates network namespaces and cgroups")


def _lab_cgroup_root() -> Path:
    try:
        return cgroups.cgroup2_root() / PREFIX
    except cgroups.CgroupError as e:
        raise LabError(str(e)) from e


def _state_file() -> Path:
    return STATE_DIR / "lab.json"


def load() -> Lab:
    try:
        data = json.loads(_state_file().read_text())
    except FileNotFoundError:
        raise LabError("no lab is up (start one with `nodeagent lab up`)") from None
    return Lab(plan_from_dict(data["plan"]), Path(data["cgroup_root"]), data["mesh"])


def leftovers() -> list[str]:
    """Everything of a lab on this host, whether or not its state file survived."""
    from nodeagent.lab import network  # pyroute2, 0.2 s: not on an agent's start (`nodeagent run`)
    found = [f"netns {name}" for name in network.lab_namespaces()]
    found += [f"route unreachable {dst}" for dst in network.guard_routes()]
    try:
        root = _lab_cgroup_root()
        if root.exists():
            found.append(f"cgroup {root}")
    except LabError:
        pass
    if STATE_DIR.exists():
        found.append(f"state {STATE_DIR}")
    if BPF_PIN_ROOT.exists():
        found.append(f"bpf pins {BPF_PIN_ROOT}")
    return found


def up(nodes: int, pods_per_node: int, enroll: bool = True, mesh: str = "none") -> Lab:
    _require_root()
    lock.hold()
    if mesh not in MESH_MODES:
        raise LabError(f"--mesh {mesh}: choose one of {', '.join(MESH_MODES)}")
    if left := leftovers():
        raise LabError("a lab (or what a crashed one left) is already here: " + ", ".join(left)
                       + "; run `nodeagent lab down` first")
    try:
        plan = plan_lab(nodes, pods_per_node, enroll)
    except ValueError as e:
        raise LabError(str(e)) from e
    from nodeagent.lab import network

    try:
        network.check_host_ranges_free()
    except network.NetworkError as e:
        raise LabError(str(e)) from e
    lab = Lab(plan, _lab_cgroup_root(), mesh)
    try:
        _build(lab)
    except BaseException:
        # Also on Ctrl-C: never leave half a lab behind.
        down()
        raise
    return lab


def _build(lab: Lab) -> None:
    from nodeagent.lab import network

    (STATE_DIR / "logs").mkdir(parents=True)
    _state_file().write_text(json.dumps({
        "plan": plan_to_dict(lab.plan), "cgroup_root": str(lab.cgroup_root), "mesh": lab.mesh,
        "created": time.time(),
    }, indent=1))
    network.add_guard_routes()
    network.create_fabric()
    for node in lab.plan.nodes:
        node_pods = [p for p in lab.plan.pods if p.node == node.name]
        for j, pod in enumerate(node_pods):
            network.add_pod(pod, node.index, j)
            cgroup = lab.pod_cgroup(pod)
            cgroup.mkdir(parents=True)
            pods.start(pod, cgroup, pods.workload_argv(pod), STATE_DIR / "logs" / f"{pod.name}.log")
    manifests.write_cluster(lab.cluster_dir, lab.plan)
    _wait_ready(lab)
    if lab.mesh != "none":
        anchor = ca.Authority.new_anchor(naming.DEFAULT_TRUST_DOMAIN)
        ca.write_identity_files(identity_dir(), anchor, anchor.new_issuer(naming.DEFAULT_TRUST_DOMAIN))
    if lab.mesh == "node":
        for node in lab.plan.nodes:
            start_agent(lab, node)
        for node in lab.plan.nodes:
            wait_agent_ready(node)
    elif lab.mesh == "sidecar":
        for pod in meshed_pods(lab):
            start_sidecar(lab, pod)
        for pod in meshed_pods(lab):
            wait_ready(sidecar_admin_port(lab, pod), f"the sidecar of {pod.name}", agent_log(f"sidecar-{pod.name}"))


def meshed_pods(lab: Lab) -> list[PodPlan]:
    return [p for p in lab.plan.pods if p.labels.get("nodeagent.io/mesh") == "enabled"]


def sidecar_admin_port(lab: Lab, pod: PodPlan) -> int:
    return SIDECAR_ADMIN_BASE + lab.plan.pods.index(pod)


def start_sidecar(lab: Lab, pod: PodPlan) -> subprocess.Popen:
    """Sidecar mode: the same agent, one per pod, attached to that pod's cgroup only."""
    lock.hold()
    node = next(n for n in lab.plan.nodes if n.name == pod.node)
    pod_cgroup = lab.pod_cgroup(pod).parent
    return _start_agent_process(lab, f"sidecar-{pod.name}", [
        "--node-name", node.name, "--cgroup", str(pod_cgroup), "--sidecar-pod", f"{pod.namespace}/{pod.name}",
        "--admin", f"127.0.0.1:{sidecar_admin_port(lab, pod)}"])


def identity_dir() -> Path:
    """The lab's trust anchor and issuer, as `identity init` makes them (agents read them as a mounted Secret)."""
    return STATE_DIR / "identity"


def config_dir() -> Path:
    """The agents' cluster settings, as the kubelet mounts the ConfigMap (`lab config` changes them)."""
    return STATE_DIR / "config"


def configure(changes: list[str], check: bool = True) -> dict[str, str]:
    """Change the agents' cluster settings (KEY=VALUE, KEY-); they take them live. The new content."""
    load()
    try:
        return config.change(config_dir(), changes, check)
    except ValueError as e:
        raise LabError(str(e)) from e


def agent_cgroup(lab: Lab, name: str) -> Path:
    """Agents and sidecars live beside the nodes' pod subtrees, never inside them."""
    return lab.cgroup_root / "agents" / name


def start_agent(lab: Lab, node: NodePlan) -> subprocess.Popen:
    return _start_agent_process(lab, node.name, [
        "--node-name", node.name, "--cgroup", str(lab.cgroup_root / node.name),
        "--admin", f"127.0.0.1:{node.admin_port}"])


def _start_agent_process(lab: Lab, name: str, args: list[str]) -> subprocess.Popen:
    """`nodeagent run` in the background, in a cgroup beside the nodes' pod subtrees."""
    cgroup = agent_cgroup(lab, name)
    cgroup.mkdir(parents=True, exist_ok=True)
    if not config_dir().exists():
        config.write(config_dir(), {})  # no setting changed yet: the command line's
    argv = [sys.executable, "-m", "nodeagent", "run", "--cluster-dir", str(lab.cluster_dir), "--pin-root",
            str(BPF_PIN_ROOT), "--identity-dir", str(identity_dir()), "--config-dir", str(config_dir()), *args,
            *AGENT_EXTRA_ARGS]
    with open(agent_log(name), "ab") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=lambda: cgroups.join(cgroup))


def ready(admin_port: int, timeout_s: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


def agent_ready(node: NodePlan) -> bool:
    return ready(node.admin_port)


def agent_log(name: str) -> Path:
    """The log of the agent process `name` (a node's name, or sidecar-<pod>)."""
    return STATE_DIR / "logs" / f"agent-{name}.log"


def wait_ready(admin_port: int, what: str, log: Path) -> None:
    deadline = time.monotonic() + AGENT_READY_TIMEOUT_S
    while not ready(admin_port):
        if time.monotonic() > deadline:
            # The error carries the log's end: a failed `up` removes the lab, logs included.
            try:
                tail = log.read_text(errors="replace")[-3000:]
            except OSError as e:
                tail = f"(no log: {e})"
            raise LabError(f"{what} is not ready after {AGENT_READY_TIMEOUT_S:.0f} s; the end of {log}:\n{tail}")
        time.sleep(0.1)


def wait_agent_ready(node: NodePlan) -> None:
    wait_ready(node.admin_port, f"the agent of {node.name}", agent_log(node.name))


def _wait_ready(lab: Lab) -> None:
    """Every server listens before `up` returns (connect from inside each pod)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    for pod in lab.plan.pods:
        port = WORKLOAD_BY_KIND[pod.workload].port
        if not port:
            continue
        with netns.entered(netns.named_path(pod.netns)):
            while True:
                try:
                    socket.create_connection((pod.ip, port), timeout=1).close()
                    break
                except OSError as e:
                    if time.monotonic() > deadline:
                        log = (STATE_DIR / "logs" / f"{pod.name}.log").read_text()[-2000:]
                        raise LabError(f"pod {pod.name} is not listening on {port}: {e}\n{log}") from e
                    time.sleep(0.05)


def down() -> list[str]:
    """Remove everything any lab made; idempotent, and needs no state file."""
    _require_root()
    lock.hold()
    removed = leftovers()
    try:
        root = _lab_cgroup_root()
    except LabError:
        root = None  # no cgroup v2 here: no lab cgroups either
    if root is not None:
        # Processes first: they hold namespaces and cgroups.
        cgroups.remove_tree(root)
    datapath_cleanup.remove_all(BPF_PIN_ROOT)
    from nodeagent.lab import network

    network.remove_all()
    network.remove_guard_routes()
    shutil.rmtree(STATE_DIR, ignore_errors=True)
    return removed


def label(pod_name: str, change: str) -> dict:
    lab = load()
    key, value = manifests.parse_label_change(change)
    pod = _find_pod(lab, pod_name)
    return manifests.relabel_pod(lab.cluster_dir, pod.namespace, pod.name, key, value)


def _find_pod(lab: Lab, name: str) -> PodPlan:
    try:
        return lab.plan.pod(name)
    except KeyError:
        known = ", ".join(p.name for p in lab.plan.pods)
        raise LabError(f"no pod {name!r} in the lab; pods: {known}") from None


def exec_in_pod(pod_name: str, argv: list[str]) -> None:
    _require_root()
    lab = load()
    pod = _find_pod(lab, pod_name)
    try:
        pods.exec_in(pod, lab.pod_cgroup(pod), argv)
    except OSError as e:
        raise LabError(f"cannot run {argv[0]!r} in pod {pod_name}: {e.strerror}") from e


def status(lab: Lab) -> dict:
    """What `lab status` shows; labels come from the manifests, which `lab label` changes."""
    pod_objects = manifests.read_manifests(lab.cluster_dir, "pods")
    pod_rows = [
        {
            "name": m["metadata"]["name"],
            "namespace": m["metadata"]["namespace"],
            "node": m["spec"]["nodeName"],
            "ip": m["status"]["podIP"],
            "labels": m["metadata"].get("labels", {}),
            "netns": lab.plan.pod(m["metadata"]["name"]).netns,
        }
        for m in pod_objects
    ]
    services = []
    for m in manifests.read_manifests(lab.cluster_dir, "services"):
        selector = m["spec"]["selector"]
        endpoints = [
            p["ip"] for p in pod_rows
            if p["namespace"] == m["metadata"]["namespace"]
            and all(p["labels"].get(k) == v for k, v in selector.items())
        ]
        port = m["spec"]["ports"][0]
        services.append({
            "name": m["metadata"]["name"],
            "namespace": m["metadata"]["namespace"],
            "cluster_ip": m["spec"]["clusterIP"],
            "port": port["port"],
            "target_port": port["targetPort"],
            "selector": selector,
            "endpoints": endpoints,
        })
    nodes = [
        {"name": n.name, "pods": sum(p["node"] == n.name for p in pod_rows), "pod_cidr": n.pod_cidr,
         "admin": f"127.0.0.1:{n.admin_port}",
         "agent": {"none": "none", "node": "ready" if agent_ready(n) else "not ready"}.get(
             lab.mesh, f"sidecars: {sum(ready(sidecar_admin_port(lab, p)) for p in meshed_pods(lab) if p.node == n.name)}"
                       f" ready")}
        for n in lab.plan.nodes
    ]
    return {"mesh": lab.mesh, "cluster_dir": str(lab.cluster_dir), "nodes": nodes, "pods": pod_rows,
            "services": services}
