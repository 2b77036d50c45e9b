"""A worker process of the agent: the same proxy, serving every enrolled pod, on another core.

Started by the agent (`agent/workers.py`) with one end of a channel
(`agent/channel.py`); it never talks to the cluster, never loads or writes the
data path's enrolment: the agent sends it its settings (again when they change
live), its TLS ticket secret (again when it rotates), the cluster view (whole once, then the deltas that change it), and
each pod to serve (with an fd on the pod's network namespace). It opens its
own SO_REUSEPORT listeners in each pod, next to the agent's, so the kernel
spreads the pods' connections over the processes. It answers the agent's
scrapes with its metrics and, while someone taps, forwards its tap events.
It dies with the agent (PR_SET_PDEATHSIG), so no worker outlives a killed agent.
"""

import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys
import time

from nodeagent.agent import channel, gc_tuning, heap, memory
from nodeagent.agent.merge import families_of
from nodeagent.settings import AgentSettings

log = logging.getLogger("nodeagent.worker")
PR_SET_PDEATHSIG = 1
RENEW_EVERY_S = 1.0
MAX_FORWARD_PENDING = 1000  # tap events waiting in a worker for the agent's acknowledgement


class TapForward:
    """Stands in for a tap subscriber in a worker: every event goes to the agent, which filters.
    One batch at a time is on its way (the agent acknowledges each); meanwhile at most
    MAX_FORWARD_PENDING events wait here, and further ones are dropped, counted in the worker's
    tap hub (the batches carry that count to the agent's /stats)."""

    def __init__(self, endpoint: channel.Endpoint, hub, generation: int):
        self.filters, self.dropped = {}, 0
        self.queue = self
        self.endpoint, self.hub, self.generation = endpoint, hub, generation
        self.pending: list[dict] = []
        self.in_flight = False

    def wants(self, event: dict) -> bool:
        return True

    def put_nowait(self, event: dict) -> None:
        if len(self.pending) >= MAX_FORWARD_PENDING:
            raise asyncio.QueueFull  # the hub counts it
        self.pending.append(event)
        if not self.in_flight:
            self._send()

    def acknowledged(self) -> None:
        self.in_flight = False
        if self.pending:
            self._send()

    def _send(self) -> None:
        batch, self.pending = self.pending, []
        self.in_flight = True
        self.endpoint.post(("events", self.generation, batch, self.hub.dropped))


class Worker:
    def __init__(self, sock: socket.socket, index: int, settings: AgentSettings, processes: int):
        self.index = index
        self.settings = settings
        self.processes = processes  # the agent's count, this one included (its share of node-wide bounds)
        self.sock = sock
        self.stop = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.proxy = None
        self.tap_forward = None
        self.tap_generation = 0
        self.trims = heap.PeriodicTrim()  # glibc's free memory back to the kernel (heap.py)

    def _on_message(self, message, fds) -> None:  # the reader thread
        self.loop.call_soon_threadsafe(self._handle, message, fds)

    def _on_closed(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)  # the agent is gone

    async def run(self) -> None:
        from nodeagent.datapath.control import Datapath
        from nodeagent.datapath.pins import PinLayout
        from nodeagent.identity.reload import IssuerFiles
        from nodeagent.identity.workload import WorkloadIdentities
        from nodeagent.proxy.server import Proxy

        s = self.settings
        issuer_files = IssuerFiles(s.identity_dir, time.monotonic())  # the issuer and its digest: one read
        self.identities = WorkloadIdentities(*issuer_files.current, s.cert_lifetime_delta)
        datapath = Datapath(PinLayout(s.pin_root, s.pin_name))
        self.proxy = Proxy(datapath, self.identities, s, owns_datapath=False,
                           processes=self.processes)
        self.endpoint = channel.Endpoint(self.sock, self._on_message, self._on_closed, name=f"worker{self.index}")
        self.endpoint.post(("ready", self.index))
        self.trims.start()
        try:
            while not self.stop.is_set():
                for identity in self.identities.renew_due():
                    log.info("worker %d: certificate for %s renewed", self.index, identity)
                if (changed := issuer_files.changed(time.monotonic())) is not None:
                    count = self.identities.replace_issuer(*changed)
                    log.info("worker %d: the issuer or trust anchors changed: %d identities issued again",
                             self.index, count)
                try:
                    await asyncio.wait_for(self.stop.wait(), RENEW_EVERY_S)
                except asyncio.TimeoutError:
                    pass
        finally:
            self.trims.stop()
            self.proxy.close_listeners()
            self.endpoint.close()
            datapath.close()

    def _handle(self, message, fds) -> None:
        kind = message[0]
        if kind == "view":
            self.proxy.update_view(message[1])
            gc_tuning.freeze_start_up()  # once (the whole view comes first): start-up's objects
        elif kind == "delta":
            _, delta, version = message
            view = self.proxy.view.apply(delta)
            if view.version != version:  # a lost message: cannot happen on one ordered channel
                log.error("worker %d: view %d from delta, the agent's is %d", self.index, view.version,
                          version)
            self.proxy.update_view(view)
        elif kind == "add":
            _, info, slot = message
            self.loop.create_task(self._add(info, fds[0], slot))
        elif kind == "remove":
            _, cookie, deleted = message
            if cookie in self.proxy.pods:
                self.loop.create_task(self._remove(cookie, deleted))
        elif kind == "scrape":
            self.endpoint.post(("scrape", message[1], families_of(self.proxy.metrics.registry),
                                self.proxy.open_connections))
        elif kind == "memory":
            self.endpoint.post(("memory", message[1], memory.report(self.proxy, trim_heap=message[2],
                                                                   trims=self.trims)))
        elif kind == "tap":
            self._tap(message[1])
        elif kind == "tap-ack":
            if self.tap_forward is not None and self.tap_forward.generation == message[1]:
                self.tap_forward.acknowledged()
        elif kind == "ticket-secret":
            self.identities.use_ticket_secret(message[1])
        elif kind == "reconfigure":
            self.settings = message[1]
            logging.getLogger().setLevel(self.settings.log_level.upper())
            self.proxy.apply_settings(self.settings)
        elif kind == "drain":
            self.loop.create_task(self.proxy.drain())
        elif kind == "stop":
            self.stop.set()

    async def _add(self, info, netns_fd: int, slot: int) -> None:
        identities = {self.proxy.identity_of(p.info) for p in self.proxy.pods.values()}
        self.identities.allow(identities | {self.proxy.identity_of(info)})
        try:
            await self.proxy.add_pod(info, netns_fd, slot)
        except OSError as e:
            log.error("worker %d: pod %s: cannot serve: %s", self.index, info.key, e)
            os.close(netns_fd)

    async def _remove(self, cookie: int, deleted: bool) -> None:
        await self.proxy.remove_pod(cookie, deleted)
        self.identities.allow({self.proxy.identity_of(p.info) for p in self.proxy.pods.values()})

    def _tap(self, on: bool) -> None:
        subscriptions = self.proxy.tap.subscriptions
        if on and self.tap_forward is None:
            self.tap_generation += 1
            self.tap_forward = TapForward(self.endpoint, self.proxy.tap, self.tap_generation)
            subscriptions.append(self.tap_forward)
        elif not on and self.tap_forward is not None:
            subscriptions.remove(self.tap_forward)
            self.tap_forward = None


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the agent died before we could ask
        os._exit(1)


def main() -> None:
    heap.limit_arenas()  # first: before any thread has an arena of its own
    _die_with_parent()
    sock = socket.socket(fileno=int(sys.argv[1]))
    message, _ = channel.receive(sock)
    _, index, settings, processes = message
    memory.start_tracing()  # only if NODEAGENT_TRACEMALLOC asks for it
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the agent decides when we stop (a drain first)

    import uvloop

    async def run():
        await Worker(sock, index, settings, processes).run()

    uvloop.run(run())


if __name__ == "__main__":
    main()
