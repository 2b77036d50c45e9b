"""The node proxy: listeners inside each enrolled pod, and the state that the
pods on the node share (cluster view, endpoint balancers, retry budgets, pool)."""

import asyncio
import logging
import os
import random
import socket
import time
from dataclasses import dataclass, field

from nodeagent import netns
from nodeagent.cluster.model import ClusterView, PodInfo
from nodeagent.datapath.control import Datapath, PodEntry
from nodeagent.proxy import service_config
from nodeagent.proxy.budget import RetryBudget
from nodeagent.proxy.endpoints import EndpointSet
from nodeagent.proxy.inbound import InboundAccept
from nodeagent.proxy.outbound import OutboundAccept
from nodeagent.proxy.routing import ToService
from nodeagent.proxy.stats import Stats
from nodeagent.proxy.upstream import Pool

log = logging.getLogger("nodeagent.proxy")

OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
MAX_CONNECTIONS = 20000


@dataclass
class PodContext:
    info: PodInfo
    netns_fd: int
    cookie: int
    slot: int
    servers: list = field(default_factory=list)

    @property
    def netns_path(self) -> str:
        # The fd keeps the namespace alive and names it, whatever happens to the pod's processes.
        return f"/proc/self/fd/{self.netns_fd}"

    @property
    def key(self) -> str:
        return self.info.key


def _listener(netns_path: str, port: int) -> socket.socket:
    with netns.entered(netns_path):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


class Proxy:
    def __init__(self, datapath: Datapath, stats: Stats | None = None, max_connections: int = MAX_CONNECTIONS):
        self.datapath = datapath
        self.stats = stats or Stats()
        self.max_connections = max_connections
        self.view = ClusterView()
        self.pool = Pool()
        self.pods: dict[int, PodContext] = {}
        self._endpoint_sets: dict[tuple, tuple[int, EndpointSet]] = {}
        self._budgets: dict[str, RetryBudget] = {}
        self._configs: dict[str, tuple[dict, service_config.ServiceConfig]] = {}
        self._rng = random.Random()

    def update_view(self, view: ClusterView) -> None:
        for error in view.errors:
            log.warning("cluster: %s", error)
        self.view = view

    # --- shared per-Service state ---

    def endpoints_for(self, decision: ToService) -> EndpointSet:
        key = (decision.service.key, decision.port.port)
        version, endpoints = self._endpoint_sets.get(key, (None, None))
        if endpoints is None:
            endpoints = EndpointSet(rng=self._rng)
        if version != id(self.view):
            endpoints.update(decision.endpoints)
            self._endpoint_sets[key] = (id(self.view), endpoints)
        return endpoints

    def config_for(self, decision) -> service_config.ServiceConfig:
        if not isinstance(decision, ToService):
            return service_config.DEFAULT
        service = decision.service
        cached = self._configs.get(service.key)
        if cached is None or cached[0] != service.annotations:
            config, errors = service_config.from_annotations(service.annotations)
            for error in errors:  # once per change of the annotations
                log.warning("service %s: %s", service.key, error)
            cached = (service.annotations, config)
            self._configs[service.key] = cached
        return cached[1]

    def budget_for(self, decision) -> RetryBudget:
        key = decision.service.key if isinstance(decision, ToService) else "default"
        if key not in self._budgets:
            self._budgets[key] = RetryBudget(time.monotonic)
        return self._budgets[key]

    # --- pods ---

    async def add_pod(self, info: PodInfo, netns_fd: int, slot: int) -> PodContext:
        """Listeners in the pod first, then the data path steers to them."""
        path = f"/proc/self/fd/{netns_fd}"
        outbound_sock, inbound_sock = _listener(path, OUTBOUND_PORT), _listener(path, INBOUND_PORT)
        cookie = netns.socket_cookie_of_netns(outbound_sock)
        pod = PodContext(info, netns_fd, cookie, slot)
        loop = asyncio.get_running_loop()
        pod.servers.append(await loop.create_server(lambda: OutboundAccept(self, pod), sock=outbound_sock))
        pod.servers.append(await loop.create_server(lambda: InboundAccept(self, pod), sock=inbound_sock))
        self.datapath.reset_counters(slot)
        self.datapath.attach_inbound(path, cookie)
        self.datapath.register_inbound_listener(slot, inbound_sock)
        self.datapath.enrol(PodEntry(cookie, info.ip, slot, OUTBOUND_PORT))
        self.pods[cookie] = pod
        log.info("pod %s enrolled (slot %d, netns cookie %d)", info.key, slot, cookie)
        return pod

    async def remove_pod(self, cookie: int, deleted: bool) -> None:
        """Leave the mesh (the data path first, then the listeners). A deleted
        pod's sk_lookup link goes too; a pod that only left keeps it, idle."""
        pod = self.pods.pop(cookie)
        self.datapath.forget(cookie, pod.info.ip)
        for server in pod.servers:
            server.close()
        self.pool.forget_pod(cookie)
        if deleted:
            self.datapath.detach_inbound(cookie)
        os.close(pod.netns_fd)
        log.info("pod %s %s", pod.key, "deleted" if deleted else "left the mesh")
