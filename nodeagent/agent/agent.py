"""`nodeagent run`: one agent per node.

Start: check the host, load (or adopt) the data path in a short-lived loader
process, open the admin port, then follow the cluster (the Kubernetes API or
a manifest directory): every meshed pod on this node gets listeners inside
its namespace and its data-path entries; pods that leave or go away are
released. Ready once the first complete view of the cluster is reconciled,
and while the data path is pinned and the view is current.
Stop (SIGTERM/SIGINT): drain (not ready at once; HTTP connections told to
go, listeners closed once their queues are empty, the rest left to end until
--drain-timeout; a second signal ends it), then exit. The data path stays
pinned: a successor adopts it, or the pods fail closed until one comes (README).
"""

import asyncio
import collections
import enum
import logging
import os
import signal
import time
from nodeagent import cgroups, netns, preflight
from prometheus_client import CollectorRegistry

from nodeagent.agent import gc_tuning, heap, memory
from nodeagent.agent.admin import serve_admin, serve_metrics
from nodeagent.agent.settings_reloads import SettingsCollector, SettingsReloads
from nodeagent.agent.merge import Merged, families_of, merge
from nodeagent.agent.workers import MEMORY_LIMIT_ENV, Workers, automatic_processes
from nodeagent.agent.node_metrics import NodeCollector, pod_kernel_counters
from nodeagent.identity import naming
from nodeagent.settings import AgentSettings
from nodeagent.identity.reload import IssuerFiles
from nodeagent.identity.workload import WorkloadIdentities
from nodeagent.agent.reconcile import (ENROLMENT_FAILED, NETNS_WITHOUT_POD_IP, NotEnrolled, SlotAllocator,
                                       plan_changes, refusal)
from nodeagent.agent.succession import Presence
from nodeagent.cluster import podfs
from nodeagent.datapath import abi
from nodeagent.datapath.control import Datapath
from nodeagent.datapath.loader import LoadError, load_same_build_here
from nodeagent.datapath.pins import PinLayout
from nodeagent.datapath.programs import CONNECT4
from nodeagent.proxy import tickets
from nodeagent.proxy.server import Proxy

log = logging.getLogger("nodeagent.agent")
POLL_S = 0.25
MAX_UNSERVED_SHOWN = 100  # /stats lists this many objects the proxy does not serve, at most
DRAIN_CHECK_S = 0.25  # draining: how often the open connections of every process are counted


class AgentError(RuntimeError):
    pass


class Lifecycle(enum.Enum):
    STARTING = "starting"  # until the first complete view is reconciled
    SERVING = "serving"
    DRAINING = "draining"  # stopping: no new connections, the open ones end (or the deadline)


class Agent:
    def __init__(self, settings: AgentSettings, source, reloads: SettingsReloads | None = None):
        self.config = settings  # validated (settings.py); cgroup resolved to the pods' cgroup
        self.reloads = reloads  # --config-dir: the cluster settings, watched (settings_reloads.py)
        self.source = source
        self.lifecycle = Lifecycle.STARTING
        self._datapath_problem: str | None = None  # the pinned data path is gone (a cleanup ran)
        self._problems: list[str] = []  # why the source's view cannot be trusted now
        self.proxy: Proxy | None = None
        self.slots = SlotAllocator(abi.MAX_PODS)
        self.enrolled: dict[str, int] = {}  # pod UID -> netns cookie
        # Slots of a predecessor's pod entries (netns cookie -> slot), kept for the same pods: an
        # agent still serving them steers by those slots until this one has taken over.
        self.adopted_slots: dict[int, int] = {}
        # Cookies of the entries and sk_lookup links found at start (a predecessor's): the only ones
        # this agent ever forgets unserved, once. Entries written later are another agent's (the
        # predecessor still runs during a handover and may enrol a pod this view lacks yet).
        self._inherited: set[int] = set()
        self.presence: Presence | None = None  # this agent's mark beside others (succession.py)
        self._successor = None  # the newer agent that takes new pods instead of this one, if any
        self.started = time.time()
        self.load_report: dict = {}
        self._waiting = False  # a wanted pod whose namespace was not found yet
        self.not_enrolled = NotEnrolled()
        self._exported: set[str] = set()  # identities whose expiry gauge is set
        self.workers: Workers | None = None
        self.tickets = tickets.Rotation()  # the TLS ticket secret every process derives its keys from
        self.listeners: list = []  # admin.Listener: the admin port's and the metrics port's
        self.trims = heap.PeriodicTrim()  # glibc's free memory back to the kernel (heap.py)

    def preflight(self) -> None:
        failed = [c for c in (preflight.check_privileges(), preflight.check_cgroup2(),
                              preflight.check_bpffs(self.config.pin_root)) if not c.ok]
        if failed:
            raise AgentError("; ".join(f"{c.name}: {c.detail} (hint: {c.hint})" for c in failed))
        if not self.config.cgroup.is_dir():
            raise AgentError(f"the pods' cgroup {self.config.cgroup} does not exist")
        try:
            # The issuer and the digest its changes are measured from: one read (reload.py).
            self.issuer_files = IssuerFiles(self.config.identity_dir, time.monotonic())
        except (OSError, ValueError) as e:
            raise AgentError(f"cannot load the identity issuer from {self.config.identity_dir}: {e}") from e

    async def run(self, stop: asyncio.Event, hurry: asyncio.Event | None = None) -> None:
        """Serve until `stop`, then drain until the deadline or `hurry`."""
        self.preflight()
        self.trims.start()
        try:
            # Only the fast path needs the proxy's own sockets seen by sockops.
            proxy_cgroup = cgroups.own_cgroup() if self.config.fast_paths else None
        except (cgroups.CgroupError, OSError) as e:
            raise AgentError(f"cannot find the agent's own cgroup for the fast path: {e}") from e
        try:
            self.load_report = await asyncio.to_thread(
                load_same_build_here, self.config.pin_name, self.config.cgroup, self.config.pin_root,
                proxy_cgroup=proxy_cgroup, fast_paths=self.config.fast_paths)
        except LoadError as e:
            raise AgentError(f"the data path could not be loaded: {e}") from e
        report = self.load_report
        log.info("data path %s (created %s, adopted %s)",
                 f"compiled and loaded in {report['compile_and_load_ms']:.0f} ms" if report["compiled"]
                 else "programs adopted as pinned (the same build)", report["created"], report["adopted"])
        self.layout = PinLayout(self.config.pin_root, self.config.pin_name)
        self.presence = Presence(self.layout)
        try:
            if self.presence.announce():  # before the pins are read: an agent beside this one stops enrolling
                log.info("another agent serves this node: pods that join are enrolled here from %.1f s on",
                         self.presence.settled_at - time.monotonic())
        except OSError as e:
            raise AgentError(f"cannot mark this agent in {self.presence.dir}: {e}") from e
        datapath = Datapath(self.layout)
        self.adopted_slots = datapath.enrolled_slots()
        self._inherited = set(self.adopted_slots) | set(datapath.inbound_cookies())
        for slot in set(self.adopted_slots.values()):
            self.slots.reserve(slot)
        self.identities = WorkloadIdentities(*self.issuer_files.current, self.config.cert_lifetime_delta)
        self.identities.use_ticket_secret(self.tickets.secret)
        processes = self.config.processes(
            automatic_processes(len(os.sched_getaffinity(0)), os.environ.get(MEMORY_LIMIT_ENV)))
        self.proxy = Proxy(datapath, self.identities, self.config, processes=processes)
        self.proxy.metrics.registry.register(NodeCollector(self))
        if self.reloads:
            self.proxy.metrics.registry.register(SettingsCollector(self.reloads))
        if processes > 1:
            self.workers = Workers(processes - 1, self.config, self.proxy.tap, self.tickets.secret)
            self.workers.start()
        servers = []
        for serve, address in ((serve_admin, self.config.admin), (serve_metrics, self.config.metrics)):
            if address is not None:
                server, listener = await serve(self, *address)
                servers.append(server)
                self.listeners.append(listener)
        try:
            while not stop.is_set():
                view = self.source.poll()
                if view is not None:
                    self.proxy.update_view(view)
                    if self.workers:
                        self.workers.update_view(view)
                    await self.reconcile()
                    if self.lifecycle is Lifecycle.STARTING:
                        self.lifecycle = Lifecycle.SERVING  # ready once the first complete view is served
                        gc_tuning.freeze_start_up()  # once: what start-up made, out of every later collection
                elif self._waiting or self._successor_left():
                    await self.reconcile()
                self._check_source()
                self._check_datapath()
                self.presence.renew(serving=self.lifecycle is Lifecycle.SERVING)
                for identity in self.identities.renew_due():
                    log.info("certificate for %s renewed", identity)
                self._reload_issuer()
                self._rotate_ticket_secret()
                self._reload_settings()
                self._export_expirations()
                if self.workers:
                    self.workers.check()
                try:
                    await asyncio.wait_for(stop.wait(), POLL_S)
                except asyncio.TimeoutError:
                    pass
            self.presence.withdraw()  # an older agent still serving takes new pods again at once
            await self.drain(hurry or asyncio.Event())
        finally:
            self.trims.stop()
            self.presence.withdraw()
            for server in servers:
                server.close()
            if self.workers:
                self.workers.stop()
            self.source.close()
            self.identities.close()
            self.proxy.close_listeners()
            datapath.close()

    async def reconcile(self) -> None:
        view = self.proxy.view
        on_node = {p.uid: p for p in view.pods_on(self.config.node_name)
                   if self.config.sidecar_pod is None or p.key == self.config.sidecar_pod}
        # A pod without an IPv4 address is not served (the view lists it in `unserved`).
        meshed = {uid for uid, p in on_node.items() if view.meshed(p) and p.ip}
        self.not_enrolled.keep_only(meshed)
        wanted = set()
        for uid in meshed:
            reason = refusal(on_node[uid].host_network)
            if reason is None:
                wanted.add(uid)
            else:
                self._not_enrolled(on_node[uid], reason)
        # Identities only for the ServiceAccounts of meshed pods on this node, never others.
        self.identities.allow({self.proxy.identity_of(on_node[uid]) for uid in wanted})
        changes = plan_changes(set(self.enrolled), wanted, set(on_node))
        # Beside a newer agent, the pinned entries are its own (it adopted or rewrote them): it
        # removes them when its view has the pod leave. This agent's view may see a leave late,
        # or one the newer agent never saw (a leave and a join between two of its polls): removing
        # the entries then would leave a pod the newer agent serves unsteered (refused), for good.
        keep_entries = bool(changes.release) and self.presence.successor() is not None
        for uid in changes.release:
            cookie = self.enrolled.pop(uid)
            slot = self.proxy.pods[cookie].slot
            if self.workers:
                self.workers.remove_pod(cookie, deleted=uid in changes.deleted)
            await self.proxy.remove_pod(cookie, deleted=uid in changes.deleted, keep_entries=keep_entries)
            self.slots.free(slot)
        if changes.release and not keep_entries:
            # A window a process wrote after the pod's entry went (a worker not yet told it left).
            self.proxy.datapath.sweep_refusals()
        self._waiting = False
        # Every agent's entries (one beside this one may have enrolled a pod since this one started).
        pinned = self.proxy.datapath.enrolled_slots() if changes.enrol else {}
        takes_new = bool(changes.enrol) and self._takes_new_pods()
        for uid in changes.enrol:
            pod = on_node[uid]
            cgroup = podfs.find_pod_cgroup(self.config.cgroup, uid)
            fd = podfs.open_pod_netns(cgroup, pod.ip) if cgroup else None
            if fd is None:
                if cgroup is not None and cgroups.pids_in(cgroup):
                    self._not_enrolled(pod, NETNS_WITHOUT_POD_IP)  # started, yet never where its IP is
                self._waiting = True  # not started yet: try again next round
                continue
            cookie = netns.cookie(f"/proc/self/fd/{fd}")
            slot = self.adopted_slots.pop(cookie, None)
            adopted = slot is not None
            if not adopted and not takes_new:
                os.close(fd)  # a newer agent enrols it (or, settling, this one next round)
                if self._successor is None:
                    self._waiting = True
                continue
            if not adopted:
                slot = self._new_slot(cookie, pinned)
            try:
                context = await self.proxy.add_pod(pod, fd, slot)
            except (OSError, naming.IdentityError) as e:
                if self.not_enrolled.note(pod.uid, pod.key, ENROLMENT_FAILED):  # retried every round: said once
                    log.error("pod %s: cannot enrol: %s", pod.key, e)
                os.close(fd)
                if adopted:
                    self.adopted_slots[cookie] = slot  # the predecessor's entry still steers by it
                else:
                    self.slots.free(slot)
                self._waiting = True
                continue
            self.enrolled[uid] = context.cookie
            self.not_enrolled.clear(uid)
            if self.workers:
                self.workers.add_pod(context)
        if not self._waiting and self._inherited:
            self._forget_stale_enrolments()

    def _successor_left(self) -> bool:
        """The newer agent this one left new pods to is gone (drained, rolled back, or dead: its
        mark not renewed): the pods it was to enrol are this agent's again, though the view has
        not moved."""
        return self._successor is not None and self.presence.successor() != self._successor

    def _takes_new_pods(self) -> bool:
        """False while a newer agent serves beside this one (it enrols new pods alone), and for
        SETTLE_S after this one's start beside another (succession.py)."""
        successor = self.presence.successor()
        if successor != self._successor:
            if successor:
                log.info("a newer agent (mark %s) serves this node: pods that join are left to it", successor.name)
            else:
                log.info("no newer agent serves this node any more: pods that join are enrolled here again")
            self._successor = successor
        return successor is None and self.presence.settled()

    def _new_slot(self, cookie: int, pinned: dict[int, int]) -> int:
        """The slot of the pod's entry if an older agent enrolled it after this one's start (both
        then steer it by one slot, and this agent's listener, written last, stays when the older
        one exits); else a free slot no entry names."""
        slot = pinned.get(cookie)
        if slot is not None and not self.slots.in_use(slot):
            self.slots.reserve(slot)
            return slot
        return self.slots.take(excluding=frozenset(pinned.values()))

    async def drain(self, hurry: asyncio.Event) -> None:
        """Not ready from here on; every process stops taking connections and tells its HTTP
        clients to go; wait for the rest to end, until the drain deadline or `hurry`, then
        cut what is left."""
        self.lifecycle = Lifecycle.DRAINING
        started = time.monotonic()
        deadline = started + self.config.drain_timeout
        log.info("draining: not ready; %s connections open; deadline in %.0f s (a second signal ends it)",
                 await self._open_everywhere(), self.config.drain_timeout)
        if self.workers:
            self.workers.drain()
        await self.proxy.drain()
        while (left := await self._open_everywhere()) != 0 and not hurry.is_set() and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(hurry.wait(), DRAIN_CHECK_S)
            except asyncio.TimeoutError:
                pass
        why = "a second signal" if hurry.is_set() else "the drain deadline"
        if left != 0:
            left_here = collections.Counter(f"{c.direction.value} {c.phase.value}"
                                            for c in self.proxy.connections.all())
            log.warning("draining: left at %s, by direction and phase: %s", why, dict(left_here))
            cut = self.proxy.connections.cut_all("drain deadline")
            log.warning("draining: %s: %d connections cut here, %s in workers (which stop now)", why, cut,
                        "some" if left is None else left - cut)
        log.info("drained in %.1f s", time.monotonic() - started)

    def _not_enrolled(self, pod, reason: str) -> None:
        if self.not_enrolled.note(pod.uid, pod.key, reason):
            log.warning("pod %s is meshed but not enrolled: %s", pod.key, reason)

    @property
    def ready(self) -> bool:
        """Serving the first complete view, not draining, the data path pinned, and the view
        current: a watch that keeps failing or a kind left unwatched beyond the source's bound
        makes the agent not ready."""
        return self.lifecycle is Lifecycle.SERVING and self._datapath_problem is None and not self._problems

    def _check_datapath(self) -> None:
        """The data path this agent writes is still pinned (`nodeagent cleanup` removes it: the
        pods are then unmeshed, and nothing this agent does reaches them)."""
        missing = [str(path) for path in (self.layout.map("pods_by_netns"), self.layout.link(CONNECT4.name))
                   if not path.exists()]
        problem = f"the data path is gone: {', '.join(missing)} missing" if missing else None
        if problem != self._datapath_problem:
            if problem:
                log.error("not ready: %s", problem)
            else:
                log.info("ready again: the data path is pinned")
            self._datapath_problem = problem

    def _check_source(self) -> None:
        problems = self.source.problems()
        if problems != self._problems:
            if problems:
                log.warning("not ready: the cluster view may be stale: %s", "; ".join(problems))
            else:
                log.info("ready again: the cluster view is current")
            self._problems = problems

    def _forget_stale_enrolments(self) -> None:
        """Entries (and sk_lookup links) found at this agent's start for pods it does not serve,
        once, after the first reconcile with no wanted pod waiting for its namespace (its old
        entry keeps it failing closed until it is served again). Never an entry written after the
        start: during a handover the predecessor may enrol a pod this agent's view lacks yet."""
        served = set(self.proxy.pods)
        datapath = self.proxy.datapath
        for cookie in self._inherited - served:
            datapath.forget_cookie(cookie)
            if (slot := self.adopted_slots.pop(cookie, None)) is not None:
                self.slots.free(slot)
        self._inherited = set()
        datapath.sweep_refusals()  # windows of pods gone while no agent ran

    def _reload_issuer(self) -> None:
        """The issuer Secret changed (trust anchors, issuer): new certificates for every identity
        (each worker watches the same files)."""
        changed = self.issuer_files.changed(time.monotonic())
        if changed is not None:
            count = self.identities.replace_issuer(*changed)
            log.info("the issuer or trust anchors changed: %d identities issued again", count)

    def _rotate_ticket_secret(self) -> None:
        """Every ROTATE_EVERY_S, new ticket keys in every process (proxy/tickets.py)."""
        secret = self.tickets.due()
        if secret is not None:
            self.identities.use_ticket_secret(secret)
            if self.workers:
                self.workers.rotate_ticket_secret(secret)
            log.info("TLS ticket keys rotated in every process: each client's next handshake is a full one")

    def _reload_settings(self) -> None:
        """The settings' ConfigMap changed: what can change live is applied here and in every
        worker (a worker started later gets the new settings); the rest is reported, waiting."""
        if self.reloads is None:
            return
        change = self.reloads.check(self.config, time.monotonic())
        if change is None or not change.applied:
            return
        self.config = change.settings
        logging.getLogger().setLevel(change.settings.log_level.upper())
        self.proxy.apply_settings(change.settings)
        if self.workers:
            self.workers.reconfigure(change.settings)

    def _export_expirations(self) -> None:
        gauge = self.proxy.metrics.identity_cert_expiration_timestamp_seconds
        current = self.identities.expirations()
        for identity in set(self._exported) - set(current):
            gauge.remove(identity)
        for identity, not_after in current.items():
            gauge.labels(identity).set(not_after)
        self._exported = set(current)

    async def _open_everywhere(self) -> int | None:
        """Open connections in every process; None if a live worker did not answer (not zero)."""
        reports = await self.workers.scrape() if self.workers else []
        if self.workers and len(reports) < self.workers.alive():
            return None
        return self.proxy.open_connections + sum(report[1] for report in reports)

    async def _families(self) -> tuple[list, int]:
        """Every process's metrics, merged, and their open connections."""
        reports = await self.workers.scrape() if self.workers else []
        families = merge([families_of(self.proxy.metrics.registry)] + [r[0] for r in reports])
        return families, self.proxy.open_connections + sum(r[1] for r in reports)

    async def memory_report(self, trim: bool = False) -> dict:
        """/debug/memory: what each process holds (agent/memory.py), this one first."""
        reports = [memory.report(self.proxy, trim_heap=trim, trims=self.trims)]
        reports += await self.workers.memory(trim) if self.workers else []
        return {"node": self.config.node_name, "uptime_s": round(time.time() - self.started, 1),
                "processes": reports}

    async def metrics_registry(self) -> CollectorRegistry:
        registry = CollectorRegistry()
        registry.register(Merged((await self._families())[0]))
        return registry

    async def status(self) -> dict:
        kernel = pod_kernel_counters(self.proxy) if self.proxy else {}
        pods = [{"pod": p.key, "ip": p.info.ip, "slot": p.slot, "kernel": kernel[p.key]}
                for p in self.proxy.pods.values()] if self.proxy else []
        identities = self.identities.expirations() if self.proxy else {}
        families, open_connections = await self._families() if self.proxy else ([], 0)
        unserved = sorted(self.proxy.view.unserved.items())[:MAX_UNSERVED_SHOWN] if self.proxy else []
        return {"node": self.config.node_name, "ready": self.ready, "lifecycle": self.lifecycle.value,
                "datapath_problem": self._datapath_problem, "uptime_s": round(time.time() - self.started, 1),
                "view_problems": self._problems, "not_served": [f"{what}: {why}" for what, why in unserved],
                "datapath": self.load_report, "pods": pods, "identities": identities,
                "not_enrolled": [{"pod": key, "reason": reason}
                                 for key, reason in sorted(self.not_enrolled.reasons().items())],
                "workers": [os.getpid()] + (self.workers.pids() if self.workers else []),
                "certificates_issued": self.identities.issued if self.proxy else 0,
                "open_connections": open_connections,
                "tap_subscribers": len(self.proxy.tap.subscriptions) if self.proxy else 0,
                "tap_events_dropped": self.proxy.tap.dropped if self.proxy else 0,
                "listeners": [listener.report() for listener in self.listeners],
                "settings": self.reloads.status(self.config) if self.reloads else None,
                "counters": [{"name": name, "labels": labels, "value": value}
                             for _, _, _, samples in families for name, labels, value in samples
                             if not name.endswith("_created")]}


def run_agent(settings: AgentSettings, source, reloads: SettingsReloads | None = None) -> None:
    """Run until SIGTERM or SIGINT, then drain until the deadline or a second signal."""
    import uvloop

    heap.limit_arenas()  # first: before any thread has an arena of its own
    memory.start_tracing()  # only if NODEAGENT_TRACEMALLOC asks for it (workers inherit it)

    async def main():
        stop, hurry = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: (hurry if stop.is_set() else stop).set())
        await Agent(settings, source, reloads).run(stop, hurry)

    uvloop.run(main())
