"""Tap: a live stream of request metadata (never bodies) to whoever listens.

Subscribers get a bounded queue each; a slow one loses events (counted in its
`dropped`) instead of slowing the proxy. With no subscriber, publishing costs
one truthiness check.
"""

import asyncio
import time
from dataclasses import dataclass, field

QUEUE_SIZE = 1000
FILTER_KEYS = ("namespace", "pod", "to", "method", "path")


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


def request_event(direction: str, pod, destination: str, request, status: int, tls: bool) -> dict:
    headers = {name.lower(): value for name, value in request.headers}
    return {
        "ts": time.time(),
        "direction": direction,
        "namespace": pod.info.namespace,
        "pod": pod.info.name,
        "destination": destination,
        "authority": (headers.get(b"host") or headers.get(b":authority", b"")).decode("latin-1"),
        "method": request.method,
        "path": bytes(request.url).decode("latin-1"),
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
        "sni": sni or "",
        "method": "",  # so that a method or path filter leaves these out
        "path": "",
    }
