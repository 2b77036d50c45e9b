"""The retry budget: retries may add RATIO of the requests, plus a floor of
MIN_PER_S retries a second, both over a sliding window of TTL_S seconds
(Linkerd's defaults: 20%, 10/s, 10 s). Pure: the clock is given.

Memory is constant whatever the traffic: requests and retries are counted in
SLICES time slices of TTL_S / SLICES each (Finagle's WindowedAdder does the
same), so the window slides by a slice at a time: an event is forgotten between
TTL_S and TTL_S + one slice after it happened. (It used to keep a timestamp per
request, trimmed only when a retry was considered: 41 bytes per request that
never came back while nothing failed.)
"""

from collections.abc import Callable

RATIO = 0.2
MIN_PER_S = 10.0
TTL_S = 10.0
SLICES = 10


class RetryBudget:
    __slots__ = ("_now", "ratio", "min_per_s", "ttl_s", "_width", "_head", "_requests", "_retries",
                 "_request_total", "_retry_total")

    def __init__(self, now: Callable[[], float], ratio: float = RATIO, min_per_s: float = MIN_PER_S,
                 ttl_s: float = TTL_S):
        if not 0 <= ratio <= 1000 or min_per_s < 0 or not 1 <= ttl_s <= 60:
            raise ValueError("retry budget: ratio in [0, 1000], min_per_s >= 0, ttl in [1, 60] s")
        self._now = now
        self.ratio, self.min_per_s, self.ttl_s = ratio, min_per_s, ttl_s
        self._width = ttl_s / SLICES
        self._head = int(now() // self._width)  # the slice counting now
        self._requests = [0] * SLICES
        self._retries = [0] * SLICES
        self._request_total = self._retry_total = 0

    def _advance(self) -> int:
        """Forget the slices that left the window; the index of the current one."""
        current = int(self._now() // self._width)
        if current > self._head:
            for index in range(self._head + 1, min(current, self._head + SLICES) + 1):
                slot = index % SLICES
                self._request_total -= self._requests[slot]
                self._retry_total -= self._retries[slot]
                self._requests[slot] = self._retries[slot] = 0
            self._head = current
        return self._head % SLICES

    def deposit(self) -> None:
        """A request (not a retry) was sent."""
        self._requests[self._advance()] += 1
        self._request_total += 1

    def balance(self) -> float:
        self._advance()
        return self.ratio * self._request_total + self.min_per_s * self.ttl_s - self._retry_total

    def withdraw(self) -> bool:
        """May one more retry be sent? Counts it if so."""
        if self.balance() < 1:
            return False
        self._retries[self._head % SLICES] += 1
        self._retry_total += 1
        return True
