"""HTTP/2 connections from a pod to an endpoint, shared by all the pod's requests to it.

One connection per (pod, endpoint) carries as many concurrent streams as the endpoint
allows (its SETTINGS_MAX_CONCURRENT_STREAMS); another opens only when it is full or going
away. Requests arriving while the first connection is being set up wait for it, so a burst
costs one handshake, not one per request. A connection with no streams for POOL_IDLE_S
closes; one the endpoint sent GOAWAY on takes no new streams and closes when its last
stream ends.
"""

import asyncio
from collections import defaultdict

from nodeagent.proxy.h2peer import H2Peer, StreamEnd, goaway
from nodeagent.proxy.nghttp2 import ErrorCodes
from nodeagent.proxy.upstream import POOL_IDLE_S, connect


class H2Upstream(H2Peer):
    client_side = True
    validate_inbound = False
    idle_s = POOL_IDLE_S

    def connection_made(self, transport):
        # Through a mesh tunnel this is the raw socket, before TLS: the pool calls start()
        # once the connection is ready (for h2, with the tunnel's transport).
        self.transport = transport

    def start(self) -> None:
        super().start()
        self.went_idle()

    def usable(self) -> bool:
        return not self.closed and not self.going_away and self.transport is not None \
            and not self.transport.is_closing()

    def has_room(self) -> bool:
        return len(self.ends) < self.session.remote_max_concurrent_streams()

    def open_stream(self, owner, headers: list, end_stream: bool) -> StreamEnd:
        """A request's stream; its body, unless `end_stream`, follows as a Forward (raises
        CodecError if nghttp2 refuses: out of stream ids, or the session is gone)."""
        stream_id = self.session.submit_request(headers, body=not end_stream)
        end = StreamEnd(self, stream_id, owner)
        self.register(end)
        self.not_idle()
        self.flush_soon()
        return end

    def stream_closed(self) -> None:
        if not self.ends:
            self.went_idle()

    def on_goaway(self, last_stream_id: int | None) -> None:
        """Streams above `last_stream_id` were never processed: they hear REFUSED_STREAM,
        which the exchange may always retry."""
        for end in [e for e in self.ends.values() if last_stream_id is not None and e.id > last_stream_id]:
            self.forget(end.id)
            end.incoming.abandon()
            end.owner.on_reset(end, ErrorCodes.REFUSED_STREAM)
        if not self.ends:
            goaway(self)


class OnNodeH2Upstream(H2Upstream):
    """A one-hop connection to the destination pod's app (hop.py ON_NODE, target.py): one of the
    destination's inbound connections, which ends with it (`on_lost`, given this connection)
    and drains as the far end of a mesh hop would: no new stream, closed when the last ends."""

    on_lost = None
    received = 0  # bytes read from the app (its inbound connection's "written")

    @property
    def sent(self) -> int:
        return self.bytes_written

    def data_received(self, data):
        self.received += len(data)
        super().data_received(data)

    def connection_lost(self, exc):
        super().connection_lost(exc)
        lost, self.on_lost = self.on_lost, None
        if lost is not None:
            lost(self)

    def drain(self) -> None:
        self.going_away = True
        if self.session is not None and not self.ends:
            goaway(self)


class H2Pool:
    """Shared HTTP/2 connections per (pod netns cookie, endpoint address)."""

    def __init__(self):
        self._conns: dict[tuple, list[H2Upstream]] = defaultdict(list)
        self._opening: dict[tuple, asyncio.Future] = {}

    def ready(self, cookie: int, address: tuple[str, int]) -> H2Upstream | None:
        """A connection with room for one more stream, if one is open already (no wait)."""
        return self._ready((cookie, address))

    def _ready(self, key) -> H2Upstream | None:
        conns = self._conns.get(key)
        if conns:
            for conn in conns:
                if conn.usable() and conn.has_room():
                    return conn
            conns[:] = [c for c in conns if c.usable()]  # none has room: the dead go before another opens
        return None

    async def acquire(self, netns_path: str, cookie: int, address: tuple[str, int], timeout_s: float,
                      tunnel=None, report=None, opener=None) -> H2Upstream:
        """A connection with room for one more stream; `report(Flood)` counts a flood of the
        endpoint's against the pod (on the connection this call opens, if it opens one).
        `opener()`, if given, opens it instead (the one hop: from the destination's namespace)."""
        key = (cookie, address)
        while True:
            conn = self._ready(key)
            if conn is not None:
                return conn
            opening = self._opening.get(key)
            if opening is None:
                break
            await asyncio.shield(opening)  # raises what the connect raised: this request fails alike
        opening = self._opening[key] = asyncio.get_running_loop().create_future()
        try:
            transport, conn = await (opener() if opener is not None
                                     else connect(netns_path, address, timeout_s, H2Upstream, tunnel))
            conn.transport, conn.report = transport, report
            conn.start()
        except BaseException as e:
            opening.set_exception(e if isinstance(e, Exception) else ConnectionError("cancelled"))
            opening.exception()  # retrieved: waiters get it, nobody else need
            raise
        finally:
            del self._opening[key]
        self._conns[key].append(conn)
        opening.set_result(None)
        return conn

    def adopt(self, cookie: int, address: tuple[str, int], transport: asyncio.Transport, received: bytes,
              report=None) -> None:
        """A fresh connection opened for another purpose (the eager connect) joins the pool,
        with what the server sent on it so far (its SETTINGS)."""
        conn = H2Upstream(report=report)
        transport.set_protocol(conn)
        conn.connection_made(transport)
        conn.start()
        if received:
            conn.data_received(received)
        self._conns[(cookie, address)].append(conn)

    def forget_pod(self, cookie: int) -> None:
        for key in [k for k in self._conns if k[0] == cookie]:
            for conn in self._conns.pop(key):
                goaway(conn)
