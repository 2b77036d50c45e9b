"""Node and agent metrics, read at scrape time: enrolled pods, attached BPF
programs, and the kernel's per-pod counters from the data path's maps.
Pods that left are simply not read, so their series end with them."""

import os

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nodeagent.cluster import podfs
from nodeagent.datapath import libbpf
from nodeagent.datapath.programs import CGROUP_PROGRAMS

KERNEL_COUNTERS = (
    ("redirected", "kernel_redirected", "Outbound connects the kernel sent to the proxy"),
    ("opened", "kernel_connections_opened", "Outbound TCP connections established by the pod"),
    ("failed", "kernel_connect_failures", "Outbound connects that never established"),
    ("denied", "kernel_policy_denials", "Connects the kernel refused with EPERM (IPv6; L4 policy rules: none written)"),
    ("inbound_steered", "kernel_inbound_steered", "Inbound connections steered onto the proxy"),
    ("inbound_refused", "kernel_inbound_refused", "Inbound connections refused: no proxy listening"),
    ("fast_path_bytes", "kernel_fast_path_bytes", "Bytes the pod's loopback sockets sent straight into their peer's "
     "receive queue (the loopback fast path; splices are in tcp_spliced_bytes_total)"),
    ("proxy_port_refused", "kernel_proxy_port_refused", "Inbound connections to the proxy's own ports, refused"),
    ("over_limit", "kernel_over_limit_refused", "Outbound connects the kernel refused with EPERM while the pod was "
     "over a limit of its own in the proxy (its handshake rate: proxy/refusal.py)"),
    ("inbound_unmeshed_refused", "kernel_inbound_unmeshed_refused",
     "Inbound connections to an address of the pod the mesh does not serve (IPv6, another IPv4), refused"),
)


def pod_kernel_counters(proxy) -> dict[str, dict[str, int]]:
    """Per pod key, its slot's counters, and the refusals at addresses its namespace holds (the
    kernel counts those by address: sk_lookup cannot tell which namespace it runs in)."""
    refused = proxy.datapath.unmeshed_refusals()
    counters = {}
    for pod in list(proxy.pods.values()):
        values = proxy.datapath.counters(pod.slot)
        try:
            # Namespaces are read only when something was refused somewhere.
            held = podfs.addresses(pod.netns_path) if refused else ()
        except OSError:
            held = ()  # its namespace is going away
        values["inbound_unmeshed_refused"] = sum(refused.get(address, 0) for address in held)
        counters[pod.key] = values
    return counters


class NodeCollector:
    def __init__(self, agent):
        self.agent = agent

    def describe(self):
        return []  # collected live; no fixed description at registration

    def collect(self):
        proxy = self.agent.proxy
        pods = GaugeMetricFamily("enrolled_pods", "Pods this agent serves", labels=["node"])
        pods.add_metric([self.agent.config.node_name], len(proxy.pods) if proxy else 0)
        yield pods
        programs = GaugeMetricFamily("bpf_programs_attached", "Our BPF programs attached to the node's pod cgroup",
                                     labels=["node", "program"])
        for name, count in self.attached().items():
            programs.add_metric([self.agent.config.node_name, name], count)
        yield programs
        if proxy is None:
            return
        not_enrolled = GaugeMetricFamily("pods_not_enrolled", "Meshed pods of the node the agent does not enrol",
                                         labels=["namespace", "pod", "reason"])
        for key, reason in self.agent.not_enrolled.reasons().items():
            not_enrolled.add_metric([*key.split("/", 1), reason], 1)
        yield not_enrolled
        families = {key: CounterMetricFamily(name, doc, labels=["namespace", "pod"])
                    for key, name, doc in KERNEL_COUNTERS}
        counters = pod_kernel_counters(proxy)
        for pod in list(proxy.pods.values()):
            values = counters.get(pod.key)
            if values is None:
                continue  # enrolled meanwhile: counted at the next scrape
            for key, family in families.items():
                family.add_metric([pod.info.namespace, pod.info.name], values[key])
        yield from families.values()

    def attached(self) -> dict[str, int]:
        try:
            fd = os.open(self.agent.config.cgroup, os.O_RDONLY)
        except OSError:
            return {}
        try:
            return {p.name: len(libbpf.prog_query(fd, p.attach_type)) for p in CGROUP_PROGRAMS}
        finally:
            os.close(fd)
