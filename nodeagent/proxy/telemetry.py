"""Per-request telemetry beyond the metrics: access logs (accesslog.py) and tracing
(tracecontext.py decides, otlp.py exports).

`Telemetry` is the process's: its access log writer and, with `--trace-collector`, its span
exporter. Each client connection's target (target.HttpTarget outbound, app_target.AppTarget
inbound) asks it once, when it is made, for a `RequestLog`: None when nothing is asked of this
connection's requests (no access log for it, tracing off), so the per-request cost is then one
attribute check where a request starts and one where its response is counted. What the
annotations ask is read when the connection starts: a change applies to connections opened
after it.

With tracing on, every request's headers are read for a parent context where it starts
(`start`: before its first attempt, so retries carry the same context), this hop's span is
decided, and the headers are rewritten so the request goes on as its child; a sampled span is
exported when the response is counted.
"""

import random
import time
from collections.abc import Callable

from nodeagent.identity import naming
from nodeagent.observe.workloads import of_pod
from nodeagent.proxy import accesslog, tracecontext
from nodeagent.proxy.accesslog import AccessLog, Entry, Format
from nodeagent.proxy.otlp import KIND_CLIENT, KIND_SERVER, SpanExporter, SpanRecord, static_attributes
from nodeagent.proxy.tap import shown_authority, shown_path

MAX_ENDPOINTS_KEPT = 64  # per connection: endpoints whose span attributes are kept
MAX_HEADER_VALUE = accesslog.MAX_URL_BYTES  # of a header value kept for a line (it is cut again when written)


class Telemetry:
    def __init__(self, settings, metrics, problems, view: Callable[[], object]):
        self.metrics, self.problems = metrics, problems
        self.view = view  # the current ClusterView (annotations change; inbound clients are found by address)
        self.trust_domain = settings.trust_domain
        self.access_log = AccessLog(settings.access_log, self._dropped_lines)
        self.tracer: Tracer | None = None  # what new connections use; None: tracing off
        self._made: Tracer | None = None  # the one tracer ever made (kept while tracing is off: see reconfigure)
        self.reconfigure(settings)

    def reconfigure(self, settings) -> None:
        """--access-log, --trace-collector, --trace-sampling, at start and when they change live.
        Connections opened before a change keep the tracer they started with: tracing turned off,
        their spans still go to the one exporter, so a process never has more than one."""
        self.access_log.retarget(settings.access_log)
        if not settings.trace_collector:
            self.tracer = None
            return
        if self._made is None:
            resource = (("service.name", "nodeagent"), ("k8s.node.name", settings.node_name or ""))
            metrics = self.metrics
            exporter = SpanExporter(settings.trace_collector, resource, metrics.trace_spans_dropped_total.inc,
                                    metrics.trace_spans_exported_total.inc, metrics.trace_export_failures_total.inc)
            self._made = Tracer(exporter, settings.trace_sampling)
        self._made.exporter.retarget(settings.trace_collector)
        self._made.rate = settings.trace_sampling
        self.tracer = self._made

    def _dropped_lines(self, count: int) -> None:
        self.metrics.access_log_dropped_total.inc(count)

    def _format(self, owner: str, annotations: dict) -> Format | None:
        found, error = accesslog.format_of(annotations)
        if error:
            self.problems.warning("access-log annotation", "%s: %s", owner, error)
        return found

    def requests(self, direction: str, pod, destination: str, route: str, service=None, client_addr: str = "",
                 client_id: str = "", pod_at: Callable = lambda address: None) -> "RequestLog | None":
        """What to record of a connection's requests: an access log if the pod's own annotation,
        else the destination Service's (outbound), asks for one; spans if tracing is on. None if
        neither. Outbound, the client is the pod and `pod_at(address)` names the pod at an
        endpoint; inbound, the client is `client_addr` with `client_id` (its identity or
        `unauthenticated`). `route`: where the connection's requests go, as spans name it."""
        info = self.view().pods.get(pod.key) or pod.info
        found = self._format(f"pod/{pod.key}", info.annotations)
        if found is None and service is not None:
            found = self._format(f"svc/{service.key}", service.annotations)
        if found is None and self.tracer is None:
            return None
        if direction == "outbound":
            client_addr, client_id, client = pod.info.ip, pod.identity.uri, pod.info
        else:
            client = self.view().pod_by_ip.get(client_addr)
        return RequestLog(self, found, direction, pod, destination, client_addr, client_id,
                          of_pod(client).key if client is not None else "", pod_at, route)

    def close(self) -> None:
        self.access_log.close()
        if self._made is not None:
            self._made.exporter.close()


class Tracer:
    """Sampling and ids for new spans, and where finished ones go."""

    def __init__(self, exporter: SpanExporter, rate: float, rng: random.Random | None = None):
        self.exporter, self.rate = exporter, rate
        self.rng = rng or random.Random()

    def start(self, headers: list, near: tracecontext.Span | None = None) -> tracecontext.Span | None:
        """This hop's span for a request with `headers` (rewritten to carry it on), or None.
        `near`: the source's span of a one-hop request (target.py), the parent of the
        destination's, as the headers it rewrote would say on a mesh hop (read from it, not
        from the headers: a retry's headers carry the previous attempt's destination span)."""
        parent = tracecontext.find_parent(headers)
        if near is not None and parent is not None:
            parent = parent._replace(trace_id=near.trace_id, span_id=near.span_id, sampled=near.sampled)
        ids = self.rng.getrandbits(192).to_bytes(24, "big")
        span = tracecontext.decide(parent, self.rng.random(), self.rate, ids[:16], ids[16:])
        if span is not None:
            tracecontext.rewrite(headers, parent, span)
        return span


class RequestLog:
    """One client connection's requests, as the access log and tracing record them."""

    __slots__ = ("telemetry", "writer", "tracer", "format", "direction", "pod", "destination", "client_addr",
                 "client_id", "client_workload", "pod_at", "route", "_static", "_endpoints")

    def __init__(self, telemetry: Telemetry, found: Format | None, direction: str, pod, destination: str,
                 client_addr: str, client_id: str, client_workload: str, pod_at: Callable, route: str):
        self.telemetry, self.writer, self.tracer = telemetry, telemetry.access_log, telemetry.tracer
        self.format, self.direction, self.pod = found, direction, pod
        self.destination, self.client_addr, self.client_id = destination, client_addr, client_id
        self.client_workload = client_workload  # "namespace/deploy/web"; "" for a client outside the cluster's pods
        self.pod_at, self.route = pod_at, route
        self._static: bytes | None = None  # the spans' constant attributes, encoded at the first
        # (address, tls) -> the endpoint's workload and identity, for spans (bounded by the Service's endpoints)
        self._endpoints: dict = {}

    def start(self, request) -> None:
        """A new request (not a retry): its trace context, if tracing is on."""
        if self.tracer is not None:
            request.span = self.tracer.start(request.headers)

    def start_far(self, request) -> None:
        """An attempt of a one-hop request (target.py): the destination's span, the child of the
        source's `request.span`, as the far end of a mesh hop starts it for each attempt."""
        if self.tracer is not None:
            request.far_span = self.tracer.start(request.headers, request.span)

    def response(self, request, status: int, tls: bool, failure: bool | None = None, address=None,
                 far: bool = False) -> None:
        """A response was counted: its access log line is queued, its span exported (each
        dropped and counted when its queue is full). `far`: this is the destination's record of
        a one-hop request (its span is `request.far_span`)."""
        span = request.far_span if far else request.span
        exported = span is not None and span.sampled
        if self.format is None and not exported:
            return
        authority = user_agent = b""
        for name, value in request.headers:
            lowered = name.lower()
            if lowered == b"host" or lowered == b":authority":
                authority = value[:MAX_HEADER_VALUE]
            elif lowered == b"user-agent":
                user_agent = value[:MAX_HEADER_VALUE]
        now = time.monotonic()
        total_s = (getattr(request, "head_at", None) or now) - request.started
        if self.format is not None:
            self.writer.record(Entry(
                self.format, time.time(), self.direction, self.pod.info.namespace, self.pod.info.name,
                self.client_addr, self.client_id, self.destination, authority, request.method,
                bytes(request.url[:accesslog.MAX_URL_BYTES]), request.version, status, total_s,
                span.trace_id if span is not None else None, user_agent, tls))
        if exported:
            self._export(request, span, status, tls, status >= 500 if failure is None else failure, address,
                         authority, now)

    def _static_attributes(self) -> bytes:
        own = self.pod.info
        constant = [("nodeagent.direction", self.direction), ("nodeagent.pod", own.key),
                    ("nodeagent.source.workload", self.client_workload), ("nodeagent.source.identity", self.client_id),
                    ("nodeagent.destination", self.destination), ("nodeagent.route", self.route)]
        if self.direction == "inbound":
            constant += [("nodeagent.destination.workload", of_pod(own).key),
                         ("nodeagent.destination.identity", self.pod.identity.uri)]
        self._static = static_attributes(constant)
        return self._static

    def _endpoint(self, address, tls: bool) -> list:
        """The destination workload and identity of an endpoint, as span attributes."""
        other = self.pod_at(address) if address is not None else None
        workload = of_pod(other).key if other is not None else self.destination
        identity = (naming.of_pod(other.namespace, other.service_account, self.telemetry.trust_domain).uri
                    if other is not None and tls else "")
        if len(self._endpoints) >= MAX_ENDPOINTS_KEPT:  # a long connection across many rollouts
            self._endpoints.clear()
        found = self._endpoints[(address, tls)] = [("nodeagent.destination.workload", workload),
                                                   ("nodeagent.destination.identity", identity)]
        return found

    def _export(self, request, span, status, tls, failure, address, authority, now) -> None:
        end_ns = time.time_ns()
        start_ns = end_ns - int((now - request.started) * 1e9)
        variable = [("nodeagent.tls", tls), ("http.request.method", request.method),
                    ("url.path", shown_path(bytes(request.url[:accesslog.MAX_URL_BYTES]))),
                    ("server.address", shown_authority(authority)), ("network.protocol.version", request.version),
                    ("http.response.status_code", status)]
        if self.direction == "outbound":
            kind = KIND_CLIENT
            endpoint = self._endpoints.get((address, tls)) or self._endpoint(address, tls)
            variable += endpoint
        else:
            kind = KIND_SERVER
        self.tracer.exporter.record(SpanRecord(
            span.trace_id, span.span_id, span.parent_id, kind, f"{request.method} {self.route or self.destination}",
            start_ns, end_ns, self._static or self._static_attributes(), tuple(variable), failure), self.pod.info.key)
