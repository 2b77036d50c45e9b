"""Circuit breaking by failure accrual (linkerd2-proxy's defaults).

CONSECUTIVE_FAILURES failures in a row eject an endpoint. After a backoff it is
on probation: one request may probe it; success restores it, failure ejects it
again with the backoff doubled, from MIN_BACKOFF_S up to MAX_BACKOFF_S, with
jitter so that many proxies do not probe at once. Pure: clock and jitter given.
"""

from collections.abc import Callable
from enum import Enum

CONSECUTIVE_FAILURES = 7
MIN_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0


class State(Enum):
    READY = "ready"
    EJECTED = "ejected"
    PROBATION = "probation"  # backoff elapsed; the next request is the probe
    PROBING = "probing"  # the probe is in flight


class FailureAccrual:
    def __init__(self, now: Callable[[], float], jitter: Callable[[], float] = lambda: 0.0,
                 consecutive: int = CONSECUTIVE_FAILURES, min_backoff_s: float = MIN_BACKOFF_S,
                 max_backoff_s: float = MAX_BACKOFF_S):
        if consecutive < 1 or not 0 < min_backoff_s <= max_backoff_s:
            raise ValueError("failure accrual: consecutive >= 1 and 0 < min backoff <= max backoff")
        self._now, self._jitter = now, jitter
        self.consecutive, self.min_backoff_s, self.max_backoff_s = consecutive, min_backoff_s, max_backoff_s
        self.failures = 0
        self.backoff_s = min_backoff_s
        self._state = State.READY
        self._until = 0.0
        self.ejections = 0

    @property
    def state(self) -> State:
        if self._state is State.EJECTED and self._now() >= self._until:
            self._state = State.PROBATION
        return self._state

    def available(self) -> bool:
        """May a request be sent here now?"""
        return self.state in (State.READY, State.PROBATION)

    def on_send(self) -> None:
        if self.state is State.PROBATION:
            self._state = State.PROBING

    def on_success(self) -> None:
        self.failures = 0
        if self.state is State.EJECTED:
            return  # a request sent before the ejection; only the probe may restore
        if self._state is not State.READY:
            self.backoff_s = self.min_backoff_s
        self._state = State.READY

    def on_failure(self) -> None:
        self.failures += 1
        if self._state is State.PROBING:
            self.backoff_s = min(self.backoff_s * 2, self.max_backoff_s)
            self._eject()
        elif self._state is State.READY and self.failures >= self.consecutive:
            self._eject()

    def _eject(self) -> None:
        self._state = State.EJECTED
        self._until = self._now() + self.backoff_s * (1 + self._jitter())
        self.ejections += 1
