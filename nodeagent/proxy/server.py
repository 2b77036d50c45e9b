"""The node proxy: listeners inside each enrolled pod, and the state that the
pods on the node share (cluster view, endpoint balancers, retry budgets, pool)."""

import asyncio
import errno
import logging
import os
import random
import socket
import time
from dataclasses import dataclass, field

from nodeagent import netns
from nodeagent.ports import INBOUND_PORT, MESH_PORT, OUTBOUND_PORT
from nodeagent.cluster import podfs
from nodeagent.cluster.model import ClusterView, PodInfo
from nodeagent.datapath.abi import FAST_SKB, FAST_SPLICE
from nodeagent.datapath.control import Datapath, PodEntry
from nodeagent.identity import naming
from nodeagent.identity.workload import WorkloadIdentities
from nodeagent.policy import authz
from nodeagent.proxy import fastpath, mesh, service_config
from nodeagent.proxy.budget import RetryBudget
from nodeagent.proxy.endpoints import EndpointSet
from nodeagent.proxy.h2upstream import H2Pool
from nodeagent.proxy.inbound import InboundAccept, MeshAccept
from nodeagent.proxy.outbound import OutboundAccept
from nodeagent.proxy.routing import ToService
from nodeagent.proxy.metrics import Metrics
from nodeagent.proxy.tap import TapHub
from nodeagent.proxy.upstream import Pool, register_sockets_with
from nodeagent.settings import DEFAULT, AgentSettings

log = logging.getLogger("nodeagent.proxy")

MAX_CONNECTIONS = 20000
LOGGED_REJECTIONS_MAX = 1024


@dataclass(frozen=True)
class Tunnel:
    """How to reach a meshed destination pod: its mesh port, with mutual TLS."""

    pod_ip: str
    port: int
    hint: int
    context: object  # the source workload's client ssl.SSLContext
    expected: naming.Identity
    sessions: object = None  # mesh.SessionCache: resumable sessions per (context, server)

@dataclass
class PodContext:
    info: PodInfo
    netns_fd: int
    cookie: int
    slot: int
    servers: list = field(default_factory=list)
    identity: naming.Identity | None = None

    @property
    def netns_path(self) -> str:
        # The fd keeps the namespace alive and names it, whatever happens to the pod's processes.
        return f"/proc/self/fd/{self.netns_fd}"

    @property
    def key(self) -> str:
        return self.info.key


def _listener(netns_path: str, port: int, host: str = "127.0.0.1", reuse_port: bool = False) -> socket.socket:
    with netns.entered(netns_path):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        # The agent's worker processes each listen on the same ports: the kernel spreads the
        # connections over the group (sk_lookup's assignment too). Only with workers: a root
        # process in the pod could join a group, so a single process does not open one.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


class Proxy:
    def __init__(self, datapath: Datapath, identities: WorkloadIdentities, settings: AgentSettings = DEFAULT,
                 max_connections: int = MAX_CONNECTIONS, owns_datapath: bool = True, reuse_port: bool = False):
        self.datapath = datapath
        # Its sockets in pods are never captured (bpf/datapath.c): registered before they connect.
        register_sockets_with(datapath.register_proxy_socket if datapath is not None else None)
        self.identities = identities
        self.trust_domain = settings.trust_domain
        self.default_policy = settings.default_policy
        self.cluster_networks = settings.networks
        on_node_plaintext, fast_paths = settings.on_node_plaintext, settings.fast_paths
        self._policies: dict[str, tuple[dict, authz.PodPolicy]] = {}
        self.inbound_live: dict[str, set] = {}  # pod key -> admitted inbound connections
        self._logged_rejections: set = set()
        self.metrics = Metrics()
        self.tap = TapHub()
        self.tls_sessions = mesh.SessionCache()
        identities.on_retire.append(lambda material: self.tls_sessions.retire(material.client))
        self.open_connections = 0
        self.max_connections = max_connections
        self.view = ClusterView()
        self.pool = Pool()
        self.h2pool = H2Pool()
        self.pods: dict[int, PodContext] = {}
        self._endpoint_sets: dict[tuple, tuple[int, EndpointSet]] = {}
        self._budgets: dict[str, RetryBudget] = {}
        self._configs: dict[str, tuple[dict, service_config.ServiceConfig]] = {}
        self._rng = random.Random()
        self.on_node_plaintext = on_node_plaintext
        self.fast_path = bool(fast_paths & FAST_SPLICE)  # sk_msg splices
        self.skb_splice = bool(fast_paths & FAST_SKB)  # sk_skb: bytes from remote peers
        # A worker process serves pods but leaves enrolment and inbound steering to the main one.
        self.owns_datapath = owns_datapath
        self.reuse_port = reuse_port
        self._pods_by_key: dict[str, PodContext] = {}

    def update_view(self, view: ClusterView) -> None:
        for error in view.errors:
            log.warning("cluster: %s", error)
        old, self.view = self.view, view
        for key, connections in list(self.inbound_live.items()):
            before, after = old.pods.get(key), view.pods.get(key)
            if before is not None and after is not None and before.annotations != after.annotations:
                self._reauthorize(connections)

    def _reauthorize(self, connections: set) -> None:
        """A pod's policy changed: connections it would now refuse are closed (pooled
        connections would otherwise carry requests past the new policy)."""
        for connection in list(connections):
            if not self.authorize(connection.pod, connection.port, connection.client).allowed:
                connection.revoke()

    def track_inbound(self, connection, alive: bool) -> None:
        live = self.inbound_live.setdefault(connection.pod.key, set())
        if alive:
            live.add(connection)
        else:
            live.discard(connection)

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

    # --- identity and policy ---

    def identity_of(self, pod: PodInfo) -> naming.Identity:
        return naming.of_pod(pod.namespace, pod.service_account, self.trust_domain)

    def server_context(self, pod: PodContext):
        return self.identities.material(pod.identity).server

    def tunnel_to(self, source: PodContext, destination: PodInfo | None, port: int, hint: int) -> Tunnel | None:
        """Mutual TLS to a meshed destination pod; None (plaintext) for anything outside the mesh."""
        if destination is None or not self.view.meshed(destination):
            return None
        return Tunnel(destination.ip, port, hint, self.identities.material(source.identity).client,
                      self.identity_of(destination), self.tls_sessions)

    def on_node(self, destination: PodInfo | None) -> PodContext | None:
        """The destination's context when opaque TCP to it may skip the mTLS hop: it is a
        meshed pod this proxy serves, and the agent allows plaintext on the node."""
        if not self.on_node_plaintext or destination is None:
            return None
        return self._pods_by_key.get(destination.key)

    def kernel_splice(self, client, client_cookie: int, upstream, upstream_cookie: int):
        """Ask the kernel to carry an opaque pair's bytes past us (before the relays start:
        KernelSplice.attach follows them); None if the fast path is off or the kernel refused."""
        if not self.fast_path:
            return None
        try:
            return fastpath.request(self.datapath, client, client_cookie, upstream, upstream_cookie, self.skb_splice)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTCONN):  # a side half-closed or closed meanwhile
                self._log_once("splice", type(e).__name__, f"kernel splice not used: {e}")
            return None

    def authorize(self, pod: PodContext, port: int, client: authz.Client) -> authz.Decision:
        # Annotations change while the pod runs: read them from the current view.
        annotations = self.view.pods.get(pod.key, pod.info).annotations
        cached = self._policies.get(pod.key)
        if cached is None or cached[0] != annotations:
            policy, errors = authz.pod_policy(annotations, self.default_policy)
            for error in errors:
                log.warning("pod %s: %s", pod.key, error)
            cached = (annotations, policy)
            self._policies[pod.key] = cached
        decision = authz.authorize(cached[1], port, client, self.cluster_networks)
        self.metrics.authorization(pod, decision.allowed, client.identity is not None)
        if not decision.allowed:
            self._log_once("deny", client.identity or client.ip, f"pod {pod.key} port {port}: {decision.reason}")
        return decision

    def handshake_failed(self, direction: str, reason: str, transport, detail: str) -> None:
        """Count a refused handshake by its short reason; log the details once."""
        self.metrics.tls_handshake_failures_total.labels(direction, reason).inc()
        peer = transport.get_extra_info("peername") if transport else None
        self._log_once("tls", (peer or ("?",))[0], f"{direction} TLS handshake refused: {detail}")

    def _log_once(self, kind: str, who, message: str) -> None:
        key = (kind, who, message)
        if key not in self._logged_rejections and len(self._logged_rejections) < LOGGED_REJECTIONS_MAX:
            self._logged_rejections.add(key)
            log.warning("%s", message)

    # --- pods ---

    async def add_pod(self, info: PodInfo, netns_fd: int, slot: int) -> PodContext:
        """Listeners in the pod first, then the data path steers to them."""
        path = f"/proc/self/fd/{netns_fd}"
        outbound_sock = _listener(path, OUTBOUND_PORT, reuse_port=self.reuse_port)
        inbound_sock = _listener(path, INBOUND_PORT, reuse_port=self.reuse_port)
        mesh_sock = _listener(path, MESH_PORT, host=info.ip, reuse_port=self.reuse_port)
        cookie = netns.socket_cookie_of_netns(outbound_sock)
        pod = PodContext(info, netns_fd, cookie, slot)
        pod.identity = self.identity_of(info)
        self.identities.material(pod.identity)  # issued now: a refusal surfaces before any traffic
        loop = asyncio.get_running_loop()
        pod.servers.append(await loop.create_server(lambda: OutboundAccept(self, pod), sock=outbound_sock))
        pod.servers.append(await loop.create_server(lambda: InboundAccept(self, pod), sock=inbound_sock))
        pod.servers.append(await loop.create_server(lambda: MeshAccept(self, pod), sock=mesh_sock))
        if self.owns_datapath:
            self.datapath.reset_counters(slot, podfs.addresses(path))
            self.datapath.register_inbound_listener(slot, inbound_sock)
            self.datapath.enrol(PodEntry(cookie, info.ip, slot, OUTBOUND_PORT))
            self.datapath.attach_inbound(path, cookie)  # last: it refuses what is not enrolled
        self.pods[cookie] = pod
        self._pods_by_key[info.key] = pod
        log.info("pod %s enrolled (slot %d, netns cookie %d)", info.key, slot, cookie)
        return pod

    async def remove_pod(self, cookie: int, deleted: bool) -> None:
        """Leave the mesh (the data path first, then the listeners). A deleted
        pod's sk_lookup link goes too; a pod that only left keeps it, idle."""
        pod = self.pods.pop(cookie)
        self._pods_by_key.pop(pod.key, None)
        if self.owns_datapath:
            self.datapath.forget(cookie, pod.info.ip)
        for server in pod.servers:
            server.close()
        self.pool.forget_pod(cookie)
        self.h2pool.forget_pod(cookie)
        self.inbound_live.pop(pod.key, None)
        if deleted and self.owns_datapath:
            self.datapath.detach_inbound(cookie)
        self.metrics.forget_pod(pod.key)
        os.close(pod.netns_fd)
        log.info("pod %s %s", pod.key, "deleted" if deleted else "left the mesh")
