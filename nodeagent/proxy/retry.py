"""May a failed attempt be sent again? One answer for HTTP/1 and HTTP/2. Pure.

What failed decides what is safe to repeat (as linkerd2-proxy without a retry policy):

| failure | retried when |
|---|---|
| CONNECT: no connection to the endpoint | the request can be sent again (its body, if any, is still whole) |
| REFUSED: the endpoint did not process it (REFUSED_STREAM, above GOAWAY) | the same |
| LOST: sent, then the connection or stream ended before a response | the request is safe: idempotent, no body |
| STATUS: a response whose status the Service retries | the request is safe, and the status is configured |
| TIMEOUT: the request's timeout passed | never |

Then two bounds, checked in this order and only if the failure is retryable: the Service's
retry limit (retries per request), and its retry budget (retries as a share of requests), which
is withdrawn from here and nowhere else.
"""

import enum
from dataclasses import dataclass

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class Failure(enum.Enum):
    CONNECT = "connect"
    REFUSED = "refused"
    LOST = "lost"
    STATUS = "status"
    TIMEOUT = "timeout"


class Verdict(enum.Enum):
    RETRY = "retry"
    NOT_RETRYABLE = "not retryable"  # the failure or the request rules it out
    LIMIT = "retry limit"  # this request has used its retries
    BUDGET = "retry budget"  # the Service's budget is spent (a retry storm is cut here)


@dataclass(frozen=True)
class RequestFacts:
    """What a retry decision needs to know of a request."""

    method: str
    has_body: bool
    upgrade: bool = False  # an HTTP/1 Upgrade: the connection may switch protocols
    replayable: bool = True  # its body (if any) can be sent again whole

    @property
    def safe(self) -> bool:
        """Safe to send twice after it may have been processed: idempotent, no body."""
        return self.method in IDEMPOTENT_METHODS and not self.has_body and not self.upgrade


def retryable(failure: Failure, request: RequestFacts, status: int | None = None,
              retry_statuses: frozenset[int] = frozenset()) -> bool:
    """Whether this failure of this request may be retried at all (before limits and budget)."""
    if failure in (Failure.CONNECT, Failure.REFUSED):
        return request.replayable
    if failure is Failure.LOST:
        return request.safe
    if failure is Failure.STATUS:
        return request.safe and status in retry_statuses
    return False


class Retries:
    """One request's retries: its limit, and the Service's budget. `budget` is a RetryBudget
    (withdraw() -> bool); `on_verdict`, if given, hears every verdict past NOT_RETRYABLE (metrics)."""

    __slots__ = ("request", "limit", "retry_statuses", "budget", "on_verdict", "used")

    def __init__(self, request: RequestFacts, limit: int, retry_statuses: frozenset[int], budget,
                 on_verdict=None):
        self.request, self.limit, self.retry_statuses = request, limit, retry_statuses
        self.budget, self.on_verdict = budget, on_verdict
        self.used = 0

    def wants_status(self, status: int) -> bool:
        """Whether a response with this status would be retried if the bounds allow: the caller
        holds the response back only then."""
        return (status in self.retry_statuses and self.used < self.limit  # most Services retry no status
                and retryable(Failure.STATUS, self.request, status, self.retry_statuses))

    def decide(self, failure: Failure, status: int | None = None) -> Verdict:
        if not retryable(failure, self.request, status, self.retry_statuses):
            return Verdict.NOT_RETRYABLE
        if self.used >= self.limit:
            verdict = Verdict.LIMIT
        elif not self.budget.withdraw():
            verdict = Verdict.BUDGET
        else:
            self.used += 1
            verdict = Verdict.RETRY
        if self.on_verdict is not None:
            self.on_verdict(verdict)
        return verdict
