"""Every connection the proxy holds for a pod, in one table, each in one phase.

A client connection (a pod's own, outbound; or one to a pod, inbound) is admitted here or
refused: the node's limit and the pod's own (proxy/limits.py) both count it. It then moves
through phases, and the phase says what of the pod's share it holds (a detection, a TLS
handshake). It is closed exactly once, from whichever side ends it, and closing gives back
everything it held and counts it (tcp_close, bytes). Nothing else counts opens and closes.

    outbound: DETECTING -> CONNECTING -> OPAQUE | HTTP1 | HTTP2 -> CLOSED
    inbound:  HANDSHAKING (mesh) -> AUTHORIZING -> OPAQUE | HTTP1 | HTTP2 (or REFUSING) -> CLOSED

The table also knows each pod's live connections: a pod's policy change closes the ones it no
longer admits. A pod that leaves the mesh is retired (`retire`): its HTTP connections are asked
to end at their next clean point (as in a drain), the others end when their peers end them, and
what they still use of the pod (its network namespace's descriptor, to open connections from or
into the pod) is released only when the last of them closes: a descriptor closed earlier is
reused by the process for something else, possibly another pod's namespace.

Draining (the agent stops or hands over): `drain()` tells every connection that knows how to
end well (HTTP/1: `Connection: close` on its next response; HTTP/2: GOAWAY) to do so, now and
as each one reaches such a phase later; the others (opaque, mTLS tunnels) are left to end until
`cut_all()` at the drain deadline. Connections are still admitted while draining: those already
queued on a listener are served, not reset.
"""

import enum
from collections.abc import Callable

from nodeagent.proxy.limits import Limit, Quota


class Direction(enum.Enum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


class Drain(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"  # connections are asked to end at their next clean point


class Phase(enum.Enum):
    DETECTING = "detecting"  # outbound: waiting for the client's first bytes (or the server's)
    HANDSHAKING = "handshaking"  # inbound mesh: mutual TLS with the peer proxy, then its header
    AUTHORIZING = "authorizing"  # inbound: the policy is asked, the app connected
    CONNECTING = "connecting"  # opaque: the upstream is being opened
    OPAQUE = "opaque"  # bytes forwarded both ways untouched
    HTTP1 = "http1"
    HTTP2 = "http2"
    REFUSING = "refusing"  # a 403 or a close on its way
    CLOSED = "closed"


# What a phase holds of the pod's share while the connection is in it.
# HANDSHAKING is inbound only: a pod's own handshakes (as client) are counted apart, in upstream.connect.
PHASE_HOLDS = {Phase.DETECTING: Limit.DETECTIONS, Phase.HANDSHAKING: Limit.INBOUND_HANDSHAKES}
CONNECTION_LIMIT = {Direction.INBOUND: Limit.INBOUND_CONNECTIONS, Direction.OUTBOUND: Limit.OUTBOUND_CONNECTIONS}


NODE_LIMIT = "node-connections"
MEMORY_LIMIT = "memory"  # the node's proxy is near its memory budget (overload.py)


class Refused(Exception):
    """A connection or phase the pod's share (or the node's) has no room for."""

    def __init__(self, limit: str):
        super().__init__(f"{limit} limit")
        self.limit = limit  # the limit's name (limits.Limit values, or NODE_LIMIT)


class Connection:
    """One client connection: its pod, direction and phase, and its counters once labelled."""

    __slots__ = ("table", "pod", "direction", "phase", "stats", "revoke", "peer", "port", "transports", "on_drain")

    def __init__(self, table: "ConnectionTable", pod, direction: Direction, phase: Phase):
        self.table, self.pod, self.direction, self.phase = table, pod, direction, phase
        self.stats = None  # metrics.ConnectionStats, once the peer is known
        self.revoke: Callable[[], None] | None = None  # ends it when its pod's policy stops admitting it
        self.peer = None  # inbound: the policy's Client, for re-authorization
        self.port = 0  # inbound: the destination port it was authorized for
        self.transports: list = []  # its client side, and its upstream (or app) side once open
        self.on_drain: Callable[[], None] | None = None  # asks it to end at its next clean point

    def drains_with(self, on_drain: Callable[[], None]) -> None:
        """How this connection ends well (an HTTP server's drain); called at once if the table
        drains or its pod has left (it was still detecting or handshaking when the pod retired)."""
        self.on_drain = on_drain
        if self.table.drain_state is Drain.DRAINING or self.pod in self.table._retired:
            on_drain()

    def hold(self, transport) -> None:
        """A transport of this connection: what it buffers counts as the connection's."""
        self.transports.append(transport)

    def buffered(self) -> int:
        """Bytes the proxy holds in write buffers for this connection (what a slow peer makes it keep)."""
        return sum(t.get_write_buffer_size() for t in self.transports if not t.is_closing())

    def cut(self, reason: str) -> None:
        """End it at once (memory pressure, a drain deadline): its stages settle it as it closes."""
        self.table.on_cut(self, reason)
        for transport in self.transports:
            transport.abort()

    def enter(self, phase: Phase) -> None:
        """Move to `phase`, taking what it holds of the pod's share; Refused if there is no room."""
        if self.phase is Phase.CLOSED or phase is self.phase:
            return
        wanted = PHASE_HOLDS.get(phase)
        if wanted is not None and not self.pod.quota.take(wanted):
            raise Refused(wanted.value)
        held = PHASE_HOLDS.get(self.phase)
        if held is not None:
            self.pod.quota.give(held)
        self.phase = phase

    def label(self, metrics, peer: str, tls: bool):
        """Counted as open from here on, under `peer` and `tls` (once; later calls keep the first)."""
        if self.stats is None and self.phase is not Phase.CLOSED:
            self.stats = metrics.connection(self.direction.value, self.pod, peer, tls)
        return self.stats

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    def close(self, read: int = 0, written: int = 0, spliced: int = 0) -> None:
        """Give back what it holds and count it: exactly once, whoever calls first."""
        if self.phase is Phase.CLOSED:
            return
        held = PHASE_HOLDS.get(self.phase)
        if held is not None:
            self.pod.quota.give(held)
        self.phase = Phase.CLOSED
        self.transports = []
        self.pod.quota.give(CONNECTION_LIMIT[self.direction])
        self.table._closed(self)
        if self.stats is not None:
            self.stats.read += read
            self.stats.written += written
            self.stats.spliced += spliced
            self.stats.close()


class ConnectionTable:
    """The node's connections: admission against the node's and the pods' limits, and each
    pod's live set. `on_refused(pod, direction, limit)` hears every refusal (metrics, logs)."""

    def __init__(self, max_connections: int, on_refused: Callable[[object, Direction, str], None],
                 on_cut: Callable[[Connection, str], None] = lambda connection, reason: None):
        self.max_connections = max_connections
        self.on_refused, self.on_cut = on_refused, on_cut
        self.admitting: Callable[[], bool] = lambda: True  # False under memory pressure (overload.py)
        self.open_count = 0
        self.drain_state = Drain.SERVING
        self._live: dict[str, dict[Connection, None]] = {}  # pod key -> its connections, insertion-ordered
        self._retired: dict[object, Callable[[], None]] = {}  # a departed pod (its context) -> its release

    def admit(self, pod, direction: Direction, phase: Phase) -> Connection | None:
        """A new client connection in `phase`, or None (refused, already reported)."""
        if self.open_count >= self.max_connections:
            self.on_refused(pod, direction, NODE_LIMIT)
            return None
        if not self.admitting():
            self.on_refused(pod, direction, MEMORY_LIMIT)
            return None
        if not pod.quota.take(CONNECTION_LIMIT[direction]):
            self.on_refused(pod, direction, CONNECTION_LIMIT[direction].value)
            return None
        wanted = PHASE_HOLDS.get(phase)
        if wanted is not None and not pod.quota.take(wanted):
            pod.quota.give(CONNECTION_LIMIT[direction])
            self.on_refused(pod, direction, wanted.value)
            return None
        connection = Connection(self, pod, direction, phase)
        self.open_count += 1
        self._live.setdefault(pod.key, {})[connection] = None
        return connection

    def refused(self, connection: Connection, refused: Refused) -> None:
        """A phase had no room: report it (the caller closes the connection)."""
        self.on_refused(connection.pod, connection.direction, refused.limit)

    def _closed(self, connection: Connection) -> None:
        self.open_count -= 1
        live = self._live.get(connection.pod.key)
        if live is not None:
            live.pop(connection, None)
            if not live:
                del self._live[connection.pod.key]
        if self._retired and connection.pod in self._retired and not self._holds(connection.pod):
            self._retired.pop(connection.pod)()

    def retire(self, pod, release: Callable[[], None]) -> None:
        """`pod` (its context) left: its connections that can end well are asked to, and
        `release` runs when the last of its connections has closed (now, if it has none). A pod
        that joins again is a new context: its connections are not these."""
        mine = [c for c in self._live.get(pod.key, ()) if c.pod is pod]
        if not mine:
            release()
            return
        self._retired[pod] = release
        for connection in mine:
            if connection.on_drain is not None:
                connection.on_drain()

    def retired(self) -> int:
        """Departed pods whose connections have not all ended yet (/debug/memory, tests)."""
        return len(self._retired)

    def _holds(self, pod) -> bool:
        return any(c.pod is pod for c in self._live.get(pod.key, ()))

    def drain(self) -> None:
        """Ask every connection that can end well to do so (later ones as they reach such a phase)."""
        self.drain_state = Drain.DRAINING
        for connection in self.all():
            if connection.on_drain is not None:
                connection.on_drain()

    def cut_all(self, reason: str) -> int:
        """End every connection at once (the drain deadline); how many there were."""
        connections = self.all()
        for connection in connections:
            connection.cut(reason)
        return len(connections)

    def all(self) -> list[Connection]:
        return [c for live in self._live.values() for c in live]

    def live(self, pod_key: str) -> list[Connection]:
        return list(self._live.get(pod_key, ()))

    def count(self, pod_key: str) -> int:
        return len(self._live.get(pod_key, ()))

    def pods(self) -> list[str]:
        return list(self._live)
