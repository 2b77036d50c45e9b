"""One client address's share of a pod's mesh handshakes in progress (issue 13).

Anyone who can reach a pod can open connections to its mesh port and stall them after a whole
ClientHello: each holds one of the pod's `inbound-handshakes` until the handshake deadline, so a
few connections a second from one hostile pod kept all of them, and every real mesh client of
the pod was refused. Real mesh clients come from the client pods' own addresses (the hop is
opened inside the client pod), so one address may hold at most a quarter of the pod's
`inbound-handshakes` (at least one); others still find room. Pure: no I/O, no asyncio.
"""

SHARE_DIVISOR = 4
PER_CLIENT_LIMIT = "inbound-handshakes-per-client"  # what a refusal is counted as (limit_exceeded_total)


def share_of(limit: int) -> int:
    """How many of a pod's `limit` handshakes in progress one client address may hold."""
    return max(1, limit // SHARE_DIVISOR)


class SourceHold:
    """One handshake's hold on its address's share: given back once, whoever calls first."""

    __slots__ = ("shares", "source")

    def __init__(self, shares: "SourceShares", source: str):
        self.shares, self.source = shares, source

    def release(self) -> None:
        if self.shares is not None:
            self.shares._give(self.source)
            self.shares = None


class SourceShares:
    """Handshakes in progress per client address, for one pod. Bounded: an address is kept only
    while it holds one, and the pod's `inbound-handshakes` bounds how many are held in all."""

    __slots__ = ("_held",)

    def __init__(self):
        self._held: dict[str, int] = {}

    def take(self, source: str, limit: int) -> SourceHold | None:
        """A hold for one more handshake from `source`, or None: its share of `limit` is taken."""
        held = self._held.get(source, 0)
        if held >= share_of(limit):
            return None
        self._held[source] = held + 1
        return SourceHold(self, source)

    def _give(self, source: str) -> None:
        held = self._held[source] - 1
        if held:
            self._held[source] = held
        else:
            del self._held[source]

    def held(self, source: str) -> int:
        return self._held.get(source, 0)

    def __len__(self) -> int:
        return len(self._held)
