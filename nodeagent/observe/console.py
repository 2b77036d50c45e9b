"""`nodeagent dashboard`: the web console, a process of its own that reads the agents' admin ports
(never part of an agent) and serves HTML on loopback.

Threads: one poller (every `interval_s`: each agent's /metrics and /edges, reduced to a
Snapshot), one per browser connection, and for each tap stream one reader per agent.

Bounds: HISTORY snapshots; MAX_CONNECTIONS browser connections at once (more: 503 at once);
MAX_TAP_STREAMS tap streams (each holds one of the agent's 8 tap slots per agent), each with a
queue of TAP_BUFFER events (a browser slower than the traffic loses events, counted and shown),
TAP_RECENT events for its routes table, and TAP_STREAM_SECONDS of life (the browser's
EventSource then opens a new one); a browser that stops reading is dropped after
SOCKET_TIMEOUT_S. The browser keeps at most pages.TAP_ROWS tap rows.

Loopback only, like the agents' admin ports, and a request must name the loopback address it
was sent to in its Host header (a web page elsewhere cannot reach it by DNS rebinding).
"""

import logging
import queue
import threading
import time
import urllib.parse
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from nodeagent.agent.admin import require_loopback
from nodeagent.observe import admin_client, pages, snapshot
from nodeagent.observe.aggregate import roll_up

log = logging.getLogger("nodeagent.console")
WINDOW_S = 10.0  # rates are computed over about this long
MAX_CONNECTIONS = 32
MAX_TAP_STREAMS = 4
TAP_BUFFER = 256
TAP_RECENT = 1000
TAP_STREAM_SECONDS = 300
SOCKET_TIMEOUT_S = 10
HEARTBEAT_S = 5
STATIC = {"console.js": "text/javascript", "console.css": "text/css"}


class Poller:
    """The agents' reports, polled every `interval_s`; the last few kept for rates."""

    def __init__(self, admins: list[str], interval_s: float):
        self.admins, self.interval_s = admins, interval_s
        self.history: deque[snapshot.Snapshot] = deque(maxlen=max(2, round(WINDOW_S / interval_s) + 1))
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    def poll(self) -> None:
        reports, errors = [], []
        for admin in self.admins:
            try:
                reports.append((admin_client.scrape(admin), admin_client.fetch_json(admin, "/edges")))
            except (OSError, ValueError) as e:
                errors.append(f"agent {admin} did not answer: {e}")
        taken = snapshot.reduce(time.monotonic(), reports, errors)
        with self.lock:
            self.history.append(taken)

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # a bad document must not end the console: say so and poll again
                log.exception("polling the agents failed")

    def window(self) -> pages.Window:
        with self.lock:
            return pages.Window(self.history[0] if len(self.history) > 1 else None, self.history[-1])


class TapSession:
    """One browser's tap of one workload: a reader per agent, into one bounded queue."""

    def __init__(self, admins: list[str], wants, seconds: float):
        self.admins, self.wants, self.seconds = admins, wants, seconds
        self.items: queue.Queue = queue.Queue(TAP_BUFFER)  # ("event", dict) or ("problem", str)
        self.dropped = 0
        self.streams: list[admin_client.TapStream] = []
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.closed = False

    def start(self) -> None:
        for admin in self.admins:
            thread = threading.Thread(target=self._read, args=(admin,), daemon=True, name=f"tap {admin}")
            thread.start()
            self.threads.append(thread)

    def _offer(self, item: tuple) -> None:
        try:
            self.items.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    def _read(self, admin: str) -> None:
        try:
            stream = admin_client.TapStream(admin, {}, 1_000_000, self.seconds)
            with self.lock:
                self.streams.append(stream)
                if self.closed:
                    stream.close()
            for event in stream:
                if self.wants(event):
                    self._offer(("event", event))
        except (OSError, RuntimeError, ValueError) as e:
            if not self.closed:
                log.warning("tap of %s failed: %s", admin, e)
                self._offer(("problem", f"tap of agent {admin}: {e}"))

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for stream in self.streams:
                stream.close()
        for thread in self.threads:
            thread.join(timeout=2)


def workload_filter(taken: snapshot.Snapshot, key: str):
    """Requests from the workload's pods, or to it (a peer that is the workload)."""
    pods = set(taken.pods_of(key))

    def wants(event: dict) -> bool:
        return f"{event['namespace']}/{event['pod']}" in pods or taken.peers.get(event["destination"]) == key

    return wants


class ConsoleServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], poller: Poller):
        self.poller = poller
        self.connection_slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.tap_slots = threading.BoundedSemaphore(MAX_TAP_STREAMS)
        super().__init__(address, Handler)
        port = self.server_address[1]
        self.hosts = {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}

    def process_request(self, request, client_address):
        if not self.connection_slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connection_slots.release()


class Handler(BaseHTTPRequestHandler):
    server: ConsoleServer
    timeout = SOCKET_TIMEOUT_S

    def log_message(self, format, *args):
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self):
        if self.headers.get("Host") not in self.server.hosts:
            self._send(403, "text/plain", b"the console answers requests for its loopback address only\n")
            return
        target = urllib.parse.urlsplit(self.path)
        path, live = urllib.parse.unquote(target.path), "part=live" in target.query
        try:
            if path.startswith("/static/") and path[len("/static/"):] in STATIC:
                name = path[len("/static/"):]
                self._send(200, STATIC[name], (resources.files("nodeagent.observe") / "static" / name).read_bytes())
            elif path.startswith("/tap/"):
                self._tap(path[len("/tap/"):])
            else:
                self._page(path, live)
        except OSError as e:  # the browser went away
            log.debug("console connection from %s ended: %s", self.address_string(), e)

    def _page(self, path: str, live_only: bool) -> None:
        window = self.server.poller.window()
        if path == "/":
            title, live, extra = "Namespaces", pages.overview_live(window), ""
        elif path == "/edges":
            title, live, extra = "Edges", pages.edges_live(window), ""
        elif path.startswith("/namespaces/") and path.count("/") == 2:
            namespace = path.split("/")[2]
            title, live, extra = f"Namespace {namespace}", pages.namespace_live(window, namespace), ""
        elif path.startswith("/workloads/") and path.count("/") >= 4:
            key = path[len("/workloads/"):]
            title, live, extra = pages.workload_title(key), pages.workload_live(window, key), pages.workload_extra(key)
        else:
            self._send(404, "text/plain", b"not found\n")
            return
        body = live if live_only else pages.page(title, urllib.parse.quote(path) + "?part=live", live, extra)
        self._send(200, "text/html; charset=utf-8", body.encode())

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.send_header("cache-control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _event(self, kind: str, data: str) -> None:
        lines = "".join(f"data: {line}\n" for line in data.splitlines() or [""])
        self.wfile.write(f"event: {kind}\n{lines}\n".encode())
        self.wfile.flush()

    def _tap(self, key: str) -> None:
        if not self.server.tap_slots.acquire(blocking=False):
            self._send(503, "text/plain", f"{MAX_TAP_STREAMS} taps are open already\n".encode())
            return
        session = TapSession(self.server.poller.admins, workload_filter(self.server.poller.window().after, key),
                             TAP_STREAM_SECONDS)
        try:
            session.start()
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("cache-control", "no-store")
            self.end_headers()
            self.wfile.write(b"retry: 2000\n\n")
            self._stream(session)
        finally:
            session.close()
            self.server.tap_slots.release()

    def _stream(self, session: TapSession) -> None:
        recent: deque[dict] = deque(maxlen=TAP_RECENT)
        end = time.monotonic() + TAP_STREAM_SECONDS
        routes_at = spoken_at = time.monotonic()
        changed, dropped = False, 0
        while time.monotonic() < end:
            try:
                kind, item = session.items.get(timeout=1)
            except queue.Empty:
                kind, item = None, None
            if kind == "event":
                recent.append(item)
                changed = True
                self._event("tap", pages.tap_row(item))
                spoken_at = time.monotonic()
            elif kind == "problem":
                self._event("problem", item)  # shown as text (console.js)
            now = time.monotonic()
            if changed and now - routes_at >= 1:
                self._event("routes", pages.routes_table(roll_up(list(recent))))
                routes_at, changed = now, False
            if session.dropped != dropped:
                dropped = session.dropped
                self._event("problem", f"{dropped} tap events dropped: the browser reads slower than they come")
            if now - spoken_at >= HEARTBEAT_S:
                self.wfile.write(b": still here\n\n")  # notices a browser that went away
                self.wfile.flush()
                spoken_at = now


def serve(admins: list[str], host: str, port: int, interval_s: float) -> ConsoleServer:
    """Poll once, then serve (the caller runs `serve_forever`) and keep polling in a thread."""
    require_loopback(host)
    poller = Poller(admins, interval_s)
    poller.poll()
    server = ConsoleServer((host, port), poller)
    threading.Thread(target=poller.run, daemon=True, name="poller").start()
    return server
