"""The Kubernetes API: list and watch, and the reflectors that keep a local copy of what the
agent needs, correct across reconnects.

List+watch as client-go's reflector does it:
- the first list is served from the API server's cache (resourceVersion=0), so a thousand
  agents starting at once do not each make a quorum read of every pod from etcd; a relist
  after `410 Gone` reads at the latest version (paginated), since the cache may lag behind
  what we already saw;
- every event (and every BOOKMARK) moves the resourceVersion on; a watch that ends resumes
  from it, so no event between the two watches is lost;
- waits are jittered and exponential after a failure, after a watch that ended at once with
  nothing in it (a server or proxy closing every watch), and before relisting after a 410;
  watch timeouts are jittered so reconnections spread out;
- a stream cut inside a chunk (`IncompleteRead`) is a failure like any other, and nothing a
  watch raises ends the reflector's thread: it logs, backs off and goes on;
- TCP keepalive finds a half-open connection (the peer gone without a FIN) in about
  KEEPALIVE_IDLE_S + KEEPALIVE_COUNT * KEEPALIVE_INTERVAL_S.
Each reflector runs in a thread and turns objects into the view's records as they arrive;
the agent takes what changed through `KubeSource.poll()` (a new view, made from the last by
a Delta) and asks `problems()` whether any kind has gone unwatched for too long.
"""

import http.client
import json
import logging
import random
import socket
import ssl
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

from nodeagent.cluster.kubeconfig import ConfigError, Credentials, KubeConfig  # noqa: F401 (re-exported)
from nodeagent.cluster.model import MESH_LABEL, ClusterView, Delta, object_key

log = logging.getLogger("nodeagent.kube")
WATCH_TIMEOUT_S = 300  # at least; each watch asks for between this and twice this
PAGE_SIZE = 500
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
SHORT_WATCH_S = 1.0  # a watch that ends sooner with no event counts as a failure
STALE_AFTER_S = 60.0  # a kind unwatched for longer makes the agent not ready
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 15, 5, 3

RESOURCES = {  # kind -> API path
    "pods": "/api/v1/pods",
    "services": "/api/v1/services",
    "namespaces": "/api/v1/namespaces",
    "endpointslices": "/apis/discovery.k8s.io/v1/endpointslices",
}
# Finished pods have no address to serve: the server leaves them out.
SELECTORS = {"pods": {"fieldSelector": "status.phase!=Succeeded,status.phase!=Failed"}}


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status


class Gone(ApiError):
    """410: our resourceVersion is older than what the server keeps; relist."""


def _keepalive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    # Unacknowledged data (a request into a dead peer) gives up as soon.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                    1000 * (KEEPALIVE_IDLE_S + KEEPALIVE_COUNT * KEEPALIVE_INTERVAL_S))


class ApiClient:
    def __init__(self, config: KubeConfig, timeout_s: float = 10.0):
        self.config = config
        self.timeout_s = timeout_s
        self.credentials = Credentials(config)
        parsed = urllib.parse.urlsplit(config.server)
        self.https = parsed.scheme == "https"
        self.host, self.port = parsed.hostname, parsed.port or (443 if self.https else 80)
        self.prefix = parsed.path.rstrip("/")
        self._contexts: dict = {}  # (cert, key) -> ssl context

    def _context(self, cert_pem: str | None, key_pem: str | None) -> ssl.SSLContext:
        context = self._contexts.get((cert_pem, key_pem))
        if context is None:
            ca = self.config.ca_pem
            context = ssl.create_default_context(cadata=ca) if ca else ssl.create_default_context()
            if cert_pem and key_pem:
                with tempfile.TemporaryDirectory() as d:  # ssl loads client keys from files only
                    cert, key = Path(d, "c.crt"), Path(d, "c.key")
                    cert.write_text(cert_pem)
                    key.write_text(key_pem)
                    context.load_cert_chain(str(cert), str(key))
            self._contexts = {(cert_pem, key_pem): context}  # one credential at a time
        return context

    def _connect(self, timeout_s: float, credential) -> http.client.HTTPConnection:
        if self.https:
            conn = http.client.HTTPSConnection(
                self.host, self.port, timeout=timeout_s,
                context=self._context(credential.client_cert_pem, credential.client_key_pem))
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout_s)
        conn.connect()
        _keepalive(conn.sock)
        return conn

    def _request(self, method: str, path: str, params: dict, timeout_s: float, body: dict | None = None,
                 accept: str = "application/json") -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        for attempt in (1, 2):
            credential = self.credentials.current()
            conn = self._connect(timeout_s, credential)
            headers = {"Accept": accept}
            if credential.token:
                headers["Authorization"] = f"Bearer {credential.token}"
            data = None
            if body is not None:
                data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
            query = f"?{urllib.parse.urlencode(params)}" if params else ""
            conn.request(method, f"{self.prefix}{path}{query}", body=data, headers=headers)
            response = conn.getresponse()
            if response.status in (200, 201):
                return conn, response
            text = response.read().decode(errors="replace")[:500]
            conn.close()
            if response.status == 401 and attempt == 1:
                self.credentials.invalidate()  # rotated token, expired exec credential: fetch again
                continue
            raise (Gone if response.status == 410 else ApiError)(response.status, text)
        raise AssertionError("unreachable")

    def get(self, path: str, params: dict | None = None) -> dict:
        conn, response = self._request("GET", path, params or {}, self.timeout_s)
        try:
            return json.loads(response.read())
        finally:
            conn.close()

    def get_text(self, path: str, limit: int = 4 << 20) -> str:
        """A text answer (a pod's /metrics through the API server's proxy), at most `limit` bytes."""
        conn, response = self._request("GET", path, {}, self.timeout_s, accept="text/plain")
        try:
            data = response.read(limit + 1)
        finally:
            conn.close()
        if len(data) > limit:
            raise ApiError(response.status, f"{path}: longer than {limit} bytes")
        return data.decode(errors="replace")

    def post(self, path: str, body: dict) -> dict:
        conn, response = self._request("POST", path, {}, self.timeout_s, body)
        try:
            return json.loads(response.read())
        finally:
            conn.close()

    def list(self, path: str, params: dict, resource_version: str | None = None) -> tuple[list[dict], str]:
        """Every object, page by page; and the list's resourceVersion. resource_version "0": from
        the server's cache (it then sends everything at once); None: a consistent read."""
        items, token = [], None
        while True:
            query = {**params, "limit": PAGE_SIZE}
            if token:
                query["continue"] = token
            elif resource_version is not None:
                query["resourceVersion"] = resource_version
            page = self.get(path, query)
            items += page.get("items") or []
            token = page.get("metadata", {}).get("continue")
            if not token:
                return items, page["metadata"]["resourceVersion"]

    def watch(self, path: str, params: dict, resource_version: str,
              timeout_s: int = WATCH_TIMEOUT_S, on_open: Callable[[], None] = lambda: None) -> Iterator[dict]:
        """Watch events from `resource_version` until the server ends the stream."""
        conn, response = self._request("GET", path, {**params, "watch": "1", "resourceVersion": resource_version,
                                                     "allowWatchBookmarks": "true", "timeoutSeconds": timeout_s},
                                       timeout_s + 30)
        on_open()
        try:
            while line := response.readline():
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object", {})
                    code = status.get("code", 0)
                    raise (Gone if code == 410 else ApiError)(code, status.get("message", "watch error"))
                yield event
        finally:
            conn.close()


def backoff_s(attempt: int, rng: random.Random, base: float = BACKOFF_BASE_S, cap: float = BACKOFF_CAP_S) -> float:
    """Full jitter: a random wait up to base * 2^attempt, at most `cap`."""
    return rng.uniform(0, min(cap, base * (2 ** attempt)))


class Store:
    """The parsed records of every kind, and what changed since the last `take()`."""

    def __init__(self):
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, object]] = {kind: {} for kind in RESOURCES}
        self._pending = Delta()
        self.version = 0  # moves on each change
        self.synced: set[str] = set()

    def replace(self, kind: str, items: list[dict]) -> list[str]:
        """A (re)list: the new set of objects; returns the keys that vanished (deleted meanwhile)."""
        fresh = Delta().add(kind, items)
        parsed = getattr(fresh, kind)
        with self._lock:
            records, pending = self._records[kind], getattr(self._pending, kind)
            vanished = sorted(set(records) - set(parsed))
            for key in vanished:
                del records[key]
                pending[key] = None
            for key, record in parsed.items():
                if key not in records or records[key] != record:
                    records[key] = pending[key] = record
            for error in fresh.errors:
                self._pending.error(error)
            self.version += 1
            self.synced.add(kind)
        return vanished

    def apply(self, kind: str, event_type: str, obj: dict) -> None:
        key = object_key(obj)
        change = Delta()
        change.parse(kind, key, None if event_type == "DELETED" else obj)
        record = getattr(change, kind)[key]
        with self._lock:
            if event_type == "DELETED":
                self._records[kind].pop(key, None)
            else:
                self._records[kind][key] = record
            getattr(self._pending, kind)[key] = record
            for error in change.errors:
                self._pending.error(error)
            self.version += 1

    def take(self) -> Delta:
        with self._lock:
            delta, self._pending = self._pending, Delta()
            return delta

    def keys(self, kind: str) -> set[str]:
        with self._lock:
            return set(self._records[kind])

    def record(self, kind: str, key: str):
        with self._lock:
            return self._records[kind].get(key)


class Reflector(threading.Thread):
    def __init__(self, client: ApiClient, kind: str, store: Store, params: dict | None = None,
                 rng: random.Random | None = None, sleep: Callable[[float], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(name=f"reflector-{kind}", daemon=True)
        self.client, self.kind, self.store = client, kind, store
        self.path, self.params = RESOURCES[kind], {**SELECTORS.get(kind, {}), **(params or {})}
        self.rng, self.clock = rng or random.Random(), clock
        self.stopping = threading.Event()
        self.sleep = sleep or self.stopping.wait
        self.resource_version: str | None = None
        self.lists = self.watches = self.failures = 0
        self.last_error: str | None = None
        self.watching = False  # a watch stream is open
        self.last_in_sync = clock()  # when we last knew the copy was current
        self.listed_once = False

    def stop(self) -> None:
        self.stopping.set()

    def problem(self, stale_after_s: float = STALE_AFTER_S) -> str | None:
        """Why this kind's copy cannot be trusted now, or None."""
        if self.watching:
            return None
        idle = self.clock() - self.last_in_sync
        if idle <= stale_after_s:
            return None
        what = "not listed yet" if not self.listed_once else f"not watched for {idle:.0f} s"
        return f"{self.kind}: {what} ({self.failures} failures; last: {self.last_error or 'none'})"

    def run(self) -> None:
        attempt = 0
        while not self.stopping.is_set():
            wait = None
            try:
                if self.resource_version is None:
                    # First list from the cache; after a 410 a consistent one (the cache may lag).
                    items, self.resource_version = self.client.list(
                        self.path, self.params, "0" if not self.listed_once else None)
                    self.lists += 1
                    self.store.replace(self.kind, items)
                    self.listed_once, self.last_in_sync = True, self.clock()
                self.watches += 1
                started, events = self.clock(), 0
                timeout = int(WATCH_TIMEOUT_S * (1 + self.rng.random()))
                for event in self.client.watch(self.path, self.params, self.resource_version, timeout,
                                               on_open=self._opened):
                    if self.stopping.is_set():
                        return
                    obj = event["object"]
                    if event["type"] != "BOOKMARK":
                        self.store.apply(self.kind, event["type"], obj)
                    self.resource_version = obj["metadata"]["resourceVersion"]
                    self.last_in_sync, events = self.clock(), events + 1
                    attempt = 0
                self._closed()
                if events == 0 and self.clock() - started < SHORT_WATCH_S:
                    self._failed(f"the watch ended after {self.clock() - started:.2f} s with no event")
                    wait = backoff_s(attempt, self.rng)
                    attempt += 1
                # Otherwise the server ended the watch (its timeout): resume at once.
            except Gone as e:
                self._closed()
                self.resource_version = None  # relist, after a wait: many agents get the 410 together
                self.last_error = f"Gone: {e}"
                wait = backoff_s(attempt, self.rng)
                attempt += 1
            except (OSError, ApiError, ConfigError, ValueError, KeyError, TypeError,
                    http.client.HTTPException) as e:  # IncompleteRead: a stream cut inside a chunk
                self._closed()
                self._failed(f"{type(e).__name__}: {e}")
                wait = backoff_s(attempt, self.rng)
                attempt += 1
            except Exception as e:  # noqa: BLE001 (a bug must not end the thread silently)
                self._closed()
                log.exception("%s reflector: unexpected error", self.kind)
                self._failed(f"{type(e).__name__}: {e}")
                wait = backoff_s(attempt, self.rng)
                attempt += 1
            if wait is not None:
                self.sleep(wait)

    def _opened(self) -> None:
        self.watching, self.last_in_sync = True, self.clock()

    def _closed(self) -> None:
        if self.watching:
            self.last_in_sync = self.clock()
        self.watching = False

    def _failed(self, error: str) -> None:
        self.failures += 1
        if self.failures == 1 or self.failures % 10 == 0:
            log.warning("%s: %s (failure %d)", self.kind, error, self.failures)
        self.last_error = error


class KubeSource:
    """The cluster as the API serves it, as views in the same object model as the lab's manifests."""

    def __init__(self, client: ApiClient, mesh_label: str | None = None, stale_after_s: float = STALE_AFTER_S):
        self.store = Store()
        self.mesh_label = mesh_label or MESH_LABEL
        self.stale_after_s = stale_after_s
        self.view: ClusterView | None = None
        self.reflectors = [Reflector(client, kind, self.store) for kind in RESOURCES]
        for reflector in self.reflectors:
            reflector.start()

    def synced(self) -> bool:
        return self.store.synced == set(RESOURCES)

    def poll(self) -> ClusterView | None:
        """A new view if anything changed since the last call (its `delta` says what)."""
        if not self.synced():
            return None
        delta = self.store.take()
        if self.view is None:
            self.view = ClusterView(endpoint_slices=[], mesh_label=self.mesh_label).apply(delta)
        elif delta:
            self.view = self.view.apply(delta)
        else:
            return None
        return self.view

    def problems(self) -> list[str]:
        return [p for r in self.reflectors if (p := r.problem(self.stale_after_s))]

    def close(self) -> None:
        for reflector in self.reflectors:
            reflector.stop()
