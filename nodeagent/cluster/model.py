"""A snapshot of what the agent knows of the cluster, built from Kubernetes
objects (API or the lab's manifests alike): pods, Services, endpoints, and
who is in the mesh. Pure: objects in, a read-only view out.

Opt-in: a pod is meshed if its label nodeagent.io/mesh is "enabled", or its
namespace's is and the pod's is not "disabled" (another KEY=VALUE can be
configured). Endpoints come from EndpointSlices when the source has them
(the API), else from Service selectors (the lab's manifests).
Malformed objects are skipped and reported in `errors`, never fatal.
"""

import ipaddress
from dataclasses import dataclass, field
from types import MappingProxyType

MESH_LABEL = "nodeagent.io/mesh=enabled"
OPT_OUT = "disabled"


@dataclass(frozen=True)
class PodInfo:
    namespace: str
    name: str
    uid: str
    node: str
    ip: str
    service_account: str
    labels: dict = field(hash=False, compare=True)
    named_ports: dict = field(hash=False, compare=True)  # container port name -> number
    annotations: dict = field(default_factory=dict, hash=False, compare=True)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ServicePort:
    name: str
    port: int
    target_port: int | str  # a number, or a container port's name


@dataclass(frozen=True)
class ServiceInfo:
    namespace: str
    name: str
    cluster_ip: str
    ports: tuple[ServicePort, ...]
    selector: dict = field(hash=False, compare=True)
    annotations: dict = field(hash=False, compare=True)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Endpoint:
    ip: str
    port: int
    pod: PodInfo | None  # None: an address outside the cluster's pods (selector-less Service)


def _pod(obj: dict) -> PodInfo | None:
    meta, spec, status = obj.get("metadata", {}), obj.get("spec", {}), obj.get("status", {})
    ip = status.get("podIP")
    if not ip or status.get("phase", "Running") not in ("Running", "Pending"):
        return None
    ipaddress.IPv4Address(ip)
    named = {}
    for container in spec.get("containers", []):
        for port in container.get("ports", []) or []:
            if port.get("name"):
                named[port["name"]] = int(port["containerPort"])
    return PodInfo(meta["namespace"], meta["name"], meta.get("uid", ""), spec.get("nodeName", ""), ip,
                   spec.get("serviceAccountName", "default"), dict(meta.get("labels") or {}), named,
                   dict(meta.get("annotations") or {}))


def _service(obj: dict) -> ServiceInfo | None:
    meta, spec = obj.get("metadata", {}), obj.get("spec", {})
    cluster_ip = spec.get("clusterIP")
    if not cluster_ip or cluster_ip == "None":
        return None  # headless: clients reach pod IPs directly
    ipaddress.IPv4Address(cluster_ip)
    ports = tuple(ServicePort(p.get("name", ""), int(p["port"]), p.get("targetPort", p["port"]))
                  for p in spec.get("ports", []) if p.get("protocol", "TCP") == "TCP")
    return ServiceInfo(meta["namespace"], meta["name"], cluster_ip, ports, dict(spec.get("selector") or {}),
                       dict(meta.get("annotations") or {}))


class ClusterView:
    def __init__(self, pods: list[dict] = (), services: list[dict] = (), namespaces: list[dict] = (),
                 endpoint_slices: list[dict] | None = None, mesh_label: str = MESH_LABEL):
        # Kept to rebuild the view elsewhere (a worker process gets it pickled).
        self._objects = (list(pods), list(services), list(namespaces),
                         None if endpoint_slices is None else list(endpoint_slices), mesh_label)
        self.errors: list[str] = []
        self.mesh_key, _, self.mesh_value = mesh_label.partition("=")
        self._slices = _slices_by_service(endpoint_slices, self.errors) if endpoint_slices is not None else None
        self.pods: dict[str, PodInfo] = {}
        self.services: dict[str, ServiceInfo] = {}
        self.namespace_labels: dict[str, dict] = {}
        for obj in namespaces:
            try:
                self.namespace_labels[obj["metadata"]["name"]] = dict(obj["metadata"].get("labels") or {})
            except (KeyError, TypeError, AttributeError) as e:
                self.errors.append(f"namespace skipped: {e!r}")
        for build, objects, into in ((_pod, pods, self.pods), (_service, services, self.services)):
            for obj in objects:
                try:
                    item = build(obj)
                except (KeyError, TypeError, ValueError, AttributeError) as e:
                    self.errors.append(f"{obj.get('kind', 'object') if isinstance(obj, dict) else 'object'} "
                                       f"skipped: {e!r}")
                    continue
                if item is not None:
                    into[item.key] = item
        self._endpoints: dict[tuple[str, int], tuple[Endpoint, ...]] = {}
        self.pod_by_ip = MappingProxyType({p.ip: p for p in self.pods.values()})
        self.service_by_address = MappingProxyType(
            {(s.cluster_ip, p.port): (s, p) for s in self.services.values() for p in s.ports})

    def __reduce__(self):
        return ClusterView, self._objects

    def meshed(self, pod: PodInfo) -> bool:
        own = pod.labels.get(self.mesh_key)
        if own in (self.mesh_value, OPT_OUT):
            return own == self.mesh_value
        return self.namespace_labels.get(pod.namespace, {}).get(self.mesh_key) == self.mesh_value

    def pods_on(self, node: str) -> list[PodInfo]:
        return sorted((p for p in self.pods.values() if p.node == node), key=lambda p: p.key)

    def endpoints(self, service: ServiceInfo, port: ServicePort) -> tuple[Endpoint, ...]:
        """The Service port's endpoints (computed once per view: views never change)."""
        key = (service.key, port.port)
        if key not in self._endpoints:
            self._endpoints[key] = self._select(service, port)
        return self._endpoints[key]

    def _select(self, service: ServiceInfo, port: ServicePort) -> tuple[Endpoint, ...]:
        if self._slices is not None:
            return self._from_slices(service, port)
        if not service.selector:
            return ()
        found = []
        for pod in self.pods.values():
            if pod.namespace != service.namespace:
                continue
            if any(pod.labels.get(k) != v for k, v in service.selector.items()):
                continue
            target = port.target_port
            if isinstance(target, str) and not target.isdigit():
                if target not in pod.named_ports:
                    continue
                target = pod.named_ports[target]
            found.append(Endpoint(pod.ip, int(target), pod))
        return tuple(sorted(found, key=lambda e: (e.ip, e.port)))

    def _from_slices(self, service: ServiceInfo, port: ServicePort) -> tuple[Endpoint, ...]:
        found = set()
        for slice_ in self._slices.get(service.key, ()):
            numbers = [p.get("port") for p in slice_.get("ports") or [] if (p.get("name") or "") == port.name
                       and p.get("protocol", "TCP") == "TCP" and p.get("port")]
            if not numbers:
                continue
            for endpoint in slice_.get("endpoints") or []:
                if (endpoint.get("conditions") or {}).get("ready") is False:
                    continue
                for ip in endpoint.get("addresses") or []:
                    found.add(Endpoint(ip, int(numbers[0]), self.pod_by_ip.get(ip)))
        return tuple(sorted(found, key=lambda e: (e.ip, e.port)))


def _slices_by_service(slices: list[dict], errors: list[str]) -> dict[str, list[dict]]:
    """IPv4 EndpointSlices by the Service (namespace/name) they belong to."""
    by_service: dict[str, list[dict]] = {}
    for slice_ in slices:
        try:
            meta = slice_["metadata"]
            service = meta["labels"]["kubernetes.io/service-name"]
        except (KeyError, TypeError):
            errors.append(f"EndpointSlice skipped: no service-name label: {slice_.get('metadata', {}).get('name')}")
            continue
        if slice_.get("addressType", "IPv4") == "IPv4":
            by_service.setdefault(f"{meta['namespace']}/{service}", []).append(slice_)
    return by_service
