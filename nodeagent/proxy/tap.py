"""Tap: a live stream of request metadata to whoever listens.

What an event may show is fixed here and nowhere else: direction, source pod,
destination, method, authority (without userinfo), the path without its query
or fragment (tokens travel there), status, latency, TLS; for TLS passed
through, the server name. Never a header value beyond the authority, never a
body. Long fields are cut at MAX_FIELD_CHARS.

Bounds: at most MAX_SUBSCRIBERS subscriptions (a further one is refused with
TapFull); each has a queue of QUEUE_SIZE events, and a slow subscriber loses
events (counted in its `dropped` and the hub's) instead of slowing the proxy.
With no subscriber, publishing costs one truthiness check.
"""

import asyncio
import time
from dataclasses import dataclass, field

QUEUE_SIZE = 1000
MAX_SUBSCRIBERS = 8
MAX_FIELD_CHARS = 256  # path and authority; an event stays under ~1 KiB
FILTER_KEYS = ("namespace", "pod", "to", "method", "path")


class TapFull(Exception):
    """MAX_SUBSCRIBERS already listen."""


@dataclass
class Subscription:
    filters: dict
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    dropped: int = 0

    def wants(self, event: dict) -> bool:
        f = self.filters
        return ((not f.get("namespace") or event["namespace"] == f["namespace"])
                and (not f.get("pod") or event["pod"] == f["pod"])
                and (not f.get("to") or f["to"] in event["destination"])
                and (not f.get("method") or event["method"] == f["method"].upper())
                and (not f.get("path") or event["path"].startswith(f["path"])))


class TapHub:
    def __init__(self):
        self.subscriptions: list[Subscription] = []
        self.dropped = 0  # events lost to full queues, over all subscriptions (in /stats)
        self.on_change = None  # called when the first subscriber comes or the last goes (workers)

    def subscribe(self, filters: dict) -> Subscription:
        unknown = set(filters) - set(FILTER_KEYS)
        if unknown:
            raise ValueError(f"unknown tap filters: {', '.join(sorted(unknown))}; known: {', '.join(FILTER_KEYS)}")
        if len(self.subscriptions) >= MAX_SUBSCRIBERS:
            raise TapFull(f"{MAX_SUBSCRIBERS} taps already listen to this agent; try again later")
        subscription = Subscription(filters)
        self.subscriptions.append(subscription)
        if self.on_change and len(self.subscriptions) == 1:
            self.on_change()
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self.subscriptions.remove(subscription)
        if self.on_change and not self.subscriptions:
            self.on_change()

    def publish(self, event_factory) -> None:
        """`event_factory()` builds the event only if someone listens."""
        if not self.subscriptions:
            return
        event = event_factory()
        for subscription in self.subscriptions:
            if subscription.wants(event):
                try:
                    subscription.queue.put_nowait(event)
                except asyncio.QueueFull:
                    subscription.dropped += 1
                    self.dropped += 1


def _cut(text: str) -> str:
    return text if len(text) <= MAX_FIELD_CHARS else text[:MAX_FIELD_CHARS - 1] + "…"


def shown_path(target: bytes) -> str:
    """The path of a request target, as tap may show it: no query, no fragment, and for an
    absolute-form target (`http://user:pass@host/p`) no scheme, userinfo or host."""
    path = bytes(target).split(b"?", 1)[0].split(b"#", 1)[0].decode("latin-1")
    scheme, separator, rest = path.partition("://")
    if separator and "/" not in scheme:
        path = "/" + rest.partition("/")[2]
    return _cut(path)


def shown_authority(value: bytes) -> str:
    """Host and port only: a userinfo part (which HTTP forbids but a client may send) is cut."""
    return _cut(value.decode("latin-1").rpartition("@")[2])


def request_event(direction: str, pod, destination: str, request, status: int, tls: bool) -> dict:
    headers = {name.lower(): value for name, value in request.headers}
    authority = headers.get(b"host") or headers.get(b":authority", b"")
    return {
        "ts": time.time(),
        "direction": direction,
        "namespace": pod.info.namespace,
        "pod": pod.info.name,
        "destination": destination,
        "authority": shown_authority(authority),
        "method": request.method,
        "path": shown_path(request.url),
        "status": status,
        "latency_ms": round((time.monotonic() - request.started) * 1000, 3),
        "tls": tls,
    }


def tls_event(direction: str, pod, destination: str, sni: str | None) -> dict:
    """A TLS connection the proxy passes through: no request to show, only the server name asked for."""
    return {
        "ts": time.time(),
        "kind": "tls",
        "direction": direction,
        "namespace": pod.info.namespace,
        "pod": pod.info.name,
        "destination": destination,
        "sni": _cut(sni or ""),
        "method": "",  # so that a method or path filter leaves these out
        "path": "",
    }
