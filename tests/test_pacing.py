"""A pod's pace of new mutual-TLS handshakes (proxy/pacing.py, limits.Quota.handshake_turn):
plain values, every case. Rates and times are chosen so that the arithmetic is exact in floats."""

import pytest

from nodeagent.proxy import limits
from nodeagent.proxy.limits import Limit, Quota
from nodeagent.proxy.pacing import BURST_S, MAX_WAIT_S, Pace


def turns(pace: Pace, now: float, rate: int, count: int) -> list:
    return [pace.turn(now, rate) for _ in range(count)]


def test_a_fresh_pod_starts_a_bursts_worth_at_once():
    assert BURST_S == 1.0 and MAX_WAIT_S == 0.5  # the values the cases below are worked out for
    assert turns(Pace(), 100.0, 8, 8) == [0.0] * 8


def test_past_the_burst_each_handshake_waits_its_turn_in_order_then_is_refused():
    pace = Pace()
    turns(pace, 0.0, 8, 8)
    # one turn every 1/rate s, up to MAX_WAIT_S ahead; the fifth would be 0.625 s away
    assert turns(pace, 0.0, 8, 6) == [0.125, 0.25, 0.375, 0.5, None, None]


def test_a_refusal_takes_nothing():
    pace = Pace()
    turns(pace, 0.0, 4, 6)  # the burst and every turn up to half a second ahead
    assert turns(pace, 0.0, 4, 3) == [None] * 3
    assert pace.turn(0.25, 4) == 0.5  # a quarter second later, one more turn, as without the refusals
    assert pace.turn(0.25, 4) is None


def test_tokens_come_back_with_time_and_never_above_the_burst():
    pace = Pace()
    turns(pace, 0.0, 4, 4)
    assert pace.turn(0.5, 4) == 0.0  # two tokens back after half a second: one used
    assert pace.turn(0.5, 4) == 0.0
    assert pace.turn(0.5, 4) == 0.25
    assert turns(pace, 3600.0, 4, 5) == [0.0, 0.0, 0.0, 0.0, 0.25]  # an hour idle: a burst, not more


def test_a_pod_that_keeps_to_its_rate_never_waits():
    pace = Pace()
    assert [pace.turn(t * 0.25, 4) for t in range(100)] == [0.0] * 100


def test_a_pod_at_twice_its_rate_is_slowed_to_it_and_the_rest_refused():
    pace, served = Pace(), []
    for step in range(80):  # 8 per second for 10 s, at a rate of 4
        served.append(pace.turn(step * 0.125, 4))
    accepted = [w for w in served if w is not None]
    # the burst, half a second of turns ahead, and the rate over the 9.875 s: never more
    assert len(accepted) == 4 + 2 + 39
    assert all(w <= MAX_WAIT_S for w in accepted)
    assert served[-2:] == [0.5, None]  # in the steady state every other one is refused


def test_a_lower_rate_applies_at_once_and_a_clock_that_steps_back_adds_nothing():
    pace = Pace()
    pace.turn(10.0, 100)  # 99 tokens saved
    assert pace.turn(10.0, 2) == 0.0  # clamped to the new burst (2), one taken
    assert pace.turn(10.0, 2) == 0.0
    assert pace.turn(10.0, 2) == 0.5
    assert pace.turn(9.0, 2) is None  # no tokens from a step back
    assert pace.turn(10.5, 2) == 0.5  # nor later: only the half second after 10.0 counts


def test_a_rate_of_one_allows_one_a_second():
    pace = Pace()
    assert turns(pace, 0.0, 1, 3) == [0.0, None, None]
    assert pace.turn(0.5, 1) == 0.5


def test_the_quota_keeps_one_pace_per_direction_each_under_its_own_limit():
    quota = Quota(limits.parse("handshake-rate=4,inbound-handshake-rate=2"))
    assert [quota.handshake_turn("outbound", 0.0) for _ in range(7)] == [0.0] * 4 + [0.25, 0.5, None]
    assert [quota.handshake_turn("inbound", 0.0) for _ in range(4)] == [0.0, 0.0, 0.5, None]  # apart
    quota.limits = limits.parse("handshake-rate=8")  # an annotation changed: turns come faster
    assert quota.handshake_turn("outbound", 0.0) == 0.375  # the 2 turns given still come first
    assert quota.handshake_turn("outbound", 0.25) == 0.25


def test_the_rates_are_limits_like_the_others():
    assert limits.PodLimits()[Limit.HANDSHAKE_RATE] == 50
    assert limits.PodLimits()[Limit.INBOUND_HANDSHAKE_RATE] == 200
    pod_limits, errors = limits.from_annotations({}, limits.PodLimits(), {"limits.nodeagent.io/handshake-rate": "500"})
    assert pod_limits[Limit.HANDSHAKE_RATE] == 500 and not errors
    with pytest.raises(ValueError, match="not in 1"):
        limits.parse("handshake-rate=0")
    assert "handshake-rate=50,inbound-handshake-rate=200" in limits.PodLimits().show()


def test_a_refusal_says_when_the_pods_queue_is_empty_and_a_turn_would_be_given_again():
    pace = Pace()
    assert pace.reopens_at(5.0, 4) == 5.0  # never used: open
    turns(pace, 0.0, 4, 6)  # the burst (4) and 2 turns queued, the last 0.5 s ahead
    assert pace.turn(0.0, 4) is None
    assert pace.reopens_at(0.0, 4) == 0.5  # then the queue is empty
    assert pace.reopens_at(0.25, 4) == 0.5  # the same instant, asked later
    assert pace.turn(0.5, 4) == 0.25 and pace.turn(0.5, 4) == 0.5  # from then on, turns again
    one = Pace()
    assert turns(one, 0.0, 1, 2) == [0.0, None]  # a rate of 1: nothing queued, the next 1 s away
    assert one.reopens_at(0.0, 1) == 0.5  # open once a turn is within MAX_WAIT_S
    assert one.turn(0.5, 1) == 0.5


def test_a_quota_over_its_rate_refuses_outright_until_its_queue_is_empty_and_says_so_once():
    quota, told = Quota(limits.parse("handshake-rate=4")), []
    quota.on_refusing = lambda direction, limit, until: told.append((direction, limit, until))
    assert [quota.handshake_turn("outbound", 0.0) for _ in range(7)] == [0.0] * 4 + [0.25, 0.5, None]
    assert told == [("outbound", Limit.HANDSHAKE_RATE, 0.5)]
    assert quota.refusing("outbound", 0.0) is Limit.HANDSHAKE_RATE
    assert quota.refusing("outbound", 0.49) is Limit.HANDSHAKE_RATE
    assert quota.refusing("outbound", 0.5) is None  # a window ends by itself
    assert quota.refusing("inbound", 0.0) is None  # each direction apart
    assert quota.handshake_turn("outbound", 0.0) is None  # a second refusal at the same point: nothing new
    assert len(told) == 1
    quota.refuse("outbound", Limit.DETECTIONS, 0.2)  # a shorter window does not cut the longer one
    assert quota.refusing("outbound", 0.3) is Limit.HANDSHAKE_RATE and len(told) == 1
    quota.refuse("outbound", Limit.OUTBOUND_CONNECTIONS, 0.7)  # a longer one extends it, and is told
    assert quota.refusing("outbound", 0.6) is Limit.OUTBOUND_CONNECTIONS
    assert told[-1] == ("outbound", Limit.OUTBOUND_CONNECTIONS, 0.7)
    inbound = Quota(limits.parse("inbound-handshake-rate=2"))
    assert [inbound.handshake_turn("inbound", 0.0) for _ in range(4)] == [0.0, 0.0, 0.5, None]
    assert inbound.refusing("inbound", 0.4) is Limit.INBOUND_HANDSHAKE_RATE  # no callback set: still kept
    assert inbound.refusing("outbound", 0.4) is None


def test_a_window_lasts_half_a_second_at_most_whatever_the_rate_was_lowered_to():
    """A busy pod's rate lowered live (1000/s to 2/s) made its debt a 250 s window, which raising
    the rate back did not end: the kernel refused every connect of the pod for minutes."""
    quota = Quota(limits.parse("handshake-rate=1000"))
    while quota.handshake_turn("outbound", 0.0) is not None:
        pass
    quota.limits = limits.parse("handshake-rate=2")
    assert quota.handshake_turn("outbound", 0.0) is None
    assert quota.refusing("outbound", MAX_WAIT_S - 0.01) is Limit.HANDSHAKE_RATE
    assert quota.refusing("outbound", MAX_WAIT_S) is None
