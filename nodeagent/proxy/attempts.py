"""One request's attempts, for HTTP/1 and HTTP/2 alike: choose an endpoint (the balancer),
get a connection to it (the pools, through the hop), run the attempt, and on a failure ask
the request's Retries (proxy/retry.py) whether to go again, preferring endpoints not tried.

The protocol-specific parts are the three callables: `acquire(address)` gives a connection
(raising OSError/TimeoutError when there is none: a CONNECT failure), `attempt(conn, endpoint,
address)` sends the request on it and relays the response (it asks `retries` itself for the
failures it meets, and returns RETRY only when told yes), and `answer(status, reason, address)`
writes the proxy's own error response.
"""

import asyncio
import enum
from collections.abc import Awaitable, Callable

from nodeagent.proxy.retry import Failure, Retries, Verdict

CONNECT_ERRORS = (OSError, asyncio.TimeoutError)


class Outcome(enum.Enum):
    DONE = "done"  # answered; the client's connection may serve on
    CLOSE = "close"  # answered; the client's connection must end (HTTP/1)
    RETRY = "retry"  # this attempt failed and `retries` allowed another


async def run_attempts(target, retries: Retries, acquire: Callable[[tuple], Awaitable[object]],
                       attempt: Callable[[object, object, tuple], Awaitable[Outcome]],
                       answer: Callable[[int, str, tuple | None], Awaitable[Outcome]],
                       tried: set | None = None, first: tuple | None = None) -> Outcome:
    """`tried` and `first`: a request begun elsewhere (HTTP/1's fast path) goes on here with the
    addresses it tried and the (endpoint, address) already chosen for its next attempt."""
    tried = set() if tried is None else tried
    while True:
        choice, first = first or target.choose(tried), None
        if isinstance(choice, str):  # no endpoint to send to: the reason
            return await answer(503, choice, None)
        endpoint, address = choice
        tried.add(address)
        try:
            conn = await acquire(address)
        except CONNECT_ERRORS as e:
            target.connect_failed(endpoint, e)
            status = getattr(e, "status", 502)  # a refusal may say what the client hears (on_node: a 403)
            # The source pod's own limit (upstream.HandshakeLimit) holds for every endpoint: not retried.
            if status == 502 and getattr(e, "retryable", True) and retries.decide(Failure.CONNECT) is Verdict.RETRY:
                continue
            return await answer(status, target.connect_failure_reason(e), address)
        outcome = await attempt(conn, endpoint, address)
        if outcome is not Outcome.RETRY:
            return outcome
