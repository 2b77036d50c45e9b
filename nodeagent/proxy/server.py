"""The node proxy: listeners inside each enrolled pod, and the state that the pods on the node
share. `Proxy` is where the stages are assembled (build_outbound / build_inbound): each stage
gets its narrow, typed deps (context.py), never the Proxy itself.
"""

import asyncio
import enum
import functools
import logging
import os
import time

from nodeagent import netns
from nodeagent.cluster import podfs
from nodeagent.cluster.model import ClusterView, PodInfo
from nodeagent.datapath.control import Datapath, PodEntry
from nodeagent.identity import naming
from nodeagent.identity.workload import WorkloadIdentities
from nodeagent.ports import INBOUND_PORT, MESH_PORT, OUTBOUND_PORT
from nodeagent.proxy import contention, limits, mesh
from nodeagent.proxy.authorizer import Authorizer
from nodeagent.proxy.connection import ConnectionTable, Direction
from nodeagent.proxy.connector import Connector
from nodeagent.proxy.contention import LoopContention
from nodeagent.proxy.context import InboundDeps, Observers, OutboundDeps, PodContext, Pools, Timeouts
from nodeagent.proxy.directory import Directory
from nodeagent.proxy.fastpath import Splicer
from nodeagent.proxy.h2upstream import H2Pool
from nodeagent.proxy.inbound import InboundAccept, MeshAccept
from nodeagent.proxy.listeners import close_when_drained, migrate_queues, open_listener
from nodeagent.proxy.metrics import Metrics
from nodeagent.proxy.outbound import OutboundAccept
from nodeagent.proxy.overload import CHECK_S, MemoryGuard
from nodeagent.proxy.problems import ProblemLog
from nodeagent.proxy.refusal import KernelRefusals
from nodeagent.proxy.tap import TapHub
from nodeagent.proxy.telemetry import Telemetry
from nodeagent.proxy.upstream import Pool, register_sockets_with
from nodeagent.settings import DEFAULT, AgentSettings

log = logging.getLogger("nodeagent.proxy")


class Migration(enum.Enum):
    """Whether pods' namespaces hand a closing listener's queue to its reuseport group."""

    UNKNOWN = "not tried yet"
    ON = "on"
    UNAVAILABLE = "unavailable"  # /proc/sys is read-only here: tried once, said once
# Draining, each listener accepts what is queued on it for at most this long before it closes.
LISTENER_DRAIN_S = 2.0


class Proxy:
    def __init__(self, datapath: Datapath, identities: WorkloadIdentities, settings: AgentSettings = DEFAULT,
                 owns_datapath: bool = True, processes: int = 1):
        self.settings = settings
        self.datapath = datapath
        # Its sockets in pods are never captured (bpf/datapath.c): registered before they connect.
        register_sockets_with(getattr(datapath, "register_proxy_socket", None))
        self.identities = identities
        # A worker process serves pods but leaves enrolment and inbound steering to the main one.
        self.owns_datapath = owns_datapath
        self.metrics = Metrics()
        self.tap = TapHub()
        self.problems = ProblemLog(log)
        self.migration = Migration.UNKNOWN  # net.ipv4.tcp_migrate_req in the pods' namespaces (add_pod)
        self.telemetry = Telemetry(settings, self.metrics, self.problems, lambda: self.directory.view)
        self.observers = Observers(self.metrics, self.tap, self.problems, self.telemetry)
        self.directory = Directory()
        self.authorizer = Authorizer(settings.default_policy, settings.networks, settings.trust_domain,
                                     lambda: self.directory.view, self.observers)
        # Each process holds its share of the node's connections and watches its share of the
        # agent's memory budget: the node-wide bounds hold with any number of processes.
        self.processes = max(processes, 1)
        self.connections = ConnectionTable(self._share(settings.max_connections), self._refused, self._cut)
        self.guard = MemoryGuard(settings.memory_budget // self.processes, self.connections, self.observers)
        self.connections.admitting = self.guard.admits
        self._guard_timer = asyncio.get_running_loop().call_later(CHECK_S, self._check_memory)
        # A late loop cuts the rates of the pods whose handshakes load it (contention.py).
        self.contention = LoopContention()
        self._late_ticks_counted = 0
        self._shares_shown: set = set()  # (quota, direction) with a handshake_rate_share series under 1
        self._contention_due = time.perf_counter() + contention.TICK_S
        self._contention_timer = asyncio.get_running_loop().call_later(contention.TICK_S, self._probe_loop)
        self.kernel_refusals = KernelRefusals(datapath, self.problems)
        self.tls_sessions = mesh.SessionCache()
        identities.on_retire.append(lambda material: self.tls_sessions.retire(material.client))
        self.connector = Connector(self.directory, identities, self.tls_sessions, settings.trust_domain,
                                   settings.on_node_plaintext,
                                   on_handshake=lambda resumed: self.metrics.handshake_done("outbound", resumed))
        self.pools = Pools(Pool(), H2Pool())
        self.app_pools = Pools(Pool(), H2Pool())  # inbound HTTP to the pods' own apps
        self.splicer = Splicer(datapath, settings.fast_paths, self.problems)
        self.timeouts = Timeouts()
        self.pods: dict[int, PodContext] = {}
        self.outbound = self.build_outbound()
        self.inbound = self.build_inbound()

    def build_outbound(self) -> OutboundDeps:
        # (A Proxy without a data path, as tests make, has no original destinations to give.)
        original_destination = getattr(self.datapath, "original_destination", None)
        return OutboundDeps(original_destination, self.directory, self.connector, self.connections,
                            self.authorizer, self.splicer, self.pools, self.observers, self.timeouts)

    def build_inbound(self) -> InboundDeps:
        return InboundDeps(self.connections, self.authorizer, self.server_context, self.splicer, self.app_pools,
                           self.observers, self.timeouts)

    @property
    def view(self) -> ClusterView:
        return self.directory.view

    @property
    def open_connections(self) -> int:
        return self.connections.open_count

    def update_view(self, view: ClusterView) -> None:
        for error in view.errors:
            self.problems.warning("cluster", "cluster: %s", error)
        old = self.directory.view
        self.directory.update(view)
        for pod in self.pods.values():
            before, after = old.pods.get(pod.key), view.pods.get(pod.key)
            if before is not None and after is not None and before.annotations != after.annotations:
                pod.quota.limits = self._limits_of(after)
                self._reauthorize(pod)
            elif after is not None and (old.namespace_annotations.get(after.namespace)
                                        != view.namespace_annotations.get(after.namespace)):
                pod.quota.limits = self._limits_of(after)

    def apply_settings(self, settings: AgentSettings) -> None:
        """Cluster settings changed live (live_settings.LIVE): established connections keep what
        they were admitted with; new connections, hops, certificates and traces use the new values.
        A policy change closes the open inbound connections it refuses, as an annotation change does."""
        old, self.settings = self.settings, settings
        self.connections.max_connections = self._share(settings.max_connections)
        self.guard.budget = settings.memory_budget // self.processes
        self.connector.on_node_plaintext = settings.on_node_plaintext
        self.identities.lifetime = settings.cert_lifetime_delta
        self.telemetry.reconfigure(settings)
        if settings.pod_limits != old.pod_limits:
            for pod in self.pods.values():
                pod.quota.limits = self._limits_of(self.view.pods.get(pod.key, pod.info))
        if (settings.default_policy, settings.cluster_networks) != (old.default_policy, old.cluster_networks):
            self.authorizer.reconfigure(settings.default_policy, settings.networks)
            for pod in self.pods.values():
                self._reauthorize(pod)

    def _reauthorize(self, pod: PodContext) -> None:
        """A pod's policy may have changed: connections it would now refuse are closed (pooled
        connections would otherwise carry requests past the new policy)."""
        for connection in self.connections.live(pod.key):
            if connection.direction is Direction.INBOUND and connection.revoke is not None:
                if not self.authorizer.authorize(pod, connection.port, connection.peer).allowed:
                    connection.revoke()

    def _share(self, node_connections: int) -> int:
        """This process's part of `--max-connections` (the kernel spreads connections over the
        processes' SO_REUSEPORT listeners)."""
        return max(1, node_connections // self.processes)

    def _limits_of(self, info: PodInfo) -> limits.PodLimits:
        pod_limits, errors = limits.from_annotations(info.annotations, self.settings.pod_limits,
                                                     self.view.namespace_annotations.get(info.namespace, {}))
        for error in errors:
            self.problems.warning("limits", "pod %s: %s", info.key, error)
        return pod_limits

    def _check_memory(self) -> None:
        self.guard.check()
        self._guard_timer = asyncio.get_running_loop().call_later(CHECK_S, self._check_memory)

    def _probe_loop(self) -> None:
        """A tick of the contention probe: how late it came, measured with perf_counter (uvloop's
        loop.time() has 1 ms steps). Rescheduled whatever happens: a probe that stops leaves the
        rates as they were, cut or not."""
        try:
            now = time.perf_counter()
            judged = self.contention.tick(now, now - self._contention_due)
            if self.contention.late_ticks != self._late_ticks_counted:
                self.metrics.event_loop_late_ticks_total.inc(self.contention.late_ticks - self._late_ticks_counted)
                self._late_ticks_counted = self.contention.late_ticks
            if judged is not None:
                self._judged(judged)
        except Exception as e:  # noqa: BLE001 - logged; the probe goes on
            self.problems.exception("contention probe", e, "the loop contention probe")
        finally:
            self._contention_due = time.perf_counter() + contention.TICK_S
            self._contention_timer = asyncio.get_running_loop().call_later(contention.TICK_S, self._probe_loop)

    def _judged(self, judged: contention.Judged) -> None:
        """A contention window's end: its metrics, and a log line on entry into and exit from cutting."""
        self.metrics.event_loop_handshake_cpu_ratio.set(judged.handshake_part)
        pods = {id(pod.quota): pod for pod in self.pods.values()}
        shown = set(self.contention.shares) | self._shares_shown
        self._shares_shown = set(self.contention.shares)
        for quota, direction in shown:
            pod = pods.get(id(quota))
            if pod is not None and pod.quota is quota:
                series = (direction, pod.info.namespace, pod.info.name)
                self.metrics.child(self.metrics.handshake_rate_share, series).set(
                    self.contention.share((quota, direction)))
        for (quota, direction), count in self.contention.take_refusals().items():
            pod = pods.get(id(quota))
            if pod is not None and pod.quota is quota:
                self.metrics.child(self.metrics.handshake_rate_contended_refusals_total,
                                   (direction, pod.info.namespace, pod.info.name)).inc(count)
        if judged.entered or judged.cut:
            names = ", ".join(f"{pods[id(q)].key} {d} to {100 * share:.0f}%" for (q, d), share in judged.cut.items()
                              if id(q) in pods)
            self.problems.warning("contention entered" if judged.entered else "contention cut",
                                  "the event loop was late (%d ticks over %.0f ms in %.2f s) with handshakes taking "
                                  "%.2f of a core: handshake rates cut: %s", judged.late_ticks, 1e3 * contention.LATE_S,
                                  contention.WINDOW_S, judged.handshake_part, names or "(pods gone)")
        elif judged.left:
            self.problems.warning("contention left", "no pod's handshake rate is cut any more")
        elif judged.window is contention.Window.LATE_ELSEWHERE:
            self.problems.warning("contention elsewhere", "the event loop was late (%d ticks over %.0f ms in %.2f s), "
                                  "handshakes took %.2f of a core (under %.2f): no handshake rate cut",
                                  judged.late_ticks, 1e3 * contention.LATE_S, contention.WINDOW_S,
                                  judged.handshake_part, contention.HANDSHAKE_PART)

    def _cut(self, connection, reason: str) -> None:
        self.metrics.tcp_error(connection.direction.value, connection.pod, f"cut: {reason}")
        self.problems.warning(f"cut {reason}", "pod %s: %s connection cut (%s): it held %d bytes",
                              connection.pod.key, connection.direction.value, reason, connection.buffered())

    def _refused(self, pod: PodContext, direction: Direction, limit: str) -> None:
        self.metrics.limit_exceeded(direction.value, pod, limit)
        self.problems.warning(f"limit {limit}", "pod %s: %s connection refused: the %s limit is reached",
                              pod.key, direction.value, limit)

    # --- identity ---

    def identity_of(self, pod: PodInfo) -> naming.Identity:
        return naming.of_pod(pod.namespace, pod.service_account, self.settings.trust_domain)

    def server_context(self, pod: PodContext):
        return self.identities.material(pod.identity).server

    # --- pods ---

    def _turn_on_migration(self, netns_path: str) -> None:
        """A container's /proc/sys is usually read-only (containerd mounts it so unless the
        container is privileged): then a stopping agent's listeners cannot hand on what is still
        queued on them at their close. The handover keeps accepting until their queues are seen
        empty, so that is a narrow window, not a reason to leave pods unmeshed."""
        try:
            migrate_queues(netns_path)
            self.migration = Migration.ON
        except OSError as e:
            self.migration = Migration.UNAVAILABLE
            log.warning("net.ipv4.tcp_migrate_req cannot be turned on in pods' namespaces (%s): a stopping agent "
                        "resets connections still queued on its listeners when it closes them", e)

    async def add_pod(self, info: PodInfo, netns_fd: int, slot: int) -> PodContext:
        """Listeners in the pod first, then the data path steers to them."""
        path = f"/proc/self/fd/{netns_fd}"
        if self.owns_datapath and self.migration is not Migration.UNAVAILABLE:
            self._turn_on_migration(path)  # an agent that stops later hands its queued connections on
        outbound_sock = open_listener(path, OUTBOUND_PORT)
        inbound_sock = open_listener(path, INBOUND_PORT)
        mesh_sock = open_listener(path, MESH_PORT, host=info.ip)
        cookie = netns.socket_cookie_of_netns(outbound_sock)
        pod = PodContext(info, netns_fd, cookie, slot, self.identity_of(info), limits.Quota(self._limits_of(info)))
        pod.quota.on_refusing = functools.partial(self.kernel_refusals.opened, pod)
        pod.quota.contention = self.contention
        self.identities.material(pod.identity)  # issued now: a refusal surfaces before any traffic
        loop = asyncio.get_running_loop()
        outbound, inbound = self.outbound, self.inbound
        pod.servers.append(await loop.create_server(lambda: OutboundAccept(outbound, pod), sock=outbound_sock))
        pod.servers.append(await loop.create_server(lambda: InboundAccept(inbound, pod), sock=inbound_sock))
        pod.servers.append(await loop.create_server(lambda: MeshAccept(inbound, pod), sock=mesh_sock))
        if self.owns_datapath:
            self.datapath.reset_counters(slot, podfs.addresses(path))
            # A predecessor still serving the pod loses sk_lookup's new connections here, at once.
            self.datapath.register_inbound_listener(slot, inbound_sock)
            self.datapath.enrol(PodEntry(cookie, info.ip, slot, OUTBOUND_PORT))
            self.datapath.attach_inbound(path, cookie)  # last: it refuses what is not enrolled
        self.pods[cookie] = pod
        self.directory.serve(info.key, pod)
        log.info("pod %s enrolled (slot %d, netns cookie %d)", info.key, slot, cookie)
        return pod

    async def remove_pod(self, cookie: int, deleted: bool, keep_entries: bool = False) -> None:
        """Leave the mesh (the data path first, then the listeners). A deleted
        pod's sk_lookup link goes too; a pod that only left keeps it, idle.
        `keep_entries`: the data path is left as it is (a newer agent's, agent.py)."""
        pod = self.pods.pop(cookie)
        pod.quota.on_refusing = None  # its connections still open write no window after `forget`
        self.directory.unserve(pod.key)
        owns_entries = self.owns_datapath and not keep_entries
        if owns_entries:
            self.datapath.forget(cookie, pod.info.ip)
        for server in pod.servers:
            server.close()
        pod.servers.clear()  # their factories hold the pod: a cycle, never collected if gc froze it
        for pools in (self.pools, self.app_pools):
            pools.http1.forget_pod(cookie)
            pools.http2.forget_pod(cookie)
        self.authorizer.forget(pod.key)
        if deleted and owns_entries:
            self.datapath.detach_inbound(cookie)
        self.metrics.forget_pod(pod.key)
        # Its connections still open may open others from or into its namespace: the descriptor
        # is closed after the last of them (a number closed now would be reused at once).
        self.connections.retire(pod, functools.partial(_close_netns, pod))
        log.info("pod %s %s", pod.key, "deleted" if deleted else "left the mesh")

    async def drain(self) -> None:
        """Stop taking new connections without resetting one: HTTP connections are told to go
        (connection.py), every listener closes once its accept queue is empty (listeners.py)."""
        self.connections.drain()
        for pools in (self.pools, self.app_pools):
            pools.http1.drain()  # pooled connections hold no drain open (one-hop ones: the destination's inbound)
        servers = [server for pod in self.pods.values() for server in pod.servers]
        forced = await close_when_drained(servers, LISTENER_DRAIN_S)
        if forced:
            log.warning("draining: %d listeners still had connections queued after %.0f s: those were reset",
                        forced, LISTENER_DRAIN_S)
        log.info("draining: listeners closed; %d connections left", self.connections.open_count)

    def close_listeners(self) -> None:
        self._guard_timer.cancel()
        self._contention_timer.cancel()
        for pod in self.pods.values():
            for server in pod.servers:
                server.close()
        self.telemetry.close()  # the access log lines still queued are written


def _close_netns(pod) -> None:
    os.close(pod.netns_fd)
    pod.netns_fd = -1  # a stray use finds no descriptor (/proc/self/fd/-1), never another's
