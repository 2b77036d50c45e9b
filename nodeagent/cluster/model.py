"""What the agent knows of the cluster, built from Kubernetes objects (API or the lab's
manifests alike): pods, Services, endpoints, and who is in the mesh. Pure: objects in,
read-only views out.

Objects are parsed once, when they arrive, into small records (PodInfo, ServiceInfo,
SliceInfo, a namespace's labels). A `Delta` names the records that changed since the last
view; `ClusterView.apply(delta)` makes the next view from the previous one, touching only
what changed (the dicts are copied, the records shared), and keeps the cached endpoints of
every Service the delta does not touch. The same delta goes to the worker processes, which
apply it to their own copy (agent/workers.py), so no event re-sends the whole cluster.

Opt-in: a pod is meshed if its label nodeagent.io/mesh is "enabled", or its namespace's is
and the pod's is not "disabled" (another KEY=VALUE can be configured). Endpoints come from
EndpointSlices when the source has them (the API), else from Service selectors (the lab's
manifests). Malformed objects are skipped and reported in `errors`, never fatal.

Dual stack: pods and Services keep every address they have. The proxy serves IPv4 only, so
a pod or Service with no IPv4 address, IPv6 Service addresses and IPv6 EndpointSlices are
kept out of routing and listed in `unserved` with the reason.
"""

import ipaddress
from dataclasses import dataclass, field
from types import MappingProxyType

MESH_LABEL = "nodeagent.io/mesh=enabled"
OPT_OUT = "disabled"
MAX_ERRORS = 50  # per delta: a flood of malformed objects is summed up, not stored


@dataclass(frozen=True)
class PodInfo:
    namespace: str
    name: str
    uid: str
    node: str
    ip: str  # the pod's IPv4 address ("" if it has none: not served)
    service_account: str
    labels: dict = field(hash=False, compare=True)
    named_ports: dict = field(hash=False, compare=True)  # container port name -> number
    annotations: dict = field(default_factory=dict, hash=False, compare=True)
    ips: tuple[str, ...] = ()  # every address of the pod (status.podIPs), IPv4 and IPv6
    host_network: bool = False  # spec.hostNetwork: its namespace is the node's, never enrolled

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
    cluster_ip: str  # the IPv4 cluster IP ("" if the Service has none: not served)
    ports: tuple[ServicePort, ...]
    selector: dict = field(hash=False, compare=True)
    annotations: dict = field(hash=False, compare=True)
    cluster_ips: tuple[str, ...] = ()  # every cluster IP (spec.clusterIPs)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class SliceInfo:
    """An EndpointSlice, reduced to what routing reads."""

    service: str  # namespace/name of its Service
    address_type: str
    ports: tuple[tuple[str, int], ...]  # (name, port) of its TCP ports
    endpoints: tuple[tuple[tuple[str, ...], bool], ...]  # (addresses, ready)


@dataclass(frozen=True)
class Endpoint:
    ip: str
    port: int
    pod: PodInfo | None  # None: an address outside the cluster's pods (selector-less Service)


def _ipv4(addresses) -> str:
    return next((a for a in addresses if ipaddress.ip_address(a).version == 4), "")


def pod_info(obj: dict) -> PodInfo | None:
    """None: a pod with nothing to serve (not running, or no address yet)."""
    meta, spec, status = obj.get("metadata", {}), obj.get("spec", {}), obj.get("status", {})
    ips = tuple(entry["ip"] for entry in status.get("podIPs") or [] if entry.get("ip"))
    if not ips and status.get("podIP"):
        ips = (status["podIP"],)
    if not ips or status.get("phase", "Running") not in ("Running", "Pending"):
        return None
    ip = _ipv4(ips)  # also rejects what is not an address at all
    host_network = spec.get("hostNetwork", False)
    if not isinstance(host_network, bool):
        raise ValueError(f"spec.hostNetwork is {host_network!r}, not a boolean")
    named = {}
    for container in spec.get("containers", []):
        for port in container.get("ports", []) or []:
            if port.get("name"):
                named[port["name"]] = int(port["containerPort"])
    return PodInfo(meta["namespace"], meta["name"], meta.get("uid", ""), spec.get("nodeName", ""), ip,
                   spec.get("serviceAccountName", "default"), dict(meta.get("labels") or {}), named,
                   dict(meta.get("annotations") or {}), ips, host_network)


def service_info(obj: dict) -> ServiceInfo | None:
    meta, spec = obj.get("metadata", {}), obj.get("spec", {})
    ips = tuple(spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else []))
    if not ips or ips[0] == "None":
        return None  # headless: clients reach pod IPs directly
    ports = tuple(ServicePort(p.get("name", ""), int(p["port"]), p.get("targetPort", p["port"]))
                  for p in spec.get("ports", []) if p.get("protocol", "TCP") == "TCP")
    return ServiceInfo(meta["namespace"], meta["name"], _ipv4(ips), ports, dict(spec.get("selector") or {}),
                       dict(meta.get("annotations") or {}), ips)


@dataclass(frozen=True)
class NamespaceInfo:
    labels: dict
    annotations: dict  # operators' (a Namespace is cluster-scoped): may raise its pods' limits


def namespace_info(obj: dict) -> NamespaceInfo:
    meta = obj["metadata"]
    return NamespaceInfo(dict(meta.get("labels") or {}), dict(meta.get("annotations") or {}))


def slice_info(obj: dict) -> SliceInfo:
    meta = obj["metadata"]
    try:
        service = meta["labels"]["kubernetes.io/service-name"]
    except (KeyError, TypeError):
        raise ValueError(f"EndpointSlice {meta.get('name')}: no kubernetes.io/service-name label") from None
    ports = tuple((p.get("name") or "", int(p["port"])) for p in obj.get("ports") or []
                  if p.get("protocol", "TCP") == "TCP" and p.get("port"))
    endpoints = tuple((tuple(e.get("addresses") or ()), (e.get("conditions") or {}).get("ready") is not False)
                      for e in obj.get("endpoints") or [])
    return SliceInfo(f"{meta['namespace']}/{service}", obj.get("addressType", "IPv4"), ports, endpoints)


def object_key(obj: dict) -> str:
    meta = obj["metadata"]
    return f"{meta.get('namespace', '')}/{meta['name']}" if meta.get("namespace") else meta["name"]


PARSERS = {"pods": pod_info, "services": service_info, "namespaces": namespace_info,
           "endpointslices": slice_info}


@dataclass
class Delta:
    """Records that changed, by kind and key; None: gone (deleted, or nothing to serve)."""

    pods: dict = field(default_factory=dict)
    services: dict = field(default_factory=dict)
    namespaces: dict = field(default_factory=dict)
    endpointslices: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    skipped_errors: int = 0

    def __bool__(self) -> bool:
        return bool(self.pods or self.services or self.namespaces or self.endpointslices or self.errors)

    def error(self, message: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(message)
        else:
            self.skipped_errors += 1

    def parse(self, kind: str, key: str, obj: dict | None) -> None:
        """Record `obj` (None: deleted) under `key`; a malformed object is reported and dropped."""
        record = None
        if obj is not None:
            try:
                record = PARSERS[kind](obj)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                self.error(f"{kind[:-1]} {key} skipped: {e!r}")
        getattr(self, kind)[key] = record

    def add(self, kind: str, objects) -> "Delta":
        """Parse `objects` of `kind` into this delta; one without a usable name is skipped, said."""
        for obj in objects:
            try:
                key = object_key(obj)
            except (KeyError, TypeError, AttributeError) as e:
                self.error(f"{kind[:-1]} skipped: {e!r}")
                continue
            self.parse(kind, key, obj)
        return self

    @classmethod
    def of_objects(cls, pods=(), services=(), namespaces=(), endpoint_slices=()) -> "Delta":
        delta = cls()
        for kind, objects in (("pods", pods), ("services", services), ("namespaces", namespaces),
                              ("endpointslices", endpoint_slices)):
            delta.add(kind, objects)
        return delta


class ClusterView:
    """One version of the cluster; never changes once made (`apply` makes the next one)."""

    def __init__(self, pods: list[dict] = (), services: list[dict] = (), namespaces: list[dict] = (),
                 endpoint_slices: list[dict] | None = None, mesh_label: str = MESH_LABEL):
        self.mesh_label = mesh_label
        self.mesh_key, _, self.mesh_value = mesh_label.partition("=")
        self.uses_slices = endpoint_slices is not None
        self.pods: dict[str, PodInfo] = {}
        self.services: dict[str, ServiceInfo] = {}
        self.namespace_labels: dict[str, dict] = {}
        self.namespace_annotations: dict[str, dict] = {}
        self.slices: dict[str, SliceInfo] = {}
        self._slices_of: dict[str, frozenset] = {}  # service key -> keys of its IPv4 slices
        self._by_ip: dict[str, PodInfo] = {}
        self._by_address: dict[tuple[str, int], tuple[ServiceInfo, ServicePort]] = {}
        self.unserved: dict[str, str] = {}  # "kind key" -> why the proxy does not serve it
        self._endpoints: dict[tuple[str, int], tuple[Endpoint, ...]] = {}
        self.errors: list[str] = []
        self.version = 0
        self.delta: Delta | None = None  # what made this view from the one before (None: built whole)
        delta = Delta.of_objects(pods, services, namespaces, endpoint_slices or ())
        self._absorb(delta)
        self.errors = self._error_lines(delta)

    @property
    def pod_by_ip(self):
        return MappingProxyType(self._by_ip)

    @property
    def service_by_address(self):
        return MappingProxyType(self._by_address)

    @staticmethod
    def _error_lines(delta: Delta) -> list[str]:
        return delta.errors + ([f"and {delta.skipped_errors} more objects skipped"] if delta.skipped_errors else [])

    def apply(self, delta: Delta) -> "ClusterView":
        """The next view: this one with `delta`'s records put in or taken out."""
        view = object.__new__(ClusterView)
        view.__dict__.update(self.__dict__)
        for name in ("pods", "services", "namespace_labels", "namespace_annotations", "slices", "_slices_of",
                     "_by_ip", "_by_address", "unserved", "_endpoints"):
            setattr(view, name, dict(getattr(self, name)))
        view.version = self.version + 1
        view.delta = delta
        view.errors = self._error_lines(delta)
        view._absorb(delta)
        return view

    def _absorb(self, delta: Delta) -> None:
        touched_services: set[str] = set()  # whose cached endpoints are out of date
        touched_namespaces: set[str] = set()
        for key, namespace in delta.namespaces.items():
            if namespace is None:
                self.namespace_labels.pop(key, None)
                self.namespace_annotations.pop(key, None)
            else:
                self.namespace_labels[key] = namespace.labels
                self.namespace_annotations[key] = namespace.annotations
        for key, pod in delta.pods.items():
            old = self.pods.pop(key, None)
            self.unserved.pop(f"pod {key}", None)
            if old is not None:
                touched_namespaces.add(old.namespace)
                for ip in old.ips or (old.ip,):
                    if self._by_ip.get(ip) is old:
                        del self._by_ip[ip]
            if pod is None:
                continue
            self.pods[key] = pod
            touched_namespaces.add(pod.namespace)
            for ip in pod.ips or (pod.ip,):
                self._by_ip[ip] = pod
            if not pod.ip:
                self.unserved[f"pod {key}"] = f"no IPv4 address ({', '.join(pod.ips)}): the proxy is IPv4"
        for key, service in delta.services.items():
            old = self.services.pop(key, None)
            self.unserved.pop(f"service {key}", None)
            touched_services.add(key)
            if old is not None:
                for port in old.ports:
                    for ip in old.cluster_ips or (old.cluster_ip,):
                        if self._by_address.get((ip, port.port), (None,))[0] is old:
                            del self._by_address[(ip, port.port)]
            if service is None:
                continue
            self.services[key] = service
            for ip in service.cluster_ips or (service.cluster_ip,):
                for port in service.ports:
                    self._by_address[(ip, port.port)] = (service, port)
            ipv6 = [ip for ip in service.cluster_ips if ip != service.cluster_ip]
            if ipv6:
                self.unserved[f"service {key}"] = f"cluster IPs {', '.join(ipv6)} not served: the proxy is IPv4"
        for key, slice_ in delta.endpointslices.items():
            old = self.slices.pop(key, None)
            self.unserved.pop(f"endpointslice {key}", None)
            for record in (old, slice_):
                if record is not None:
                    touched_services.add(record.service)
                    members = self._slices_of.get(record.service, frozenset()) - {key}
                    self._slices_of[record.service] = members
            if slice_ is None:
                continue
            self.slices[key] = slice_
            if slice_.address_type == "IPv4":
                self._slices_of[slice_.service] = self._slices_of[slice_.service] | {key}
            else:
                self.unserved[f"endpointslice {key}"] = f"{slice_.address_type} endpoints: the proxy is IPv4"
        for service_key, _ in list(self._endpoints):
            if service_key in touched_services or service_key.partition("/")[0] in touched_namespaces:
                self._endpoints.pop((service_key, _), None)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_endpoints"] = {}  # recomputed on demand; not worth sending
        state["delta"] = None
        return state

    def meshed(self, pod: PodInfo) -> bool:
        own = pod.labels.get(self.mesh_key)
        if own in (self.mesh_value, OPT_OUT):
            return own == self.mesh_value
        return self.namespace_labels.get(pod.namespace, {}).get(self.mesh_key) == self.mesh_value

    def pods_on(self, node: str) -> list[PodInfo]:
        return sorted((p for p in self.pods.values() if p.node == node), key=lambda p: p.key)

    def endpoints(self, service: ServiceInfo, port: ServicePort) -> tuple[Endpoint, ...]:
        """The Service port's endpoints (computed once per view and kept across views until
        the Service, its slices or its namespace's pods change)."""
        key = (service.key, port.port)
        if key not in self._endpoints:
            self._endpoints[key] = self._select(service, port)
        return self._endpoints[key]

    def _select(self, service: ServiceInfo, port: ServicePort) -> tuple[Endpoint, ...]:
        if self.uses_slices:
            return self._from_slices(service, port)
        if not service.selector:
            return ()
        found = []
        for pod in self.pods.values():
            if pod.namespace != service.namespace or not pod.ip:
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
        for slice_key in self._slices_of.get(service.key, ()):
            slice_ = self.slices[slice_key]
            numbers = [number for name, number in slice_.ports if name == port.name]
            if not numbers:
                continue
            for addresses, ready in slice_.endpoints:
                if not ready:
                    continue
                for ip in addresses:
                    found.add(Endpoint(ip, numbers[0], self._by_ip.get(ip)))
        return tuple(sorted(found, key=lambda e: (e.ip, e.port)))
