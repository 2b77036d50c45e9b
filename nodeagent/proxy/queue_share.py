"""Each pod's share of a queue the whole node's traffic feeds (the access log's lines, the
tracer's spans). Pure: no asyncio, no locks.

Without shares, one pod sending requests as fast as it can fills the queue, and every other
pod's lines and spans are the ones dropped. With them:
- a pod holds at most `per_pod` entries of the `total` at once: over it, its own entries are
  dropped (and counted). The users (accesslog.py, otlp.py) give a pod half: a pod alone keeps
  most of a burst, and one flooding pod leaves the other half to its neighbours;
- every pod may always queue `floor` entries, even past `total`: however many pods flood, a
  quiet one still gets its lines through. So the queue holds at most
  `total + floor x (pods with entries queued)`, and those pods are the node's enrolled ones.

Two threads touch a share: the event loop admits (`admit`), the writer's thread takes entries
off the queue and says whose they were (`taken`). The writer only appends a list to a deque
(thread-safe in CPython); the loop folds those lists into its counts at its next `admit`, so
the counts are the loop's alone and need no lock. Until the writer takes a batch, its entries
still count: a stuck writer leaves every pod at its share or the queue full, never beyond.
"""

import collections
from collections.abc import Hashable


class QueueShares:
    __slots__ = ("total", "per_pod", "floor", "queued", "_held", "_taken")

    def __init__(self, total: int, per_pod: int, floor: int = 0):
        if not 1 <= per_pod <= total:
            raise ValueError(f"a pod's share {per_pod} must be in 1..{total}")
        if not 0 <= floor <= per_pod:
            raise ValueError(f"a pod's floor {floor} must be in 0..{per_pod}")
        self.total, self.per_pod, self.floor = total, per_pod, floor
        self.queued = 0  # entries admitted and not yet taken
        self._held: dict[Hashable, int] = {}  # pod -> its entries in the queue; no more than the queue's
        self._taken: collections.deque[list] = collections.deque()  # from the writer: pods of entries taken

    def admit(self, pod: Hashable) -> bool:
        """May `pod` queue one more entry? If so, it is counted as queued. (The loop's thread.)"""
        if self._taken:
            self._settle()
        held = self._held.get(pod, 0)
        if held >= self.floor and (self.queued >= self.total or held >= self.per_pod):
            return False
        self._held[pod] = held + 1
        self.queued += 1
        return True

    def taken(self, pods: list) -> None:
        """The writer took entries of these pods off the queue. (The writer's thread.)"""
        if pods:
            self._taken.append(pods)

    def held(self, pod: Hashable) -> int:
        """Entries of `pod` counted as queued (the loop's view; for tests and stats)."""
        if self._taken:
            self._settle()
        return self._held.get(pod, 0)

    def _settle(self) -> None:
        held = self._held
        while self._taken:
            for pod in self._taken.popleft():
                left = held[pod] - 1
                if left:
                    held[pod] = left
                else:
                    del held[pod]
                self.queued -= 1
