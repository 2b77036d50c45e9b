"""What a lab consists of, computed from its size alone: no I/O here.

Names, addresses and Kubernetes identities of nodes, pods and Services are
decided once by `plan_lab`; the network, cgroup and manifest code only carries
the plan out, and `lab status` shows it.
"""

import hashlib
import ipaddress
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from nodeagent import PREFIX

POD_CIDR = ipaddress.IPv4Network("10.244.0.0/16")
SERVICE_CIDR = ipaddress.IPv4Network("10.96.0.0/16")
FABRIC_NETNS = f"{PREFIX}-fabric"
BRIDGE = f"{PREFIX}-br0"
ADMIN_PORT_BASE = 4191
NAMESPACE = "default"
MESH_LABEL = "nodeagent.io/mesh"
# Pod addresses on node i are 10.244.i.FIRST_HOST and up.
FIRST_HOST = 10
MAX_NODES = 50
MAX_PODS_PER_NODE = 254 - FIRST_HOST


@dataclass(frozen=True)
class Workload:
    """A sample server run in a pod, and the Service in front of its pods."""

    kind: str
    port: int  # the container port; 0 for a pod that only runs clients
    service_port: int
    protocol: str  # what a mesh sees on the wire


WORKLOADS = (
    Workload("http", 8080, 80, "http/1.1"),
    Workload("h2c", 8081, 80, "h2c"),
    Workload("echo", 9000, 9000, "opaque tcp"),
    Workload("banner", 2525, 2525, "server-speaks-first"),
    Workload("client", 0, 0, "none"),
)
WORKLOAD_BY_KIND = {w.kind: w for w in WORKLOADS}


@dataclass(frozen=True)
class NodePlan:
    name: str
    index: int
    admin_port: int
    pod_cidr: str


@dataclass(frozen=True)
class PodPlan:
    name: str
    namespace: str
    node: str
    ip: str
    uid: str
    workload: str
    service_account: str
    labels: dict = field(hash=False)

    @property
    def netns(self) -> str:
        return f"{PREFIX}-{self.node}-{self.name}"

    @property
    def container_id(self) -> str:
        # Stable per pod, shaped like a containerd id (64 hex digits).
        return hashlib.sha256(f"{self.uid}/{self.workload}".encode()).hexdigest()

    @property
    def cgroup(self) -> str:
        """Relative to the lab's cgroup root: node / kubelet cgroupfs layout."""
        return f"{self.node}/kubepods/besteffort/pod{self.uid}/{self.container_id}"


@dataclass(frozen=True)
class ServicePlan:
    name: str
    namespace: str
    cluster_ip: str
    port: int
    target_port: int
    selector: dict = field(hash=False)


@dataclass(frozen=True)
class LabPlan:
    nodes: tuple[NodePlan, ...]
    pods: tuple[PodPlan, ...]
    services: tuple[ServicePlan, ...]

    def pod(self, name: str) -> PodPlan:
        for pod in self.pods:
            if pod.name == name:
                return pod
        raise KeyError(name)


def node_name(index: int) -> str:
    return f"node{index}"


def veth_name(node_index: int, pod_index: int) -> str:
    """The fabric side of a pod's link; interface names have 15 bytes at most."""
    return f"{PREFIX}{node_index}-{pod_index}"


def plan_lab(
    nodes: int,
    pods_per_node: int,
    enroll: bool = True,
    new_uid: Callable[[], str] = lambda: str(uuid.uuid4()),
) -> LabPlan:
    """Nodes `node0..`, each with pods cycling through WORKLOADS.

    Pod j of node i runs WORKLOADS[j % len(WORKLOADS)] and is named
    `<kind>-n<i>-<j // len(WORKLOADS)>`, so every node gets one of each kind
    before a second of any.
    """
    if not 1 <= nodes <= MAX_NODES:
        raise ValueError(f"nodes must be between 1 and {MAX_NODES}, not {nodes}")
    if not 1 <= pods_per_node <= MAX_PODS_PER_NODE:
        raise ValueError(f"pods per node must be between 1 and {MAX_PODS_PER_NODE}, not {pods_per_node}")
    node_plans, pod_plans = [], []
    mesh_value = "enabled" if enroll else "disabled"
    for i in range(nodes):
        name = node_name(i)
        node_plans.append(NodePlan(name, i, ADMIN_PORT_BASE + i, f"{POD_CIDR.network_address + (i << 8)}/24"))
        for j in range(pods_per_node):
            workload = WORKLOADS[j % len(WORKLOADS)]
            pod_plans.append(
                PodPlan(
                    name=f"{workload.kind}-n{i}-{j // len(WORKLOADS)}",
                    namespace=NAMESPACE,
                    node=name,
                    ip=str(POD_CIDR.network_address + (i << 8) + FIRST_HOST + j),
                    uid=new_uid(),
                    workload=workload.kind,
                    service_account=workload.kind,
                    labels={"app": workload.kind, MESH_LABEL: mesh_value},
                )
            )
    services = []
    kinds_present = {pod.workload for pod in pod_plans}
    serving = [w for w in WORKLOADS if w.port and w.kind in kinds_present]
    for k, workload in enumerate(serving):
        services.append(
            ServicePlan(
                name=workload.kind,
                namespace=NAMESPACE,
                cluster_ip=str(SERVICE_CIDR.network_address + FIRST_HOST + k),
                port=workload.service_port,
                target_port=workload.port,
                selector={"app": workload.kind},
            )
        )
    return LabPlan(tuple(node_plans), tuple(pod_plans), tuple(services))


def plan_to_dict(plan: LabPlan) -> dict:
    return asdict(plan)


def plan_from_dict(data: dict) -> LabPlan:
    return LabPlan(
        nodes=tuple(NodePlan(**n) for n in data["nodes"]),
        pods=tuple(PodPlan(**p) for p in data["pods"]),
        services=tuple(ServicePlan(**s) for s in data["services"]),
    )
