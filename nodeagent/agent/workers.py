"""The agent's worker processes, seen from the agent (`agent/worker.py` is the other side).

A Python process is one core. With `--workers N` the agent is the first of N
proxy processes: it keeps everything that must happen once per node (the
cluster source, enrolment and inbound steering in the data path, identity
issuance for its own proxy, the admin port) and tells N-1 workers what to
serve. Every process listens in every enrolled pod with SO_REUSEPORT, so the
kernel spreads the pods' connections over them. Per-pod state in a worker is
its three listening sockets and a small context; nothing is per pod per
process beyond that.

The view goes to a worker whole once, when it starts; after that each change as the
Delta that made the agent's next view, which the worker applies to its own copy.
The agent's TLS ticket secret goes to each worker before anything else (and again when
the agent rotates it), so that every process resumes the others' tickets (proxy/tickets.py).
A worker that dies is started again and given the current view and pods; its
connections are lost (as with a restarted sidecar). Scrapes and tap gather the
workers' metrics and events into the agent's.
"""

import asyncio
import itertools
import logging
import socket
import subprocess
import sys

from nodeagent.agent import channel
from nodeagent.settings import AgentSettings

log = logging.getLogger("nodeagent.agent")
SCRAPE_TIMEOUT_S = 2.0
# A proxy process's resident memory under load, with room: issue 16 saw 13 processes fill the
# DaemonSet's 512 MiB limit (~39 MiB each) and the kernel kill the agent.
PROCESS_MEMORY_BYTES = 48 << 20
MEMORY_LIMIT_ENV = "NODEAGENT_MEMORY_LIMIT"  # the container's limit (the DaemonSet's downward API)


def automatic_processes(cores: int, memory_limit: str | None) -> int:
    """With --workers 0: one process per core the agent may use, as many as its memory limit
    holds (at least one). `memory_limit` in bytes, as the downward API gives it; none: no bound."""
    if not memory_limit or not memory_limit.strip().isdigit():
        return cores
    return max(1, min(cores, int(memory_limit) // PROCESS_MEMORY_BYTES))


def view_message(previous, view) -> tuple:
    """What brings a worker holding `previous` to `view`: the delta that made it when there is
    one (a few records), else the whole view (a new worker, a source that rebuilds)."""
    if previous is not None and view.delta is not None and view.version == previous.version + 1:
        return ("delta", view.delta, view.version)
    return ("view", view)


class _Process:
    def __init__(self, index: int, settings: AgentSettings, processes: int, on_message):
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with child:
            self.popen = subprocess.Popen([sys.executable, "-m", "nodeagent.agent.worker", str(child.fileno())],
                                          pass_fds=[child.fileno()], stdin=subprocess.DEVNULL)
        self.index = index
        self.tap_dropped = 0  # tap events the worker dropped, as it last reported
        self.endpoint = channel.Endpoint(parent, lambda message, fds: on_message(self, message, fds),
                                         name=f"agent-worker{index}")
        # The agent's count of proxy processes (automatic_processes may cap it by memory): each
        # process's share of the node's connections and memory budget is divided by it.
        self.endpoint.post(("settings", index, settings, processes))


class Workers:
    def __init__(self, count: int, settings: AgentSettings, tap_hub, ticket_secret=None):
        self.count = count
        self.ticket_secret = ticket_secret  # proxy/tickets.py: every process's ticket keys derive from it
        self.settings = settings
        self.tap_hub = tap_hub
        self.loop = asyncio.get_running_loop()
        self.view = None
        self.pods: dict[int, object] = {}  # cookie -> the agent's PodContext
        self.processes: list[_Process] = []
        self._scrapes: dict[int, tuple[asyncio.Future, dict]] = {}
        self._ids = itertools.count()
        self._stopping = False
        tap_hub.on_change = self._tap_changed

    def start(self) -> None:
        self.processes = [self._spawn(i + 1) for i in range(self.count)]

    def _spawn(self, index: int) -> _Process:
        process = _Process(index, self.settings, self.count + 1, self._from_worker)
        if self.ticket_secret is not None:  # before any pod: the first contexts get the keys
            process.endpoint.post(("ticket-secret", self.ticket_secret))
        if self.view is not None:
            process.endpoint.post(("view", self.view))
        for pod in self.pods.values():
            process.endpoint.post(("add", pod.info, pod.slot), (pod.netns_fd,))
        if self.tap_hub.subscriptions:
            process.endpoint.post(("tap", True))
        return process

    def _broadcast(self, message, fds: tuple[int, ...] = ()) -> None:
        for process in self.processes:
            process.endpoint.post(message, fds)

    # --- what the agent tells them ---

    def update_view(self, view) -> None:
        previous, self.view = self.view, view
        self._broadcast(view_message(previous, view))

    def add_pod(self, pod) -> None:
        self.pods[pod.cookie] = pod
        self._broadcast(("add", pod.info, pod.slot), (pod.netns_fd,))

    def remove_pod(self, cookie: int, deleted: bool) -> None:
        self.pods.pop(cookie, None)
        self._broadcast(("remove", cookie, deleted))

    def reconfigure(self, settings: AgentSettings) -> None:
        """Settings changed live (live_settings.py): every worker applies them; one started later gets them."""
        self.settings = settings
        self._broadcast(("reconfigure", settings))

    def rotate_ticket_secret(self, secret) -> None:
        """The agent's new ticket secret (proxy/tickets.py), for every worker and those started later."""
        self.ticket_secret = secret
        self._broadcast(("ticket-secret", secret))

    def _tap_changed(self) -> None:
        self._broadcast(("tap", bool(self.tap_hub.subscriptions)))

    # --- what they tell the agent (called from reader threads) ---

    def _from_worker(self, process: _Process, message, fds) -> None:
        self.loop.call_soon_threadsafe(self._handle, process, message)

    def _handle(self, process: _Process, message) -> None:
        kind = message[0]
        if kind in ("scrape", "memory"):
            scrape_id, reply = message[1], message[2:]
            future, replies = self._scrapes.get(scrape_id, (None, None))
            if future is not None:
                replies[process.index] = reply
                if len(replies) == len(self.processes) and not future.done():
                    future.set_result(None)
        elif kind == "events":
            _, generation, events, dropped = message
            for event in events:
                self.tap_hub.publish(lambda event=event: event)
            # The worker's count of events it could not forward, a running total.
            self.tap_hub.dropped += dropped - process.tap_dropped
            process.tap_dropped = dropped
            process.endpoint.post(("tap-ack", generation))  # the worker may send its next batch

    async def scrape(self) -> list[tuple[list, int]]:
        """Each live worker's (metric families, open connections); a worker that does not answer
        within SCRAPE_TIMEOUT_S is left out of this scrape."""
        return await self._gather(("scrape",))

    async def memory(self, trim: bool) -> list[dict]:
        """Each live worker's memory report (agent/memory.py), as `scrape` gathers."""
        return [reply[0] for reply in await self._gather(("memory", trim))]

    async def _gather(self, request: tuple) -> list[tuple]:
        """Ask every worker (`request` with an id after its kind) and collect the replies."""
        if not self.processes:
            return []
        scrape_id = next(self._ids)
        future, replies = self.loop.create_future(), {}
        self._scrapes[scrape_id] = (future, replies)
        self._broadcast((request[0], scrape_id, *request[1:]))
        try:
            await asyncio.wait_for(asyncio.shield(future), SCRAPE_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("workers %s did not answer a %s",
                        sorted({p.index for p in self.processes} - set(replies)), request[0])
        finally:
            self._scrapes.pop(scrape_id, None)
        return [replies[index] for index in sorted(replies)]  # in the workers' order, whoever answered first

    # --- life and death ---

    def check(self) -> None:
        """Start again any worker that died (called from the agent's loop)."""
        for position, process in enumerate(self.processes):
            code = process.popen.poll()
            if code is not None and not self._stopping:
                log.error("worker %d exited with %s; starting it again", process.index, code)
                process.endpoint.close()
                self.processes[position] = self._spawn(process.index)

    def drain(self) -> None:
        """Each worker drains as the agent does; none is started again from here on."""
        self._stopping = True
        self._broadcast(("drain",))

    def stop(self, timeout_s: float = 3.0) -> None:
        self._stopping = True
        self._broadcast(("stop",))
        for process in self.processes:
            try:
                process.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()
            process.endpoint.close()

    def alive(self) -> int:
        return sum(process.popen.poll() is None for process in self.processes)

    def pids(self) -> list[int]:
        return [p.popen.pid for p in self.processes]
