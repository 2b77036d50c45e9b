"""Per-Service proxy behaviour from annotations: pure, validated where built.

| annotation | value | default |
|---|---|---|
| config.nodeagent.io/opaque-ports | ports and ranges: "9000,3306,8000-8010" | none |
| retry.nodeagent.io/http | statuses to retry: "5xx", "gateway-error" (502-504), codes "503,429" | none |
| retry.nodeagent.io/limit | retries per request, 0-10 | 1 |
| timeout.nodeagent.io/request | whole-request timeout: "500ms", "10s", "1m" | none |
| timeout.nodeagent.io/idle | close an opaque TCP connection idle this long | 3600s |
| timeout.nodeagent.io/connect | connect timeout to an endpoint | 1s |

A bad value is reported and its default used: a typo never takes a Service down.
Retries only ever apply to requests that are safe to retry (proxy/retry.py decides).
"""

import re
from dataclasses import dataclass

PREFIX_OPAQUE = "config.nodeagent.io/opaque-ports"
RETRY_HTTP = "retry.nodeagent.io/http"
RETRY_LIMIT = "retry.nodeagent.io/limit"
TIMEOUT_REQUEST = "timeout.nodeagent.io/request"
TIMEOUT_IDLE = "timeout.nodeagent.io/idle"
TIMEOUT_CONNECT = "timeout.nodeagent.io/connect"

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class ServiceConfig:
    opaque_ports: frozenset[int] = frozenset()
    retry_statuses: frozenset[int] = frozenset()
    retry_limit: int = 1
    request_timeout_s: float | None = None
    idle_timeout_s: float = 3600.0
    connect_timeout_s: float = 1.0

    def retries_status(self, status: int) -> bool:
        return status in self.retry_statuses


DEFAULT = ServiceConfig()


def parse_duration(text: str) -> float:
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 500ms, 10s, 1m)")
    value = float(match[1]) * _UNITS[match[2]]
    if value <= 0:
        raise ValueError(f"duration must be positive: {text!r}")
    return value


def parse_ports(text: str) -> frozenset[int]:
    ports: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, _, high = part.partition("-")
        first, last = int(low), int(high or low)
        if not 1 <= first <= last <= 65535:
            raise ValueError(f"not a port or range: {part!r}")
        ports.update(range(first, last + 1))
    return frozenset(ports)


def parse_statuses(text: str) -> frozenset[int]:
    statuses: set[int] = set()
    for part in filter(None, (p.strip().lower() for p in text.split(","))):
        if part == "5xx":
            statuses.update(range(500, 600))
        elif part == "gateway-error":
            statuses.update((502, 503, 504))
        elif part.isdigit() and 100 <= int(part) <= 599:
            statuses.add(int(part))
        else:
            raise ValueError(f"not a status, 5xx or gateway-error: {part!r}")
    return frozenset(statuses)


def parse_limit(text: str) -> int:
    limit = int(text)
    if not 0 <= limit <= 10:
        raise ValueError(f"retry limit must be 0-10: {text!r}")
    return limit


_FIELDS = (
    (PREFIX_OPAQUE, "opaque_ports", parse_ports),
    (RETRY_HTTP, "retry_statuses", parse_statuses),
    (RETRY_LIMIT, "retry_limit", parse_limit),
    (TIMEOUT_REQUEST, "request_timeout_s", parse_duration),
    (TIMEOUT_IDLE, "idle_timeout_s", parse_duration),
    (TIMEOUT_CONNECT, "connect_timeout_s", parse_duration),
)


def from_annotations(annotations: dict) -> tuple[ServiceConfig, list[str]]:
    """The config, and one message per annotation that was ignored."""
    values, errors = {}, []
    for key, name, parse in _FIELDS:
        if key in annotations:
            try:
                values[name] = parse(str(annotations[key]))
            except ValueError as e:
                errors.append(f"{key}: {e}; using the default")
    return ServiceConfig(**values), errors
