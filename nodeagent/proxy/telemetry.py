"""Per-request telemetry beyond the metrics: access logs (accesslog.py).

`Telemetry` is the process's: its writer, made once from the settings. Each client connection's
target (target.HttpTarget outbound, app_target.AppTarget inbound) asks it once, when it is
made, for a `RequestLog`: None when nothing is asked of this connection's requests, so the
per-request cost of a connection without an access log is one attribute check at the moment a
response is counted. What the annotations ask is read when the connection starts: a change
applies to connections opened after it.
"""

import time
from collections.abc import Callable

from nodeagent.proxy import accesslog
from nodeagent.proxy.accesslog import AccessLog, Entry, Format

MAX_HEADER_VALUE = accesslog.MAX_URL_BYTES  # of a header value kept for a line (it is cut again when written)


class Telemetry:
    def __init__(self, access_log_destination: str, metrics, problems, current_pod: Callable[[str], object]):
        self.metrics, self.problems = metrics, problems
        self.current_pod = current_pod  # pod key -> its PodInfo in the current view (annotations change)
        self.access_log = AccessLog(access_log_destination, self._dropped_lines)

    def _dropped_lines(self, count: int) -> None:
        self.metrics.access_log_dropped_total.inc(count)

    def _format(self, owner: str, annotations: dict) -> Format | None:
        found, error = accesslog.format_of(annotations)
        if error:
            self.problems.warning("access-log annotation", "%s: %s", owner, error)
        return found

    def requests(self, direction: str, pod, destination: str, service=None, client_addr: str = "",
                 client_id: str = "") -> "RequestLog | None":
        """What to record of a connection's requests: the pod's own annotation, else the
        destination Service's (outbound); None if neither asks for an access log."""
        info = self.current_pod(pod.key) or pod.info
        found = self._format(f"pod/{pod.key}", info.annotations)
        if found is None and service is not None:
            found = self._format(f"svc/{service.key}", service.annotations)
        if found is None:
            return None
        if direction == "outbound":
            client_addr, client_id = client_addr or pod.info.ip, client_id or pod.identity.uri
        return RequestLog(self.access_log, found, direction, pod, destination, client_addr, client_id)

    def close(self) -> None:
        self.access_log.close()


class RequestLog:
    """One client connection's requests, as its access log records them."""

    __slots__ = ("writer", "format", "direction", "namespace", "pod", "destination", "client_addr", "client_id")

    def __init__(self, writer: AccessLog, found: Format, direction: str, pod, destination: str, client_addr: str,
                 client_id: str):
        self.writer, self.format, self.direction = writer, found, direction
        self.namespace, self.pod = pod.info.namespace, pod.info.name
        self.destination, self.client_addr, self.client_id = destination, client_addr, client_id

    def response(self, request, status: int, tls: bool) -> None:
        """A response was counted: its line is queued (or dropped and counted)."""
        authority = user_agent = b""
        for name, value in request.headers:
            lowered = name.lower()
            if lowered == b"host" or lowered == b":authority":
                authority = value[:MAX_HEADER_VALUE]
            elif lowered == b"user-agent":
                user_agent = value[:MAX_HEADER_VALUE]
        now = time.monotonic()
        self.writer.record(Entry(
            self.format, time.time(), self.direction, self.namespace, self.pod, self.client_addr, self.client_id,
            self.destination, authority, request.method, bytes(request.url[:accesslog.MAX_URL_BYTES]),
            request.version, status, (getattr(request, "head_at", None) or now) - request.started, None,
            user_agent, tls))
