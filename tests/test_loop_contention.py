"""The share of their handshake rates pods get from a contended loop (proxy/contention.py), and
Quota.handshake_turn under it: plain values, no loop, no sockets."""

import pytest

from nodeagent.proxy import limits
from nodeagent.proxy.contention import (CUT, FLOOR_RATE, LATE_S, MIN_SHARE, RECOVER_PER_S, RECOVER_S, TICK_S,
                                        LoopContention)
from nodeagent.proxy.limits import Limit, Quota

ON_TIME, LATE = 0.0, LATE_S + 0.001


def ticks(contention: LoopContention, lateness: list[float], start: float = 0.0) -> list[float]:
    return [contention.observe(start + i * TICK_S, late) for i, late in enumerate(lateness)]


def paced(pod_limits: str, lateness: float, direction: str, count: int) -> list[float | None]:
    """`count` turns asked at once (t = 1 s) by a pod with `pod_limits`, its process's loop having
    come `lateness` late at each of 20 ticks before."""
    contention = LoopContention()
    ticks(contention, [lateness] * 20)
    quota = Quota(limits.parse(pod_limits))
    quota.contention = contention
    return [quota.handshake_turn(direction, 1.0) for _ in range(count)]


def test_an_uncontended_loop_leaves_every_rate_whole():
    contention = LoopContention()
    assert ticks(contention, [ON_TIME, LATE_S, 0.0005] * 10) == [1.0] * 30  # LATE_S itself is on time
    assert not contention.contended and contention.late_ticks == 0
    assert [contention.rate(limit) for limit in (1, 10, 50, 200)] == [1, 10, 50, 200]


def test_each_late_tick_cuts_the_share_down_to_its_floor():
    contention = LoopContention()
    shares = ticks(contention, [LATE] * 8)
    assert shares == pytest.approx([max(MIN_SHARE, CUT ** n) for n in range(1, 9)])
    assert shares[-1] == MIN_SHARE and contention.contended and contention.late_ticks == 8


def test_on_time_ticks_give_the_share_back_at_the_recovery_rate():
    contention = LoopContention()
    ticks(contention, [LATE] * 10)  # at the floor, the last at `last`
    last = 9 * TICK_S
    assert contention.observe(last + 1.0, ON_TIME) == pytest.approx(MIN_SHARE + RECOVER_PER_S)
    assert contention.observe(last + RECOVER_S, ON_TIME) == pytest.approx(1.0)  # whole after RECOVER_S
    assert contention.observe(last + 3 * RECOVER_S, ON_TIME) == 1.0  # and never above
    assert not contention.contended


def test_a_late_tick_in_the_middle_of_a_recovery_cuts_what_was_given_back():
    contention = LoopContention()
    ticks(contention, [LATE] * 10)
    recovered = contention.observe(9 * TICK_S + 2.0, ON_TIME)
    assert recovered == pytest.approx(MIN_SHARE + 2 * RECOVER_PER_S)
    assert contention.observe(9 * TICK_S + 2.0 + TICK_S, LATE) == pytest.approx(recovered * CUT)


def test_a_clock_stepping_back_gives_nothing_back():
    contention = LoopContention()
    ticks(contention, [LATE] * 10, start=100.0)
    floor = contention.share
    assert contention.observe(50.0, ON_TIME) == floor  # back in time: no recovery
    last = 100.0 + 9 * TICK_S
    assert contention.observe(last, ON_TIME) == floor  # up to the last stamp: still none
    assert contention.observe(last + 1.0, ON_TIME) == pytest.approx(floor + RECOVER_PER_S)


def test_a_cut_rate_keeps_its_floors_and_never_cuts_a_pod_under_the_floor_rate():
    contention = LoopContention()
    ticks(contention, [LATE] * 20)
    assert contention.share == MIN_SHARE
    assert contention.rate(50) == pytest.approx(FLOOR_RATE)  # the default: 10/s
    assert contention.rate(200) == pytest.approx(200 * MIN_SHARE)  # a share of a raised limit
    assert contention.rate(1000) == pytest.approx(200)
    assert contention.rate(20) == FLOOR_RATE  # 20 x 0.2 = 4, but never below 10
    assert contention.rate(4) == 4  # a limit under the floor rate is never cut
    assert contention.rate(FLOOR_RATE) == FLOOR_RATE


def test_a_pod_under_its_cut_rate_never_waits():
    contention = LoopContention()
    ticks(contention, [LATE] * 20)
    quota = Quota(limits.parse("handshake-rate=50"))
    quota.contention = contention
    # one handshake every 0.2 s (5/s) is below the cut rate of 10/s: never a wait
    assert [quota.handshake_turn("outbound", 1.0 + i * 0.2) for i in range(30)] == [0.0] * 30
    assert quota.refusing("outbound", 7.0) is None


def test_under_contention_a_pod_keeps_its_burst_then_gets_the_cut_rate_then_is_refused_for_the_cut_queue():
    contention = LoopContention()
    ticks(contention, [LATE] * 20)
    quota, told = Quota(limits.parse("handshake-rate=50")), []
    quota.on_refusing = lambda direction, limit, until: told.append((direction, limit, until))
    quota.contention = contention
    turns = [quota.handshake_turn("outbound", 1.0) for _ in range(60)]
    # what it saved up (a second of its limit: a cold pool's burst), then turns 0.1 s apart (the
    # cut rate, 10/s) up to MAX_WAIT_S, then refused
    assert turns[:50] == [0.0] * 50
    assert turns[50:55] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert turns[55:] == [None] * 5
    assert told and told[0][:2] == ("outbound", Limit.HANDSHAKE_RATE)
    assert told[0][2] == pytest.approx(1.5)  # the queue of turns given lasts half a second
    # a second later the bucket has 10 more tokens, not 50: the cut rate is what the pod gets
    later = [quota.handshake_turn("outbound", 2.5) for _ in range(20)]
    assert later[:10] == [0.0] * 10 and later[10:15] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert later[15:] == [None] * 5


def test_without_contention_the_same_pod_gets_its_whole_rate():
    turns = paced("handshake-rate=50", ON_TIME, "outbound", 80)
    assert turns[:50] == [0.0] * 50 and turns[50:75] == pytest.approx([0.02 * n for n in range(1, 26)])
    assert turns[75:] == [None] * 5
    assert Quota(limits.parse("handshake-rate=50")).handshake_turn("outbound", 1.0) == 0.0  # none: whole


def test_the_inbound_rate_is_cut_by_the_same_share():
    turns = paced("inbound-handshake-rate=200", LATE, "inbound", 230)
    assert turns[:200] == [0.0] * 200 and turns[200:220] == pytest.approx([0.025 * n for n in range(1, 21)])
    assert turns[220:] == [None] * 10  # 40/s: a fifth of 200
