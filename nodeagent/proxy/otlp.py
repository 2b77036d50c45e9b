"""Spans to an OpenTelemetry collector: OTLP/HTTP with protobuf bodies (POST
`/v1/traces`, `application/x-protobuf`), built from the official protos (`opentelemetry-proto`).

Off the data path and bounded: the proxy appends a finished span's few fields (`SpanRecord`) to
a queue of at most QUEUE_SPANS; a thread takes up to BATCH_SPANS at a time (at least every
BATCH_DELAY_S), encodes them into one ExportTraceServiceRequest and posts it with a timeout of
EXPORT_TIMEOUT_S. A slow or dead collector only keeps that thread waiting: meanwhile the queue
fills, and further spans are dropped and counted (`trace_spans_dropped_total`), never waited
for. A batch the collector refuses or that fails is dropped and counted too (no retry: the
spans after it are as valuable, and the queue is the only buffer). A pod holds at most half
of the queue (queue_share.py): one pod's flood of sampled requests drops its own spans,
not its neighbours'.

Why not the OpenTelemetry SDK: its BatchSpanProcessor is bounded and drops too, but each span
goes through the SDK's Span object (a lock, attribute validation, a context), about ten times
the proxy's own per-request work for the sampled ones; the proxy already has everything a span
needs at the moment it counts the response, so it builds the protobuf message directly.
"""

import collections
import http.client
import logging
import threading
import time
from typing import NamedTuple
from urllib.parse import urlsplit

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1 import trace_pb2

from nodeagent.proxy.queue_share import QueueShares

QUEUE_SPANS = 2048  # a record is ~0.5 KiB (ids, a name, ~12 short attributes): ~1 MiB in all
POD_SHARE = 2  # a pod may hold 1/POD_SHARE of the queue
POD_FLOOR = 32  # and may always queue this many, even past the queue's bound (queue_share.py)
BATCH_SPANS = 512
BATCH_DELAY_S = 1.0
EXPORT_TIMEOUT_S = 5.0
ERROR_LOG_EVERY_S = 10.0
SCOPE_NAME = "nodeagent.proxy"

KIND_SERVER = trace_pb2.Span.SpanKind.SPAN_KIND_SERVER
KIND_CLIENT = trace_pb2.Span.SpanKind.SPAN_KIND_CLIENT

log = logging.getLogger("nodeagent.proxy")


class SpanRecord(NamedTuple):
    trace_id: bytes
    span_id: bytes
    parent_id: bytes | None
    kind: int  # KIND_SERVER (inbound) or KIND_CLIENT (outbound)
    name: str
    start_ns: int  # wall clock, ns since the epoch
    end_ns: int
    static: bytes  # the attributes every span of its connection has: `static_attributes`' bytes
    attributes: tuple  # its own, (key, str | int | bool) pairs
    error: bool


def static_attributes(attributes) -> bytes:
    """A connection's constant attributes as a serialized Span holding only them: each of its
    spans is merged from these bytes (protobuf's repeated fields concatenate), which costs half
    of adding them one by one."""
    span = trace_pb2.Span()
    for key, value in attributes:
        _set(span.attributes.add(key=key).value, value)
    return span.SerializeToString()


def parse_endpoint(url: str) -> tuple[str, int, str]:
    """(host, port, path) of an OTLP/HTTP traces endpoint: `http://HOST:PORT[/PATH]`; the path
    defaults to /v1/traces. Plain HTTP only (a collector on the node or in the cluster)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{url!r}: an http://HOST:PORT[/PATH] URL (OTLP/HTTP; https is not supported)")
    try:
        port = parts.port or 4318
    except ValueError as e:
        raise ValueError(f"{url!r}: {e}") from None
    return parts.hostname, port, parts.path if parts.path not in ("", "/") else "/v1/traces"


def _set(value_message, value) -> None:
    if isinstance(value, bool):
        value_message.bool_value = value
    elif isinstance(value, int):
        value_message.int_value = value
    else:
        value_message.string_value = value


def encode(resource: tuple, records) -> bytes:
    """One ExportTraceServiceRequest: one resource (this agent), one scope, the spans."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    for key, value in resource:
        _set(resource_spans.resource.attributes.add(key=key).value, value)
    scope_spans = resource_spans.scope_spans.add()
    scope_spans.scope.name = SCOPE_NAME
    error = trace_pb2.Status.StatusCode.STATUS_CODE_ERROR
    for record in records:
        span = scope_spans.spans.add(trace_id=record.trace_id, span_id=record.span_id, name=record.name,
                                     kind=record.kind, start_time_unix_nano=record.start_ns,
                                     end_time_unix_nano=record.end_ns)
        if record.static:
            span.MergeFromString(record.static)
        if record.parent_id:
            span.parent_span_id = record.parent_id
        if record.error:
            span.status.code = error
        for key, value in record.attributes:
            _set(span.attributes.add(key=key).value, value)
    return request.SerializeToString()


class SpanExporter:
    """The process's exporter: `record` (on the data path) queues; a thread posts batches.
    Started at the first span."""

    def __init__(self, endpoint: str, resource: tuple, on_drop, on_export, on_failure):
        self.target = parse_endpoint(endpoint)  # (host, port, path): one value, swapped whole by retarget
        self.resource = resource
        self.on_drop, self.on_export, self.on_failure = on_drop, on_export, on_failure  # counts, from either thread
        self.spans: collections.deque[tuple] = collections.deque()  # (pod, SpanRecord)
        self.shares = QueueShares(QUEUE_SPANS, QUEUE_SPANS // POD_SHARE, POD_FLOOR)  # bounds `spans`, per pod and in all
        self.dropped = self.exported = self.failed_batches = 0
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stop = False
        self._conn: http.client.HTTPConnection | None = None
        self._conn_target: tuple | None = None  # the target `_conn` is open to (the thread's)
        self._error_logged_at = -ERROR_LOG_EVERY_S

    def retarget(self, endpoint: str) -> None:
        """Batches posted from now on go to `endpoint` (the settings changed live)."""
        self.target = parse_endpoint(endpoint)

    def record(self, span: SpanRecord, pod) -> None:
        """Queue a span of `pod` (its key: whose share it counts against)."""
        if not self.shares.admit(pod):
            self.dropped += 1
            self.on_drop(1)
            return
        spans = self.spans
        spans.append((pod, span))
        if len(spans) >= BATCH_SPANS:
            self._wake.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="otlp-export", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(BATCH_DELAY_S)
            self._wake.clear()
            while self.spans and not self._stop:
                self._export_batch()
                if len(self.spans) < BATCH_SPANS:
                    break
        while self.spans:  # closing: what is queued goes out (each post bounded by its timeout)
            self._export_batch()

    def _export_batch(self) -> None:
        batch, pods = [], []
        spans = self.spans
        while spans and len(batch) < BATCH_SPANS:
            pod, span = spans.popleft()
            pods.append(pod)
            batch.append(span)
        self.shares.taken(pods)
        try:
            status = self._post(encode(self.resource, batch))
        except (OSError, http.client.HTTPException) as e:
            self._failed(len(batch), f"{type(e).__name__}: {e}")
            return
        if 200 <= status < 300:
            self.exported += len(batch)
            self.on_export(len(batch))
        else:
            self._failed(len(batch), f"the collector answered {status}")

    def _post(self, body: bytes) -> int:
        """POST one batch; the collector's status. A kept-alive connection the collector has
        closed meanwhile is opened again, once."""
        try:
            return self._post_once(body)
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            return self._post_once(body)

    def _post_once(self, body: bytes) -> int:
        host, port, path = target = self.target
        if self._conn is not None and self._conn_target != target:
            self._conn.close()
            self._conn = None
        if self._conn is None:
            self._conn = http.client.HTTPConnection(host, port, timeout=EXPORT_TIMEOUT_S)
            self._conn_target = target
        try:
            self._conn.request("POST", path, body, {"Content-Type": "application/x-protobuf"})
            response = self._conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            self._conn.close()
            self._conn = None
            raise
        if response.will_close:
            self._conn.close()
            self._conn = None
        return response.status

    def _failed(self, count: int, why: str) -> None:
        self.dropped += count
        self.failed_batches += 1
        self.on_drop(count)
        self.on_failure()
        now = time.monotonic()
        if now - self._error_logged_at >= ERROR_LOG_EVERY_S:  # this thread's own rate limit
            self._error_logged_at = now
            log.warning("tracing: export to http://%s:%d%s failed (%s): %d spans dropped", *self.target, why, count)

    def close(self, timeout_s: float = 2.0) -> None:
        """Post what is queued, then stop (waiting at most `timeout_s`)."""
        if self._thread is not None:
            self._stop = True
            self._wake.set()
            self._thread.join(timeout_s)
