"""The lab network: pods' namespaces on one bridge in a namespace of its own.

    [pod netns: eth0 10.244.i.j/16] --veth-- [nalab-fabric netns: nalab-br0]

Nothing of the lab is in the host's namespace but two `unreachable` routes
(pod and service ranges) that make a stray host-side connect to a lab address
fail at once instead of following the host's default route off the machine.
The fabric has no uplink and pods have no default route, so a pod's connect to
anything outside the lab fails with ENETUNREACH before a packet is sent.
"""

import ipaddress
import socket

from pyroute2 import IPRoute, NetNS, netns

from nodeagent import PREFIX
from nodeagent.lab.plan import BRIDGE, FABRIC_NETNS, POD_CIDR, SERVICE_CIDR, PodPlan, veth_name

# The routing-protocol number our guard routes carry, so cleanup finds them.
GUARD_ROUTE_PROTO = 233
GUARDED = (POD_CIDR, SERVICE_CIDR)


class NetworkError(RuntimeError):
    pass


def lab_namespaces() -> list[str]:
    return sorted(name for name in netns.listnetns() if name.startswith(f"{PREFIX}-"))


def check_host_ranges_free() -> None:
    """Refuse to build a lab whose ranges the host already routes (a real cluster node, say)."""
    with IPRoute() as ipr:
        for route in ipr.get_routes(family=socket.AF_INET):
            if route["proto"] == GUARD_ROUTE_PROTO:
                continue
            dst = route.get_attr("RTA_DST")
            if dst is None:
                continue
            network = ipaddress.IPv4Network(f"{dst}/{route['dst_len']}", strict=False)
            for guarded in GUARDED:
                if network.overlaps(guarded):
                    raise NetworkError(f"the host already routes {network}, which overlaps the lab's {guarded}")


def add_guard_routes() -> None:
    with IPRoute() as ipr:
        for network in GUARDED:
            try:
                ipr.route("add", dst=str(network), type="unreachable", proto=GUARD_ROUTE_PROTO)
            except Exception as e:  # pyroute2's NetlinkError; EEXIST is fine
                if getattr(e, "code", None) != 17:
                    raise


def remove_guard_routes() -> None:
    with IPRoute() as ipr:
        for route in ipr.get_routes(family=socket.AF_INET, proto=GUARD_ROUTE_PROTO):
            ipr.route("del", dst=f"{route.get_attr('RTA_DST')}/{route['dst_len']}", type="unreachable",
                      proto=GUARD_ROUTE_PROTO)


def guard_routes() -> list[str]:
    with IPRoute() as ipr:
        return [
            f"{r.get_attr('RTA_DST')}/{r['dst_len']}"
            for r in ipr.get_routes(family=socket.AF_INET, proto=GUARD_ROUTE_PROTO)
        ]


def _set_up(ns: NetNS, ifname: str) -> int:
    index = ns.link_lookup(ifname=ifname)[0]
    ns.link("set", index=index, state="up")
    return index


def create_fabric() -> None:
    netns.create(FABRIC_NETNS)
    with NetNS(FABRIC_NETNS) as fabric:
        fabric.link("add", ifname=BRIDGE, kind="bridge")
        _set_up(fabric, BRIDGE)
        _set_up(fabric, "lo")


def add_pod(pod: PodPlan, node_index: int, pod_index: int) -> None:
    """A namespace for the pod, wired to the bridge, with its IP on eth0."""
    netns.create(pod.netns)
    fabric_side = veth_name(node_index, pod_index)
    with NetNS(FABRIC_NETNS) as fabric:
        fabric.link("add", ifname=fabric_side, kind="veth", peer={"ifname": "eth0", "net_ns_fd": pod.netns})
        bridge = fabric.link_lookup(ifname=BRIDGE)[0]
        index = fabric.link_lookup(ifname=fabric_side)[0]
        fabric.link("set", index=index, master=bridge, state="up")
    with NetNS(pod.netns) as ns:
        _set_up(ns, "lo")
        eth0 = ns.link_lookup(ifname="eth0")[0]
        ns.addr("add", index=eth0, address=pod.ip, prefixlen=POD_CIDR.prefixlen)
        ns.link("set", index=eth0, state="up")


def remove_all() -> None:
    """Remove every lab namespace (a pod's veth goes with its namespace)."""
    for name in lab_namespaces():
        netns.remove(name)
