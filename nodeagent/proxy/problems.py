"""Problems on connections, logged without flooding the log.

Every refusal and every exception the proxy catches on a connection is logged, not only
counted. What a pod can trigger at will (a handshake refused, a policy denial, a malformed
request) must not become a log flood, so each kind of problem has a token bucket: BURST
lines at once, then RATE_PER_S; what is held back is counted and said with the next line that
gets through. An exception's traceback is logged the first time its (kind, type, place) is
seen, then only its one-line message. Memory is bounded: at most MAX_KINDS buckets and
MAX_TRACEBACKS places are remembered (least recently used go first).
"""

import logging
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable

BURST = 10
RATE_PER_S = 1.0
MAX_KINDS = 256
MAX_TRACEBACKS = 256


class _Bucket:
    __slots__ = ("tokens", "stamp", "suppressed")

    def __init__(self, now: float):
        self.tokens, self.stamp, self.suppressed = float(BURST), now, 0


class ProblemLog:
    def __init__(self, logger: logging.Logger, clock: Callable[[], float] = time.monotonic):
        self.logger, self.clock = logger, clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._traced: OrderedDict[tuple, None] = OrderedDict()

    def _admit(self, kind: str) -> tuple[bool, int]:
        """(may log now, lines suppressed since the last one)."""
        now = self.clock()
        bucket = self._buckets.pop(kind, None) or _Bucket(now)
        self._buckets[kind] = bucket
        if len(self._buckets) > MAX_KINDS:
            self._buckets.popitem(last=False)
        bucket.tokens = min(BURST, bucket.tokens + (now - bucket.stamp) * RATE_PER_S)
        bucket.stamp = now
        if bucket.tokens < 1:
            bucket.suppressed += 1
            return False, 0
        bucket.tokens -= 1
        suppressed, bucket.suppressed = bucket.suppressed, 0
        return True, suppressed

    def warning(self, kind: str, message: str, *args) -> None:
        """A refusal or a peer's error: `kind` is a short fixed string (the bucket)."""
        admitted, suppressed = self._admit(kind)
        if admitted:
            self.logger.warning(message + _more(suppressed), *args)

    def exception(self, kind: str, error: BaseException, context: str) -> None:
        """An exception caught on a connection: the traceback once per place, then one line."""
        admitted, suppressed = self._admit(kind)
        if not admitted:
            return
        frames = traceback.extract_tb(error.__traceback__)
        place = (kind, type(error).__name__, frames[-1].filename, frames[-1].lineno) if frames else (kind,)
        first = place not in self._traced
        self._traced[place] = None
        self._traced.move_to_end(place)
        if len(self._traced) > MAX_TRACEBACKS:
            self._traced.popitem(last=False)
        self.logger.error("%s: %s: %s%s", context, type(error).__name__, error, _more(suppressed),
                          exc_info=error if first else None)


def _more(suppressed: int) -> str:
    return f" ({suppressed} more like this not logged)" if suppressed else ""
