"""Per-request load balancing: power of two choices over peak-EWMA latency.

As linkerd2-proxy (tower's PeakEwma): each endpoint's cost is its
latency estimate times (requests in flight + 1). The estimate jumps up to any
slower observation at once (peak) and decays toward faster ones with time
constant DECAY_S. Reading the cost decays the estimate toward zero for the
time since its last update (as tower's RttEstimate::decay), so an endpoint
that was slow once and then left alone becomes worth trying again. A new
endpoint starts at the median estimate of the endpoints it joins (DEFAULT_RTT_S
when it joins none): started at DEFAULT_RTT_S beside endpoints answering in a
millisecond, it lost every comparison until its estimate had decayed below theirs
(about 34 s), whenever requests did not overlap (cost = estimate x 1), so a pod
that joined a Service got no request for half a minute. Pure: the clock and the
random source are given.
"""

import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

DEFAULT_RTT_S = 0.030
DECAY_S = 10.0


@dataclass
class PeakEwma:
    now: Callable[[], float]
    rtt_s: float = DEFAULT_RTT_S
    decay_s: float = DECAY_S
    pending: int = 0
    stamp: float = field(default=0.0)

    def __post_init__(self):
        if self.decay_s <= 0 or self.rtt_s < 0:
            raise ValueError("decay must be positive and the default RTT non-negative")
        self.stamp = self.now()

    def observe(self, rtt_s: float) -> None:
        now = self.now()
        if rtt_s > self.rtt_s:
            self.rtt_s = rtt_s
        else:
            weight = math.exp(-max(now - self.stamp, 0.0) / self.decay_s)
            self.rtt_s = self.rtt_s * weight + rtt_s * (1 - weight)
        self.stamp = now

    def estimate(self) -> float:
        """The latency estimate now (decayed for the time since its last update)."""
        self.observe(0.0)
        return self.rtt_s

    def cost(self) -> float:
        return self.estimate() * (self.pending + 1)

    def start(self) -> float:
        """A request starts: returns its start time, for `finish`."""
        self.pending += 1
        return self.now()

    def finish(self, started: float) -> None:
        self.pending = max(self.pending - 1, 0)
        self.observe(self.now() - started)


def prior(peers: Sequence[PeakEwma]) -> float:
    """Where a new endpoint's estimate starts: the median of the endpoints it joins."""
    return statistics.median(p.estimate() for p in peers) if peers else DEFAULT_RTT_S


def p2c(candidates: Sequence, cost: Callable[[object], float], rng: random.Random) -> object:
    """Pick two distinct candidates at random and return the cheaper one."""
    if not candidates:
        raise ValueError("no candidates")
    if len(candidates) == 1:
        return candidates[0]
    a, b = rng.sample(range(len(candidates)), 2)
    return candidates[a] if cost(candidates[a]) <= cost(candidates[b]) else candidates[b]
