import random

import pytest

from nodeagent.proxy.accrual import FailureAccrual, State
from nodeagent.proxy.balance import DEFAULT_RTT_S, PeakEwma, p2c
from nodeagent.proxy.budget import RetryBudget


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


# --- peak EWMA and P2C ---

def test_new_endpoint_starts_at_the_default_rtt():
    assert PeakEwma(Clock()).cost() == pytest.approx(DEFAULT_RTT_S)


def test_a_slower_observation_is_taken_at_once_and_faster_ones_decay_in():
    clock = Clock()
    ewma = PeakEwma(clock)
    ewma.observe(0.5)
    assert ewma.rtt_s == 0.5
    clock.t += 10.0  # one decay constant
    ewma.observe(0.0)
    assert ewma.rtt_s == pytest.approx(0.5 * 0.36788, rel=1e-3)
    clock.t += 100.0
    ewma.observe(0.01)
    assert ewma.rtt_s == pytest.approx(0.01, rel=1e-2)


def test_an_immediate_faster_observation_barely_moves_the_estimate():
    clock = Clock()
    ewma = PeakEwma(clock)
    ewma.observe(0.2)
    ewma.observe(0.001)  # no time passed: weight 1
    assert ewma.rtt_s == pytest.approx(0.2)


def test_reading_the_cost_decays_an_idle_estimate():
    clock = Clock()
    slow, fast = PeakEwma(clock), PeakEwma(clock)
    slow.observe(1.0)
    fast.observe(0.05)
    assert slow.cost() > fast.cost()
    clock.t += 30.0  # the slow endpoint got no traffic; the fast one is still busy
    fast.observe(0.05)
    assert slow.cost() == pytest.approx(1.0 * 0.0498, rel=1e-2)
    assert slow.cost() < fast.cost()


def test_pending_requests_raise_the_cost():
    clock = Clock()
    ewma = PeakEwma(clock)
    started = [ewma.start() for _ in range(3)]
    assert ewma.cost() == pytest.approx(DEFAULT_RTT_S * 4)
    clock.t += 0.05
    ewma.finish(started[0])
    assert ewma.pending == 2 and ewma.rtt_s == pytest.approx(0.05)


def test_invalid_configuration_is_refused():
    with pytest.raises(ValueError):
        PeakEwma(Clock(), decay_s=0)


def test_p2c_prefers_the_cheaper_of_two_and_spreads_among_equals():
    costs = {"fast": 0.01, "slow": 1.0, "mid": 0.1}
    rng = random.Random(7)
    picks = [p2c(list(costs), costs.get, rng) for _ in range(3000)]
    assert picks.count("slow") == 0  # it loses every pair it is in
    assert picks.count("fast") == pytest.approx(2000, rel=0.1)  # wins the 2 of 3 pairs it is in
    equal = [p2c(["a", "b", "c"], lambda _: 1.0, rng) for _ in range(3000)]
    assert all(equal.count(x) > 700 for x in "abc")


def test_an_endpoint_that_joins_fast_peers_starts_at_their_median_and_is_chosen_at_once():
    """Started at DEFAULT_RTT_S beside endpoints answering in a millisecond, a joining endpoint
    lost every comparison for about 34 s when requests did not overlap (found by the surge roll
    on a real node: a pod that joined a Service answered no request)."""
    from nodeagent.cluster.model import Endpoint
    from nodeagent.proxy.endpoints import EndpointSet

    clock, rng = Clock(), random.Random(7)
    endpoints = EndpointSet(rng=rng, clock=clock)
    endpoints.update(tuple(Endpoint(f"10.0.0.{i}", 80, None) for i in (1, 2, 3)))
    assert all(s.ewma.rtt_s == DEFAULT_RTT_S for s in endpoints.states.values())  # nothing to join: the default
    for _ in range(60):  # a minute of answers in 1, 2 and 4 ms
        clock.t += 1.0
        for rtt, state in zip((0.001, 0.002, 0.004), endpoints.states.values()):
            state.ewma.observe(rtt)
    peers = sorted(s.ewma.estimate() for s in endpoints.states.values())
    assert peers[-1] < 0.005
    endpoints.update((*(s.endpoint for s in endpoints.states.values()), Endpoint("10.0.0.9", 80, None)))
    joined = endpoints.states[("10.0.0.9", 80)]
    assert joined.ewma.rtt_s == pytest.approx(peers[1])  # their median
    chosen = []
    for _ in range(200):  # requests one at a time, each answered in 1 ms wherever it went
        state = endpoints.choose_for_request()
        started = state.ewma.start()
        clock.t += 0.001
        state.ewma.finish(started)
        chosen.append(state.address)
    assert chosen.count(("10.0.0.9", 80)) >= 20


def test_p2c_with_one_or_no_candidates():
    assert p2c(["only"], lambda _: 1.0, random.Random()) == "only"
    with pytest.raises(ValueError):
        p2c([], lambda _: 1.0, random.Random())


# --- retry budget ---

def test_budget_allows_the_floor_when_idle_then_refuses():
    budget = RetryBudget(Clock())
    assert sum(budget.withdraw() for _ in range(150)) == 100  # 10/s over 10 s


def test_budget_grows_with_requests_and_forgets_after_the_window():
    clock = Clock()
    budget = RetryBudget(clock, min_per_s=0)
    for _ in range(100):
        budget.deposit()
    assert sum(budget.withdraw() for _ in range(50)) == 20
    clock.t += 10.0
    assert budget.balance() == 0 and not budget.withdraw()


def test_a_retry_storm_is_cut_to_the_budget():
    clock = Clock()
    budget = RetryBudget(clock)
    retried = 0
    for _ in range(1000):  # 1,000 requests in one second, every one failing
        budget.deposit()
        retried += budget.withdraw()
        clock.t += 0.001
    assert retried == 300  # 20% of 1,000 + 10/s * 10 s


@pytest.mark.parametrize("kwargs", [{"ratio": -1}, {"min_per_s": -1}, {"ttl_s": 0.5}, {"ttl_s": 61}])
def test_budget_configuration_is_validated(kwargs):
    with pytest.raises(ValueError):
        RetryBudget(Clock(), **kwargs)


# --- failure accrual ---

def test_seven_consecutive_failures_eject_and_a_success_resets_the_count():
    accrual = FailureAccrual(Clock())
    for _ in range(6):
        accrual.on_failure()
    accrual.on_success()
    for _ in range(6):
        accrual.on_failure()
    assert accrual.state is State.READY
    accrual.on_failure()
    assert accrual.state is State.EJECTED and not accrual.available()


def test_probation_backoff_doubles_to_the_maximum_and_success_restores():
    clock = Clock()
    accrual = FailureAccrual(clock)
    for _ in range(7):
        accrual.on_failure()
    waits = []
    for _ in range(8):
        start = clock.t
        while not accrual.available():
            clock.t += 0.5
        waits.append(clock.t - start)
        assert accrual.state is State.PROBATION
        accrual.on_send()
        assert not accrual.available()  # one probe at a time
        accrual.on_failure()
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    clock.t += 60
    accrual.on_send()
    accrual.on_success()
    assert accrual.state is State.READY and accrual.backoff_s == 1.0


def test_a_late_success_does_not_lift_an_ejection():
    accrual = FailureAccrual(Clock())
    for _ in range(7):
        accrual.on_failure()
    accrual.on_success()  # a request sent before the ejection
    assert accrual.state is State.EJECTED


def test_jitter_stretches_the_backoff():
    clock = Clock()
    accrual = FailureAccrual(clock, jitter=lambda: 0.5)
    for _ in range(7):
        accrual.on_failure()
    clock.t += 1.4
    assert not accrual.available()
    clock.t += 0.1
    assert accrual.available()


def test_accrual_configuration_is_validated():
    with pytest.raises(ValueError):
        FailureAccrual(Clock(), min_backoff_s=5, max_backoff_s=1)


def test_budget_memory_is_constant_whatever_the_traffic():
    import sys

    clock = Clock()
    budget = RetryBudget(clock)
    sizes = set()
    for second in range(100):
        for _ in range(10_000):
            budget.deposit()
        clock.t += 1.0
        sizes.add(sum(sys.getsizeof(getattr(budget, name)) for name in ("_requests", "_retries")))
    assert len(sizes) == 1  # a million requests later, the same two lists of SLICES counts
    assert budget.balance() == pytest.approx(0.2 * 90_000 + 100)  # the last 9 full slices (the 10th is now)


def test_budget_window_slides_slice_by_slice():
    clock = Clock()
    budget = RetryBudget(clock, min_per_s=0)
    for _ in range(10):  # 10 requests in each of the first 10 seconds
        for _ in range(10):
            budget.deposit()
        clock.t += 1.0
    assert budget.balance() == pytest.approx(0.2 * 90)  # at t=10 the first second has left the window
    clock.t += 5.0
    assert budget.balance() == pytest.approx(0.2 * 40)
    clock.t += 100.0
    assert budget.balance() == 0
