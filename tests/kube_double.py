"""A Kubernetes API server double, kept for the faults a real API server cannot be made to
produce (tests/k8s runs the real one for everything else): watch streams cut inside a chunk,
watches that end at once, compaction on demand (410 Gone), slow responses, and a server
behind a path prefix. Paginated lists with resourceVersions, chunked watch streams replaying
from a resourceVersion, BOOKMARK events and bearer tokens behave as the real API's.
Plain HTTP on loopback."""

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from nodeagent.cluster.kube import RESOURCES

PATH_TO_KIND = {path: kind for kind, path in RESOURCES.items()}
LIST_KINDS = {"pods": "PodList", "services": "ServiceList", "namespaces": "NamespaceList",
              "endpointslices": "EndpointSliceList"}


class ApiDouble:
    def __init__(self, token: str = "secret-token", bookmark_every_s: float = 0.2):
        self.token = token
        self.bookmark_every_s = bookmark_every_s
        self.lock = threading.Condition()
        self.rv = 1
        self.objects: dict[str, dict[str, dict]] = {kind: {} for kind in RESOURCES}
        self.log: list[tuple[int, str, str, dict]] = []  # (rv, kind, event type, object)
        self.compacted = 0  # events at or below this rv are forgotten
        self.drop_watches_after: int | None = None  # events sent before a watch connection is cut
        self.cut_mid_chunk = False  # with drop_watches_after: cut inside the next event's chunk
        self.end_watches_at_once = False  # a proxy that closes every watch as soon as it opens
        self.prefix = ""  # served below this path, as behind Rancher's or a gateway's proxy
        self.delay_s = 0.0
        self.requests: list[tuple[str, dict]] = []
        self.watch_connections: set = set()
        self.forbidden: set[str] = set()  # kinds the caller may not read: 403
        self.singles: dict[str, dict] = {}  # other paths (a DaemonSet, a Secret) -> the object
        self.texts: dict[str, str] = {}  # paths answered with text (a pod's /metrics through its proxy)
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                double.handle(self)

            def do_POST(self):
                double.review(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- the cluster's state ---

    def put(self, kind: str, obj: dict) -> dict:
        with self.lock:
            self.rv += 1
            key = f"{obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"
            event = "MODIFIED" if key in self.objects[kind] else "ADDED"
            obj = json.loads(json.dumps(obj))
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self.objects[kind][key] = obj
            self.log.append((self.rv, kind, event, obj))
            self.lock.notify_all()
            return obj

    def delete(self, kind: str, namespace: str, name: str) -> None:
        with self.lock:
            obj = self.objects[kind].pop(f"{namespace}/{name}")
            self.rv += 1
            obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self.rv)}}
            self.log.append((self.rv, kind, "DELETED", obj))
            self.lock.notify_all()

    def compact(self) -> None:
        """Forget the history up to now: a watch from an older resourceVersion gets 410 Gone
        (watches already running keep their stream, as the API server's watch cache does)."""
        with self.lock:
            self.compacted = self.rv

    def disconnect_watches(self) -> None:
        """Cut every open watch connection, mid-stream."""
        with self.lock:
            connections, self.watch_connections = list(self.watch_connections), set()
        for connection in connections:
            try:
                connection.shutdown(2)
            except OSError:
                pass

    # --- HTTP ---

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(request.path)
        params = dict(urllib.parse.parse_qsl(url.query))
        self.requests.append((url.path, params))
        if not url.path.startswith(self.prefix):
            return self._json(request, 404, {"kind": "Status", "code": 404, "message": "outside the prefix"})
        url = url._replace(path=url.path[len(self.prefix):])
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return self._json(request, 401, {"kind": "Status", "code": 401, "message": "Unauthorized"})
        if url.path in self.singles:
            return self._json(request, 200, self.singles[url.path])
        if url.path in self.texts:
            data = self.texts[url.path].encode()
            request.send_response(200)
            request.send_header("Content-Type", "text/plain; version=0.0.4")
            request.send_header("Content-Length", str(len(data)))
            request.end_headers()
            return request.wfile.write(data)
        kind = PATH_TO_KIND.get(url.path)
        if kind is None:
            return self._json(request, 404, {"kind": "Status", "code": 404, "message": "not found"})
        if kind in self.forbidden:
            return self._json(request, 403, {"kind": "Status", "code": 403, "message": f"{kind} is forbidden"})
        if self.delay_s:
            threading.Event().wait(self.delay_s)
        if params.get("watch") == "1":
            since = int(params.get("resourceVersion") or self.rv)  # none given: from now on
            return self._watch(request, kind, since, float(params.get("timeoutSeconds", 300)))
        self._list(request, kind, int(params.get("limit", 0)), int(params.get("continue", 0) or 0))

    def review(self, request: BaseHTTPRequestHandler) -> None:
        """A SubjectAccessReview: allowed unless its resource is in `forbidden`."""
        body = json.loads(request.rfile.read(int(request.headers.get("Content-Length", 0))) or b"{}")
        self.requests.append((request.path, body))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return self._json(request, 401, {"kind": "Status", "code": 401, "message": "Unauthorized"})
        if not request.path.endswith("/subjectaccessreviews"):
            return self._json(request, 404, {"kind": "Status", "code": 404, "message": "not found"})
        resource = body["spec"]["resourceAttributes"]["resource"]
        allowed = resource not in self.forbidden
        self._json(request, 201, {**body, "status": {"allowed": allowed,
                                                     **({} if allowed else {"reason": "no RBAC rule"})}})

    def _json(self, request, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def _list(self, request, kind: str, limit: int, offset: int) -> None:
        with self.lock:
            items = sorted(self.objects[kind].values(), key=lambda o: (o["metadata"].get("namespace", ""),
                                                                          o["metadata"]["name"]))
            rv = self.rv
        page = items[offset:offset + limit] if limit else items[offset:]
        metadata = {"resourceVersion": str(rv)}
        if limit and offset + limit < len(items):
            metadata["continue"] = str(offset + limit)
        self._json(request, 200, {"kind": LIST_KINDS[kind], "apiVersion": "v1", "metadata": metadata,
                                  "items": page})

    def _watch(self, request, kind: str, since: int, timeout_s: float) -> None:
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Transfer-Encoding", "chunked")
        request.end_headers()

        def send(event: dict) -> None:
            line = json.dumps(event).encode() + b"\n"
            request.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            request.wfile.flush()

        if since < self.compacted:
            send({"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                              "message": f"too old resource version: {since} ({self.compacted})"}})
            request.wfile.write(b"0\r\n\r\n")
            return
        if self.end_watches_at_once:
            request.wfile.write(b"0\r\n\r\n")
            return
        sent, cursor = 0, since
        with self.lock:
            self.watch_connections.add(request.connection)
        deadline = threading.Event()
        threading.Timer(timeout_s, deadline.set).start()
        try:
            while not deadline.is_set():
                with self.lock:
                    pending = [e for e in self.log if e[0] > cursor and e[1] == kind]
                    if not pending:
                        self.lock.wait(self.bookmark_every_s)
                        pending = [e for e in self.log if e[0] > cursor and e[1] == kind]
                    rv_now = self.rv
                for rv, _, event_type, obj in pending:
                    if self.drop_watches_after is not None and sent >= self.drop_watches_after:
                        if self.cut_mid_chunk:  # the chunk's size, then only half of it
                            line = json.dumps({"type": event_type, "object": obj}).encode() + b"\n"
                            request.wfile.write(b"%x\r\n%s" % (len(line), line[:len(line) // 2]))
                            request.wfile.flush()
                        request.connection.shutdown(2)  # cut mid-stream, without the final chunk
                        return
                    send({"type": event_type, "object": obj})
                    sent, cursor = sent + 1, rv
                if not pending:
                    cursor = max(cursor, rv_now)
                    send({"type": "BOOKMARK", "object": {"kind": "Pod", "metadata": {"resourceVersion": str(cursor)}}})
            request.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, OSError):
            return
