"""Where an outbound connection goes, from its original destination: pure.

A Service's virtual IP and port -> that Service's endpoints (balanced); a pod's
IP -> that pod; anything else -> out of the mesh, as addressed.
"""

from dataclasses import dataclass

from nodeagent.cluster.model import ClusterView, Endpoint, PodInfo, ServiceInfo, ServicePort


@dataclass(frozen=True)
class ToService:
    service: ServiceInfo
    port: ServicePort
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True)
class ToPod:
    pod: PodInfo
    port: int


@dataclass(frozen=True)
class Passthrough:
    ip: str
    port: int


Route = ToService | ToPod | Passthrough


def route(view: ClusterView, ip: str, port: int) -> Route:
    match = view.service_by_address.get((ip, port))
    if match is not None:
        service, service_port = match
        return ToService(service, service_port, view.endpoints(service, service_port))
    pod = view.pod_by_ip.get(ip)
    if pod is not None:
        return ToPod(pod, port)
    return Passthrough(ip, port)
