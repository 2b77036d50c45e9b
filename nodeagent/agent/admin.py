"""The agent's HTTP endpoints, on two listeners.

- admin (`--admin`, loopback only; 127.0.0.1:4191 by default): /live, /ready,
  /metrics, /stats (JSON), /edges (JSON: observe/edges.py), /tap (request metadata,
  JSON lines) and /debug/memory (JSON: what each process holds, agent/memory.py;
  `?trim=1` also returns glibc's free memory to the kernel).
- metrics (`--metrics`, optional; the pod's or node's address, for Prometheus
  and kubelet probes): /live, /ready and /metrics, nothing else.

/tap, /stats and /edges show who talks to whom and when, so they stay on loopback
rather than behind authentication: nothing to issue or rotate, and operators
still reach them through `kubectl port-forward` (which connects inside the
agent pod's network namespace, under RBAC on pods/portforward) or on the node.

/tap?pod=P&namespace=N&to=svc/ns/name&method=GET&path=/prefix&max=100&seconds=30
ends after `max` events or `seconds` (at most MAX_TAP_SECONDS), or when the
client goes away.

One request per connection, answered with `connection: close`. Every
connection is bounded (Limits; ARCHITECTURE.md, "Admin and metrics
listeners"): its URL and head, the time to send the head, the time the answer
may take to be read, the number of connections per listener and per peer
address; a tap reader that does not keep up is not written to (its events are
dropped in the tap hub, counted) rather than buffered.
"""

import asyncio
import enum
import ipaddress
import json
import logging
import urllib.parse
from collections import Counter
from dataclasses import dataclass

import httptools
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from nodeagent.agent.merge import families_of
from nodeagent.observe.edges import document as edges_document
from nodeagent.proxy.tap import TapFull

log = logging.getLogger("nodeagent.admin")
MAX_TAP_SECONDS = 3600
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 408: "Request Timeout", 414: "URI Too Long",
           431: "Request Header Fields Too Large", 503: "Service Unavailable"}


@dataclass(frozen=True)
class Limits:
    max_url_bytes: int = 8 * 1024  # a longer request target: 414
    max_head_bytes: int = 16 * 1024  # a longer head: 431
    head_timeout_s: float = 5.0  # the whole head must arrive within this: else 408 (slowloris)
    answer_timeout_s: float = 10.0  # after the answer, the client has this long to read it and close
    error_linger_s: float = 1.0  # after an error answer (400, 408, 414, 431), nothing more is read: close then
    max_connections: int = 64  # per listener; beyond: 503 and close
    max_connections_per_peer: int = 64  # per client address, within the above
    write_high_water: int = 64 * 1024  # a tap stream stops taking events while more waits to be sent


ADMIN_LIMITS = Limits()
# The metrics listener faces the cluster: one address (a pod) cannot take every slot.
METRICS_LIMITS = Limits(max_connections_per_peer=8)


class State(enum.Enum):
    READING_HEAD = "reading head"
    ANSWERING = "answering"  # a handler runs (a scrape gathers from the workers)
    STREAMING = "streaming"  # tap
    ANSWERED = "answered"  # everything written and the write side closed; waiting for the client to close


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def require_loopback(host: str) -> None:
    """The admin listener serves /tap and /stats: only on a loopback address."""
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the admin address must be a loopback address (127.0.0.1, ::1), not {host!r}: "
                         f"/tap and /stats stay private; serve Prometheus and probes with --metrics")


class Listener:
    """One listening address: what it serves, its limits, and who is connected."""

    def __init__(self, agent, name: str, private: bool, limits: Limits):
        self.agent, self.name, self.private, self.limits = agent, name, private, limits
        self.routes = _routes(agent, private)
        self.per_peer: Counter = Counter()
        self.open = 0
        self.refused = 0  # connections over a cap
        self.errors: Counter = Counter()  # answers with an error status, by status

    def admit(self, peer: str) -> bool:
        if self.open >= self.limits.max_connections or self.per_peer[peer] >= self.limits.max_connections_per_peer:
            self.refused += 1
            return False
        self.open += 1
        self.per_peer[peer] += 1
        return True

    def release(self, peer: str) -> None:
        self.open -= 1
        self.per_peer[peer] -= 1
        if not self.per_peer[peer]:
            del self.per_peer[peer]

    def report(self) -> dict:
        return {"listener": self.name, "open": self.open, "refused": self.refused,
                "errors": {str(status): count for status, count in sorted(self.errors.items())}}


def _head(status: int, content_type: str, length: int | None = None) -> bytes:
    framing = f"content-length: {length}" if length is not None else "transfer-encoding: chunked"
    return (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\ncontent-type: {content_type}\r\n"
            f"{framing}\r\nconnection: close\r\n\r\n").encode()


class AdminConnection(asyncio.Protocol):
    def __init__(self, listener: Listener):
        self.listener, self.limits = listener, listener.limits
        self.state = State.READING_HEAD
        self.parser = httptools.HttpRequestParser(self)
        self.url = bytearray()
        self.head_bytes = 0  # fed to the parser while reading the head
        self.task: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.admitted = False
        self.writable = asyncio.Event()
        self.writable.set()

    # --- connection ---

    def connection_made(self, transport):
        self.transport = transport
        self.peer = str((transport.get_extra_info("peername") or ("?",))[0])
        if not self.listener.admit(self.peer):
            transport.write(self._error_answer(503, "too many connections to this listener\n"))
            transport.close()  # a few bytes: the socket's buffer takes them, nothing is held
            return
        self.admitted = True
        transport.set_write_buffer_limits(high=self.limits.write_high_water)
        self._deadline(self.limits.head_timeout_s, self._too_slow)

    def connection_lost(self, exc):
        if self.timer:
            self.timer.cancel()
        if self.task:
            self.task.cancel()
        if self.admitted:
            self.listener.release(self.peer)
            self.admitted = False

    def pause_writing(self):
        self.writable.clear()

    def resume_writing(self):
        self.writable.set()

    def eof_received(self):
        return False  # the client is done (or gave up): close our side too

    def _deadline(self, seconds: float, callback) -> None:
        if self.timer:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(seconds, callback)

    def _too_slow(self) -> None:
        self._refuse(408, "the request head took too long\n")

    def data_received(self, data):
        if self.state is not State.READING_HEAD:
            return  # a body, or what follows the one request we serve: not read
        # The parser is never fed past the head limit (it keeps a header's name and value whole).
        allowed = self.limits.max_head_bytes - self.head_bytes
        self.head_bytes += min(len(data), allowed)
        try:
            self.parser.feed_data(data[:allowed])
            if self.state is State.READING_HEAD and self.head_bytes >= self.limits.max_head_bytes:
                raise Refused(431, f"the request head is over {self.limits.max_head_bytes} bytes\n")
        except (Refused, httptools.HttpParserError) as e:
            if self.state is not State.READING_HEAD:
                return  # answered already: what followed the head (a pipelined request) is not served
            cause = e.__context__ if isinstance(e, httptools.HttpParserCallbackError) else e
            if isinstance(cause, Refused):
                self._refuse(cause.status, str(cause))
                return
            if isinstance(e, httptools.HttpParserCallbackError):  # our own code failed: say how
                log.error("admin %s: a request from %s failed", self.listener.name, self.peer, exc_info=cause)
            self._refuse(400, "bad request\n")

    # --- httptools callbacks ---

    def on_url(self, url):
        if len(self.url) + len(url) > self.limits.max_url_bytes:
            raise Refused(414, f"the request target is over {self.limits.max_url_bytes} bytes\n")
        self.url += url

    def on_headers_complete(self):
        # Admin requests carry no body: answer at the end of the head and read no further.
        self.state = State.ANSWERING
        if self.timer:
            self.timer.cancel()
        target = urllib.parse.urlsplit(self.url.decode("latin-1"))
        query = dict(urllib.parse.parse_qsl(target.query))
        if target.path == "/tap" and self.listener.private:
            self.task = asyncio.get_running_loop().create_task(self._tap(query))
            return
        if target.path == "/debug/memory" and self.listener.private:
            self.task = asyncio.get_running_loop().create_task(self._answer_when_ready(self._memory(query)))
            return
        handler = self.listener.routes.get(target.path)
        if handler is None:
            self._answer(*self._error(404, "not found\n"))
            return
        answer = handler()
        if asyncio.iscoroutine(answer):  # it gathers from the worker processes first
            self.task = asyncio.get_running_loop().create_task(self._answer_when_ready(answer))
        else:
            self._answer(*answer)

    # --- answers ---

    def _error(self, status: int, message: str) -> tuple[int, str, bytes]:
        self.listener.errors[status] += 1
        return status, "text/plain", message.encode()

    def _refuse(self, status: int, message: str) -> None:
        """An error answer, and nothing more read: what the client still sends stays in the kernel
        (its sending stalls), and the connection goes after `error_linger_s`."""
        self.transport.pause_reading()
        self._answer(*self._error(status, message))
        self._deadline(self.limits.error_linger_s, self.transport.abort)

    def _error_answer(self, status: int, message: str) -> bytes:
        status, content_type, body = self._error(status, message)
        return _head(status, content_type, len(body)) + body

    async def _answer_when_ready(self, answer):
        self._answer(*await answer)

    def _answer(self, status: int, content_type: str, body: bytes) -> None:
        if self.transport.is_closing():  # the client went away meanwhile (uvloop refuses writes then)
            return
        self.transport.write(_head(status, content_type, len(body)) + body)
        self._finish()

    def _finish(self) -> None:
        """Half-close and wait for the client's close (closing first, with input unread, would reset
        the connection and could lose the answer); what it still sends is discarded."""
        self.state = State.ANSWERED
        if not self.transport.is_closing():
            self.transport.write_eof()
        self._deadline(self.limits.answer_timeout_s, self.transport.abort)

    async def _tap(self, query: dict):
        agent = self.listener.agent
        if agent.proxy is None:
            self._answer(*self._error(503, "not ready\n"))
            return
        try:
            limit = int(query.pop("max", "1000000"))
            seconds = min(float(query.pop("seconds", MAX_TAP_SECONDS)), MAX_TAP_SECONDS)
            subscription = agent.proxy.tap.subscribe(query)  # refuses filters it does not know
        except ValueError as e:
            self._answer(*self._error(400, f"{e}\n"))
            return
        except TapFull as e:
            self._answer(*self._error(503, f"{e}\n"))
            return
        self.state = State.STREAMING
        self.transport.write(_head(200, "application/x-ndjson"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        try:
            for _ in range(limit):
                remaining = deadline - loop.time()
                if remaining <= 0 or self.transport.is_closing():
                    break
                try:
                    event = await asyncio.wait_for(self._next_event(subscription.queue), remaining)
                except asyncio.TimeoutError:
                    break
                if self.transport.is_closing():  # the client went away while we waited
                    break
                line = json.dumps(event).encode() + b"\n"
                self.transport.write(b"%x\r\n%s\r\n" % (len(line), line))
            if not self.transport.is_closing():
                self.transport.write(b"0\r\n\r\n")
                self._finish()
        finally:
            agent.proxy.tap.unsubscribe(subscription)

    async def _memory(self, query: dict) -> tuple[int, str, bytes]:
        report = await self.listener.agent.memory_report(trim=query.get("trim") == "1")
        return 200, "application/json", json.dumps(report, indent=1).encode()

    async def _next_event(self, queue: asyncio.Queue) -> dict:
        """The next event, once the client has taken what was written: while it lags, events
        stay in (and then drop from) the subscription's bounded queue, not in our buffer."""
        await self.writable.wait()
        return await queue.get()


def _routes(agent, private: bool) -> dict:
    def live():
        return 200, "text/plain", b"live\n"

    def ready():
        return (200, "text/plain", b"ready\n") if agent.ready else (503, "text/plain", b"not ready\n")

    async def stats():
        return 200, "application/json", json.dumps(await agent.status(), indent=1).encode()

    async def metrics():
        if agent.proxy is None:
            return 503, "text/plain", b"not ready\n"
        return 200, CONTENT_TYPE_LATEST, generate_latest(await agent.metrics_registry())

    async def edges():
        if agent.proxy is None:
            return 503, "text/plain", b"not ready\n"
        samples = [s for family in families_of(await agent.metrics_registry()) for s in family[3]]
        document = edges_document(agent.config.node_name, samples, agent.proxy.view, agent.config.trust_domain,
                                  [pod.info for pod in agent.proxy.pods.values()])
        return 200, "application/json", json.dumps(document, indent=1).encode()

    public = {"/live": live, "/ready": ready, "/metrics": metrics}
    return {**public, "/stats": stats, "/edges": edges} if private else public


async def serve_admin(agent, host: str, port: int,
                      limits: Limits = ADMIN_LIMITS) -> tuple[asyncio.AbstractServer, Listener]:
    """Everything, /tap and /stats included: on loopback only."""
    require_loopback(host)
    listener = Listener(agent, "admin", True, limits)
    # reuse_port: a successor sharing this namespace (an upgrade in the lab) binds it while we drain.
    server = await asyncio.get_running_loop().create_server(lambda: AdminConnection(listener), host, port,
                                                            reuse_port=True)
    return server, listener


async def serve_metrics(agent, host: str, port: int,
                        limits: Limits = METRICS_LIMITS) -> tuple[asyncio.AbstractServer, Listener]:
    """/metrics, /live and /ready only: for Prometheus and kubelet probes, on any address."""
    listener = Listener(agent, "metrics", False, limits)
    server = await asyncio.get_running_loop().create_server(lambda: AdminConnection(listener), host, port,
                                                            reuse_port=True)
    return server, listener
