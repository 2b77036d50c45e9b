"""The retry decision shared by HTTP/1 and HTTP/2 (proxy/retry.py): every failure against
every kind of request, then the limit and the budget, in that order."""

import itertools

import pytest

from nodeagent.proxy.retry import Failure, RequestFacts, Retries, Verdict, retryable

GET = RequestFacts("GET", has_body=False)
GET_UPGRADE = RequestFacts("GET", has_body=False, upgrade=True)
PUT_BODY = RequestFacts("PUT", has_body=True)
POST = RequestFacts("POST", has_body=False)
POST_BODY = RequestFacts("POST", has_body=True)
POST_BODY_TOO_LONG = RequestFacts("POST", has_body=True, replayable=False)
GRPC = RequestFacts("POST", has_body=True)  # gRPC calls are POSTs with a body
RETRY_5XX = frozenset(range(500, 600))

# failure -> the requests it may retry (all of the six above otherwise not)
TABLE = {
    Failure.CONNECT: {GET, GET_UPGRADE, PUT_BODY, POST, POST_BODY, GRPC},
    Failure.REFUSED: {GET, GET_UPGRADE, PUT_BODY, POST, POST_BODY, GRPC},
    Failure.LOST: {GET},
    Failure.STATUS: {GET},
    Failure.TIMEOUT: set(),
}
REQUESTS = (GET, GET_UPGRADE, PUT_BODY, POST, POST_BODY, POST_BODY_TOO_LONG)


@pytest.mark.parametrize("failure, request_", list(itertools.product(Failure, REQUESTS)))
def test_what_each_failure_may_retry(failure, request_):
    assert retryable(failure, request_, 503, RETRY_5XX) == (request_ in TABLE[failure])


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"])
def test_idempotent_bodiless_requests_are_safe(method):
    assert RequestFacts(method, has_body=False).safe
    assert not RequestFacts(method, has_body=True).safe


@pytest.mark.parametrize("method", ["POST", "PATCH", "CONNECT", "get"])
def test_other_methods_are_never_safe(method):
    assert not RequestFacts(method, has_body=False).safe


def test_a_status_is_retried_only_if_configured():
    assert retryable(Failure.STATUS, GET, 503, frozenset({503}))
    assert not retryable(Failure.STATUS, GET, 500, frozenset({503}))
    assert not retryable(Failure.STATUS, GET, 503, frozenset())


class Budget:
    def __init__(self, tokens: int):
        self.tokens, self.asked = tokens, 0

    def withdraw(self) -> bool:
        self.asked += 1
        if self.tokens > 0:
            self.tokens -= 1
            return True
        return False


def test_the_limit_comes_before_the_budget_and_only_retries_spend():
    budget, heard = Budget(10), []
    retries = Retries(GET, limit=2, retry_statuses=RETRY_5XX, budget=budget, on_verdict=heard.append)
    assert retries.decide(Failure.LOST) is Verdict.RETRY
    assert retries.decide(Failure.STATUS, 503) is Verdict.RETRY
    assert retries.decide(Failure.CONNECT) is Verdict.LIMIT
    assert budget.asked == 2 and budget.tokens == 8  # the limit did not touch the budget
    assert heard == [Verdict.RETRY, Verdict.RETRY, Verdict.LIMIT]


def test_an_unretryable_failure_neither_spends_nor_is_reported():
    budget, heard = Budget(10), []
    retries = Retries(POST_BODY, limit=3, retry_statuses=RETRY_5XX, budget=budget, on_verdict=heard.append)
    assert retries.decide(Failure.LOST) is Verdict.NOT_RETRYABLE
    assert retries.decide(Failure.TIMEOUT) is Verdict.NOT_RETRYABLE
    assert budget.asked == 0 and heard == [] and retries.used == 0


def test_an_empty_budget_refuses_and_says_so():
    retries = Retries(GET, limit=5, retry_statuses=frozenset(), budget=Budget(1))
    assert [retries.decide(Failure.CONNECT) for _ in range(3)] == [Verdict.RETRY, Verdict.BUDGET, Verdict.BUDGET]
    assert retries.used == 1


def test_wants_status_holds_a_response_back_only_when_it_could_be_retried():
    retries = Retries(GET, limit=1, retry_statuses=frozenset({503}), budget=Budget(5))
    assert retries.wants_status(503) and not retries.wants_status(500)
    retries.decide(Failure.CONNECT)
    assert not retries.wants_status(503)  # the limit is used up
    assert not Retries(POST, limit=1, retry_statuses=frozenset({503}), budget=Budget(5)).wants_status(503)
