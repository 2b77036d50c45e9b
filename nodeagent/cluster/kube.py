"""The Kubernetes API: configuration, list and watch, and the reflectors that
keep a local copy of what the agent needs, correct across reconnects.

List+watch as client-go's reflector does it:
- list (paginated) gives the objects and a resourceVersion; watch from it;
- every event (and every BOOKMARK) moves the resourceVersion on;
- a watch that ends (server timeout, dropped connection) resumes from the
  last resourceVersion, after a jittered exponential backoff if it failed,
  so no event between the two watches is lost;
- `410 Gone` (the server compacted past our version) means relist: objects
  missing from the new list are removed from the copy, as deletions.
Each reflector runs in a thread; the agent reads snapshots through `poll()`.
"""

import base64
import http.client
import json
import os
import random
import ssl
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from nodeagent.cluster.model import ClusterView

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
WATCH_TIMEOUT_S = 300
PAGE_SIZE = 500
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0

RESOURCES = {  # kind -> API path
    "pods": "/api/v1/pods",
    "services": "/api/v1/services",
    "namespaces": "/api/v1/namespaces",
    "endpointslices": "/apis/discovery.k8s.io/v1/endpointslices",
}


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status


class Gone(ApiError):
    """410: our resourceVersion is older than what the server keeps; relist."""


@dataclass(frozen=True)
class KubeConfig:
    server: str  # https://host:port (http:// only for test doubles)
    ca_pem: str | None = None
    token: str | None = None
    client_cert_pem: str | None = None
    client_key_pem: str | None = None

    @classmethod
    def in_cluster(cls, env: dict = os.environ, directory: Path = SERVICE_ACCOUNT_DIR) -> "KubeConfig":
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise ApiError(0, "not in a cluster: KUBERNETES_SERVICE_HOST is not set")
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", (directory / "ca.crt").read_text(),
                   (directory / "token").read_text().strip())

    @classmethod
    def from_kubeconfig(cls, path: Path, context: str | None = None) -> "KubeConfig":
        config = yaml.safe_load(path.read_text())
        name = context or config.get("current-context")
        ctx = next((c["context"] for c in config.get("contexts", []) if c["name"] == name), None)
        if ctx is None:
            raise ApiError(0, f"no context {name!r} in {path}")
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == ctx["cluster"])
        user = next((u["user"] for u in config.get("users", []) if u["name"] == ctx.get("user")), {})

        def data(section: dict, key: str) -> str | None:
            if f"{key}-data" in section:
                return base64.b64decode(section[f"{key}-data"]).decode()
            if key in section:
                return (path.parent / section[key]).read_text()
            return None

        token = user.get("token") or (Path(user["tokenFile"]).read_text().strip() if "tokenFile" in user else None)
        return cls(cluster["server"], data(cluster, "certificate-authority"), token,
                   data(user, "client-certificate"), data(user, "client-key"))


class ApiClient:
    def __init__(self, config: KubeConfig, timeout_s: float = 10.0):
        self.config = config
        self.timeout_s = timeout_s
        parsed = urllib.parse.urlsplit(config.server)
        self.https = parsed.scheme == "https"
        self.host, self.port = parsed.hostname, parsed.port or (443 if self.https else 80)
        self.context = None
        if self.https:
            self.context = ssl.create_default_context(cadata=config.ca_pem) if config.ca_pem else \
                ssl.create_default_context()
            if config.client_cert_pem and config.client_key_pem:
                with tempfile.TemporaryDirectory() as d:  # ssl loads client keys from files only
                    cert, key = Path(d, "c.crt"), Path(d, "c.key")
                    cert.write_text(config.client_cert_pem)
                    key.write_text(config.client_key_pem)
                    self.context.load_cert_chain(str(cert), str(key))

    def _request(self, path: str, params: dict, timeout_s: float) -> tuple[http.client.HTTPConnection,
                                                                            http.client.HTTPResponse]:
        if self.https:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout_s, context=self.context)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout_s)
        headers = {"Accept": "application/json"}
        if self.config.token:
            headers["Authorization"] = f"Bearer {self.config.token}"
        conn.request("GET", f"{path}?{urllib.parse.urlencode(params)}", headers=headers)
        response = conn.getresponse()
        if response.status != 200:
            body = response.read().decode(errors="replace")[:500]
            conn.close()
            raise (Gone if response.status == 410 else ApiError)(response.status, body)
        return conn, response

    def get(self, path: str, params: dict | None = None) -> dict:
        conn, response = self._request(path, params or {}, self.timeout_s)
        try:
            return json.loads(response.read())
        finally:
            conn.close()

    def list(self, path: str, params: dict) -> tuple[list[dict], str]:
        """Every object, page by page; and the list's resourceVersion."""
        items, token = [], None
        while True:
            page = self.get(path, {**params, "limit": PAGE_SIZE, **({"continue": token} if token else {})})
            items += page.get("items", [])
            token = page.get("metadata", {}).get("continue")
            if not token:
                return items, page["metadata"]["resourceVersion"]

    def watch(self, path: str, params: dict, resource_version: str,
              timeout_s: int = WATCH_TIMEOUT_S) -> Iterator[dict]:
        """Watch events from `resource_version` until the server ends the stream."""
        conn, response = self._request(path, {**params, "watch": "1", "resourceVersion": resource_version,
                                              "allowWatchBookmarks": "true", "timeoutSeconds": timeout_s},
                                       timeout_s + 30)
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


def object_key(obj: dict) -> str:
    meta = obj["metadata"]
    return f"{meta.get('namespace', '')}/{meta['name']}"


class Store:
    """The local copy of every kind, with a version that moves on each change."""

    def __init__(self):
        self._lock = threading.Lock()
        self._objects: dict[str, dict[str, dict]] = {kind: {} for kind in RESOURCES}
        self.version = 0
        self.synced: set[str] = set()

    def replace(self, kind: str, items: list[dict]) -> list[str]:
        """A relist: the new set of objects; returns the keys that vanished (deleted meanwhile)."""
        fresh = {object_key(o): o for o in items}
        with self._lock:
            vanished = sorted(set(self._objects[kind]) - set(fresh))
            self._objects[kind] = fresh
            self.version += 1
            self.synced.add(kind)
        return vanished

    def apply(self, kind: str, event_type: str, obj: dict) -> None:
        with self._lock:
            if event_type == "DELETED":
                self._objects[kind].pop(object_key(obj), None)
            else:
                self._objects[kind][object_key(obj)] = obj
            self.version += 1

    def snapshot(self) -> dict[str, list[dict]]:
        with self._lock:
            return {kind: list(objects.values()) for kind, objects in self._objects.items()}


class Reflector(threading.Thread):
    def __init__(self, client: ApiClient, kind: str, store: Store, params: dict | None = None,
                 rng: random.Random | None = None, sleep: Callable[[float], None] = time.sleep):
        super().__init__(name=f"reflector-{kind}", daemon=True)
        self.client, self.kind, self.store = client, kind, store
        self.path, self.params = RESOURCES[kind], params or {}
        self.rng, self.sleep = rng or random.Random(), sleep
        self.resource_version: str | None = None
        self.stopping = threading.Event()
        self.lists = self.watches = self.failures = 0
        self.last_error: str | None = None

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        attempt = 0
        while not self.stopping.is_set():
            try:
                if self.resource_version is None:
                    items, self.resource_version = self.client.list(self.path, self.params)
                    self.lists += 1
                    self.store.replace(self.kind, items)
                self.watches += 1
                for event in self.client.watch(self.path, self.params, self.resource_version):
                    if self.stopping.is_set():
                        return
                    obj = event["object"]
                    if event["type"] != "BOOKMARK":
                        self.store.apply(self.kind, event["type"], obj)
                    self.resource_version = obj["metadata"]["resourceVersion"]
                    attempt = 0
                # The server ended the watch (its timeout): resume at once from where we are.
            except Gone:
                self.resource_version = None  # relist
            except (OSError, ApiError, ValueError, KeyError) as e:
                self.failures += 1
                self.last_error = f"{type(e).__name__}: {e}"
                self.sleep(backoff_s(attempt, self.rng))
                attempt += 1


class KubeSource:
    """The cluster as the API serves it, in the same object model as the lab's manifests."""

    def __init__(self, client: ApiClient, mesh_label: str | None = None):
        self.store = Store()
        self.mesh_label = mesh_label
        self.reflectors = [Reflector(client, kind, self.store) for kind in RESOURCES]
        self._seen = -1
        for reflector in self.reflectors:
            reflector.start()

    def synced(self) -> bool:
        return self.store.synced == set(RESOURCES)

    def poll(self) -> ClusterView | None:
        if not self.synced() or self.store.version == self._seen:
            return None
        self._seen = self.store.version
        objects = self.store.snapshot()
        return ClusterView(objects["pods"], objects["services"], objects["namespaces"],
                           endpoint_slices=objects["endpointslices"], **(
                               {"mesh_label": self.mesh_label} if self.mesh_label else {}))

    def close(self) -> None:
        for reflector in self.reflectors:
            reflector.stop()
