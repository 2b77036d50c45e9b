"""The retry budget: retries may add RATIO of the requests, plus a floor of
MIN_PER_S retries a second, both over a sliding window of TTL_S seconds
(Linkerd's defaults: 20%, 10/s, 10 s). Pure: the clock is given.
"""

from collections import deque
from collections.abc import Callable

RATIO = 0.2
MIN_PER_S = 10.0
TTL_S = 10.0


class RetryBudget:
    def __init__(self, now: Callable[[], float], ratio: float = RATIO, min_per_s: float = MIN_PER_S,
                 ttl_s: float = TTL_S):
        if not 0 <= ratio <= 1000 or min_per_s < 0 or not 1 <= ttl_s <= 60:
            raise ValueError("retry budget: ratio in [0, 1000], min_per_s >= 0, ttl in [1, 60] s")
        self._now = now
        self.ratio, self.min_per_s, self.ttl_s = ratio, min_per_s, ttl_s
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _expire(self) -> None:
        horizon = self._now() - self.ttl_s
        for events in (self._requests, self._retries):
            while events and events[0] <= horizon:
                events.popleft()

    def deposit(self) -> None:
        """A request (not a retry) was sent."""
        self._requests.append(self._now())

    def balance(self) -> float:
        self._expire()
        return self.ratio * len(self._requests) + self.min_per_s * self.ttl_s - len(self._retries)

    def withdraw(self) -> bool:
        """May one more retry be sent? Counts it if so."""
        if self.balance() < 1:
            return False
        self._retries.append(self._now())
        return True
