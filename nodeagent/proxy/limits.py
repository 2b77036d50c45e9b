"""Per-pod limits: how much of the shared proxy one pod may hold at once. Pure.

A pod that reaches a limit gets errors (its new connection reset, its stream refused); no
other pod does, because each pod's share is counted apart. All are counts of things held at
once but two rates: new mutual-TLS handshakes per second, as client and as server (pacing.py:
over its rate a pod's handshakes wait their turn, up to half a second, then are refused).
A pod over its handshake rate, with turns already queued half a second ahead, is refused
outright until its queue is empty (`Quota.refusing`): at accept, before detection, and in the
kernel for its own connects (proxy/refusal.py), not accepted, detected and refused one by one.
(Over a count, a pod is refused at admission, before detection too, one connection at a time:
its count falls as its connections close, so a window would refuse a pod that has room again.)
Defaults come from the agent's `--pod-limits` setting. An annotation `limits.nodeagent.io/<name>: "<n>"` on a Namespace sets the
limit of its pods, up or down (operators size a busy gateway's namespace differently from a
batch job's; a Namespace is cluster-scoped, so a pod's author normally cannot edit it). The same
annotation on a pod may only lower that pod's limit: one its author could raise would protect
nobody from that pod. A bad annotation, or a pod's asking to raise, is reported and ignored.

| limit | counts | default |
|---|---|---|
| outbound-connections | the pod's own connections through the proxy | 1000 |
| inbound-connections | connections to the pod (plaintext and mesh) | 1000 |
| handshakes | mutual-TLS handshakes in progress for the pod's own connections (as client; past it, up to 4x as many wait in turn: Quota.take_or_queue) | 50 |
| inbound-handshakes | mutual-TLS handshakes in progress of connections to the pod (as server; apart: clients that hold them cannot stop the pod's own) | 200 |
| handshake-rate | new mutual-TLS handshakes per second for the pod's own connections (as client) | 50 |
| inbound-handshake-rate | new mutual-TLS handshakes per second of connections to the pod (as server; a meshed client is paced at its own agent too) | 200 |
| detections | outbound connections whose protocol is not known yet | 100 |
| http2-streams | open HTTP/2 streams over all the pod's own client connections | 1000 |
| inbound-http2-streams | open HTTP/2 streams of clients to the pod (apart: its clients cannot use up its own share) | 1000 |
"""

import enum
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from nodeagent.proxy.contention import LoopContention
from nodeagent.proxy.pacing import MAX_WAIT_S, Pace

ANNOTATION_PREFIX = "limits.nodeagent.io/"
MAX_VALUE = 1_000_000


class Limit(enum.Enum):
    OUTBOUND_CONNECTIONS = "outbound-connections"
    INBOUND_CONNECTIONS = "inbound-connections"
    HANDSHAKES = "handshakes"
    INBOUND_HANDSHAKES = "inbound-handshakes"
    HANDSHAKE_RATE = "handshake-rate"  # rates (per second), not counts held: Quota.handshake_turn
    INBOUND_HANDSHAKE_RATE = "inbound-handshake-rate"
    DETECTIONS = "detections"
    HTTP2_STREAMS = "http2-streams"
    INBOUND_HTTP2_STREAMS = "inbound-http2-streams"


DEFAULTS = MappingProxyType({
    Limit.OUTBOUND_CONNECTIONS: 1000,
    Limit.INBOUND_CONNECTIONS: 1000,
    # Handshakes in progress = rate x how long each takes (Little's law), and a handshake waits for
    # CPU when the node is busy (its threads run below the loop's priority): at handshake-rate
    # times the mesh client's 1 s connect deadline, a pod within its rate is never refused by this
    # count while its handshakes finish in time (at 16, a soak pod at 40/s was, whenever they took
    # 0.4 s: benchmarks/README.md "Soak").
    Limit.HANDSHAKES: 50,
    # Four clients' worth of the above (a client address holds at most a quarter, source_share.py),
    # and room for the turns its inbound-handshake-rate gives ahead (200/s x pacing.MAX_WAIT_S =
    # 100 at most); a silent client is dropped after Timeouts.client_hello_s.
    Limit.INBOUND_HANDSHAKES: 200,
    # About 0.4 of a core at both ends of same-node hops on the 2-core test VM; above the soak's
    # 40 new opaque connections a second from one pod (benchmarks/README.md).
    Limit.HANDSHAKE_RATE: 50,
    # A server pod has many clients, each paced at its own agent: this bounds what clients
    # outside the mesh (or beyond their own rates, together) can make the node spend on one pod.
    Limit.INBOUND_HANDSHAKE_RATE: 200,
    Limit.DETECTIONS: 100,
    Limit.HTTP2_STREAMS: 1000,
    Limit.INBOUND_HTTP2_STREAMS: 1000,
})

RATE_OF = {"outbound": Limit.HANDSHAKE_RATE, "inbound": Limit.INBOUND_HANDSHAKE_RATE}
# How many may wait in turn for one of a count they are over (Quota.take_or_queue): per unit of
# the limit, and at most: a burst of new pooled connections waits for handshakes in progress to
# end, and beyond this many waiting the pod is refused at once.
QUEUED_PER_UNIT = 4
QUEUED_MAX = 256


def _value(name: str, text: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ValueError(f"{name}: not a number: {text!r}") from None
    if not 1 <= value <= MAX_VALUE:
        raise ValueError(f"{name}: {value} is not in 1..{MAX_VALUE}")
    return value


def _limit(name: str) -> Limit:
    try:
        return Limit(name)
    except ValueError:
        raise ValueError(f"unknown limit {name!r}; known: {', '.join(l.value for l in Limit)}") from None


@dataclass(frozen=True)
class PodLimits:
    # A plain dict (read-only by convention): the settings travel to worker processes pickled.
    values: dict = field(default_factory=lambda: dict(DEFAULTS), hash=False)

    def __getitem__(self, limit: Limit) -> int:
        return self.values[limit]

    def show(self) -> str:
        return ",".join(f"{limit.value}={self.values[limit]}" for limit in Limit)


def parse(text: str, base: PodLimits = PodLimits()) -> PodLimits:
    """`name=n,name=n`: the limits named, the others from `base`. ValueError names what is wrong."""
    values = dict(base.values)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, number = part.partition("=")
        if not sep:
            raise ValueError(f"not NAME=N: {part!r}")
        limit = _limit(name.strip())
        values[limit] = _value(limit.value, number)
    return PodLimits(values)


def _annotated(annotations: Mapping[str, str]):
    """(key, limit, value) for each limit annotation; ValueError items for bad ones."""
    for key, text in annotations.items():
        if not key.startswith(ANNOTATION_PREFIX):
            continue
        try:
            limit = _limit(key[len(ANNOTATION_PREFIX):])
            yield key, limit, _value(limit.value, text)
        except ValueError as e:
            yield key, None, e


def from_annotations(annotations: Mapping[str, str], defaults: PodLimits,
                     namespace_annotations: Mapping[str, str] = MappingProxyType({})) -> tuple[PodLimits, list[str]]:
    """The pod's limits, and one message per annotation that was ignored.

    The limits are the node's `defaults`, set to what the pod's Namespace's annotations say (up or
    down: a Namespace is edited by operators, not by the pod's author), then lowered by the pod's
    own annotations. A pod's annotation may only lower: the proxy is shared, and a limit its
    author could raise would protect nobody from that pod. A raise it asks is ignored, said."""
    values, errors = dict(defaults.values), []
    for key, limit, value in _annotated(namespace_annotations):
        if limit is None:
            errors.append(f"namespace annotation {key}: {value}; using the node's default")
        else:
            values[limit] = value
    for key, limit, value in _annotated(annotations):
        if limit is None:
            errors.append(f"{key}: {value}; using the default")
        elif value > values[limit]:
            errors.append(f"{key}: {value} would raise the limit above {values[limit]}: a pod may only lower "
                          f"its limits (the annotation on its Namespace may raise them); using {values[limit]}")
        else:
            values[limit] = value
    return PodLimits(values), errors


class Quota:
    """What one pod holds of each limit right now, its pace of handshakes, and the windows in which
    its new connections are refused outright."""

    __slots__ = ("limits", "held", "paces", "refusals", "on_refusing", "contention", "queued")

    def __init__(self, limits: PodLimits):
        self.limits = limits
        self.held = dict.fromkeys(Limit, 0)
        self.paces: dict[str, Pace] = {}  # direction ("inbound", "outbound") -> its bucket
        self.refusals: dict[str, tuple[float, Limit]] = {}  # direction -> (until, the limit it is over)
        # Told (direction, limit, until) when a window opens or is extended: the kernel refuses too.
        self.on_refusing: Callable[[str, Limit, float], None] | None = None
        # The process's loop contention (contention.py): the share of its handshake rates a pod gets now.
        self.contention: LoopContention | None = None
        # Per limit, who waits in turn for one given back (take_or_queue): callables, oldest first.
        self.queued: dict[Limit, deque[Callable[[], bool]]] = {}

    def handshake_turn(self, direction: str, now: float) -> float | None:
        """Seconds until the pod's next handshake in `direction` ("outbound": as client,
        "inbound": as server) may start, or None: over that direction's rate for longer than a
        client should wait (pacing.py); then the pod is refusing until its queue of turns is empty."""
        pace = self.paces.get(direction)
        if pace is None:
            pace = self.paces[direction] = Pace()
        limit = RATE_OF[direction]
        key = (self, direction)  # this pod-direction's share of a contended loop (contention.py)
        rate = self.limits[limit] if self.contention is None else self.contention.rate(key, self.limits[limit])
        turn = pace.turn(now, rate, self.limits[limit])
        if turn is None:
            if self.contention is not None:
                self.contention.refused(key)  # counted apart while its rate is cut
            # At most MAX_WAIT_S at a time: pacing refuses on after it (and opens another), and a
            # live change of the rate (lowered, then raised back) cannot leave a long window open.
            self.refuse(direction, limit, min(pace.reopens_at(now, rate), now + MAX_WAIT_S))
        return turn

    def refuse(self, direction: str, limit: Limit, until: float) -> None:
        """The pod's new connections in `direction` are refused outright until `until` (over `limit`)."""
        current = self.refusals.get(direction)
        if current is not None and current[0] >= until:
            return
        self.refusals[direction] = (until, limit)
        if self.on_refusing is not None:
            self.on_refusing(direction, limit, until)

    def refusing(self, direction: str, now: float) -> Limit | None:
        """The limit the pod's new connections in `direction` are refused for at `now`, or None."""
        current = self.refusals.get(direction)
        if current is None or now >= current[0]:
            return None
        return current[1]

    def take(self, limit: Limit) -> bool:
        """One more of `limit`, if the pod is under it."""
        if self.held[limit] >= self.limits[limit]:
            return False
        self.held[limit] += 1
        return True

    def take_or_queue(self, limit: Limit, granted: Callable[[], bool]) -> bool | None:
        """One more of `limit` now (True); else `granted` waits in turn (False) and is called when
        one is free for it, taken in its name (it returns False if its waiter is gone, and the next
        gets it); None: min(QUEUED_PER_UNIT x the limit, QUEUED_MAX) wait already (refused)."""
        queue = self.queued.get(limit)
        if queue:
            self._wake(limit, queue)  # the limit may have been raised live since the last give
        if not queue and self.take(limit):  # none waiting: no one is passed over
            return True
        if queue is None:
            queue = self.queued[limit] = deque()
        if len(queue) >= min(QUEUED_PER_UNIT * max(self.limits[limit], 1), QUEUED_MAX):
            return None
        queue.append(granted)
        return False

    def withdraw(self, limit: Limit, granted: Callable[[], bool]) -> None:
        """`granted` waits no longer (its wait timed out or was cancelled)."""
        queue = self.queued.get(limit)
        if queue is not None and granted in queue:
            queue.remove(granted)  # at most QUEUED_MAX long

    def give(self, limit: Limit) -> None:
        if self.held[limit] <= 0:
            raise RuntimeError(f"{limit.value}: given back more than taken")
        self.held[limit] -= 1
        queue = self.queued.get(limit)
        if queue:
            self._wake(limit, queue)

    def _wake(self, limit: Limit, queue: deque) -> None:
        """Whoever waits, oldest first, gets what is free under the limit now."""
        while queue and self.held[limit] < self.limits[limit]:
            granted = queue.popleft()
            self.held[limit] += 1
            if not granted():
                self.held[limit] -= 1
