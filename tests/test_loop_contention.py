"""Which pods' handshake rates a late loop cuts (proxy/contention.py), and Quota.handshake_turn
under it: plain values, no loop, no sockets."""

import math

import pytest

from nodeagent.proxy import contention, limits
from nodeagent.proxy.contention import (CUT, FLOOR_RATE, HANDSHAKE_PART, LATE_S, LATE_TICKS, MIN_SHARE, RECOVER_PER_S,
                                        RECOVER_S, SMALL_PART, TICK_S, WINDOW_S, LoopContention, State, Window)
from nodeagent.proxy.limits import Limit, Quota

ON_TIME, LATE = 0.0, LATE_S + 0.001
WINDOW_TICKS = math.ceil(WINDOW_S / TICK_S)  # ticks after a window's first that end it, when on time
ELAPSED = WINDOW_TICKS * TICK_S  # how long such a window lasts


def window(c: LoopContention, late: int = 0, costs: dict | None = None, lateness: float = LATE):
    """The next window, on time: `late` of its ticks late by `lateness`, `costs` (key -> CPU
    seconds) charged during it; its verdict."""
    for key, cpu in (costs or {}).items():
        c.charge(key, cpu)
    if c.start is None:
        assert c.tick(0.0, ON_TIME) is None  # the first tick opens the first window
    base = c.start
    for i in range(1, 2 * WINDOW_TICKS):
        judged = c.tick(base + i * TICK_S, lateness if i <= late else ON_TIME)
        if judged is not None:
            assert i == WINDOW_TICKS
            return judged
    raise AssertionError("the window did not end")


def heavy(key="a") -> dict:
    """Handshake CPU enough to be the cause: twice HANDSHAKE_PART of the window, all `key`'s."""
    return {key: 2 * HANDSHAKE_PART * ELAPSED}


def cut_to(windows: int, costs: dict) -> LoopContention:
    c = LoopContention()
    for _ in range(windows):
        window(c, late=WINDOW_TICKS, costs=costs)
    return c


def test_a_window_ends_after_window_s_and_not_before():
    c = LoopContention()
    c.charge("a", 0.001)
    assert [c.tick(i * TICK_S, ON_TIME) for i in range(WINDOW_TICKS)] == [None] * WINDOW_TICKS
    assert c.tick(WINDOW_S - 1e-9, ON_TIME) is None
    judged = c.tick(WINDOW_S, ON_TIME)
    assert judged.window is Window.QUIET and judged.late_ticks == 0 and not judged.cut
    assert judged.handshake_part == pytest.approx(0.001 / WINDOW_S)
    assert c.costs == {} and c.start == WINDOW_S  # the next window starts there


def test_lateness_at_late_s_or_under_is_on_time():
    c = LoopContention()
    judged = window(c, late=WINDOW_TICKS, costs=heavy(), lateness=LATE_S)
    assert judged.window is Window.QUIET and c.late_ticks == 0 and c.share("a") == 1.0


def test_fewer_than_late_ticks_late_ticks_cut_nothing_however_heavy_the_handshakes():
    c = LoopContention()
    judged = window(c, late=LATE_TICKS - 1, costs=heavy())
    assert judged.window is Window.QUIET and c.share("a") == 1.0 and c.state is State.CLEAR
    assert c.late_ticks == LATE_TICKS - 1  # counted all the same (event_loop_late_ticks_total)


def test_one_long_stall_is_one_late_tick_not_a_late_window():
    c = LoopContention()
    c.charge("a", 1.0)
    assert c.tick(0.0, ON_TIME) is None
    judged = c.tick(0.5, 0.48)
    assert judged.handshake_part == 2.0  # the loop blocked for half a second by one callback
    assert judged.window is Window.QUIET and c.share("a") == 1.0


def test_a_late_loop_whose_handshakes_are_a_small_part_of_its_time_cuts_nobody():
    c = LoopContention()
    costs = {"a": 0.95 * HANDSHAKE_PART * ELAPSED}
    judged = window(c, late=WINDOW_TICKS, costs=costs)
    assert judged.window is Window.LATE_ELSEWHERE and judged.handshake_part == pytest.approx(0.95 * HANDSHAKE_PART)
    assert not judged.cut and c.share("a") == 1.0 and c.state is State.CLEAR


def test_a_late_loop_with_no_handshakes_at_all_cuts_nobody():
    c = LoopContention()
    for _ in range(40):  # ten seconds of a loop late at every tick (another process's CPU)
        assert window(c, late=WINDOW_TICKS).window is Window.LATE_ELSEWHERE
    assert c.shares == {} and c.state is State.CLEAR


def test_the_only_cause_is_halved_each_late_window_down_to_its_floor():
    c = LoopContention()
    shares = []
    for _ in range(4):
        judged = window(c, late=WINDOW_TICKS, costs=heavy())
        assert judged.window is Window.HANDSHAKES
        shares.append(c.share("a"))
    assert shares == pytest.approx([CUT, CUT ** 2, MIN_SHARE, MIN_SHARE])


def test_causes_are_cut_in_proportion_to_their_part_and_a_small_part_is_not_cut():
    c = LoopContention()
    total = 2 * HANDSHAKE_PART * ELAPSED
    parts = {"big": 0.5, "half": 0.35, "small": 0.15}
    judged = window(c, late=WINDOW_TICKS, costs={key: part * total for key, part in parts.items()})
    assert judged.window is Window.HANDSHAKES
    assert c.share("big") == pytest.approx(1 - (1 - CUT) * 0.5)
    assert c.share("half") == pytest.approx(1 - (1 - CUT) * 0.35)
    assert parts["small"] < SMALL_PART and c.share("small") == 1.0 and "small" not in judged.cut
    assert set(judged.cut) == {"big", "half"}


def test_a_minor_part_beside_a_major_one_is_never_cut_however_long_it_lasts():
    c = LoopContention()
    total = 2 * HANDSHAKE_PART * ELAPSED
    for _ in range(100):  # 25 s of a late loop with the same two handshakers
        window(c, late=WINDOW_TICKS, costs={"attacker": 0.87 * total, "pool-less": 0.13 * total})
    assert c.share("attacker") == MIN_SHARE and c.share("pool-less") == 1.0


def test_entry_and_exit_of_cutting_are_told_once_each():
    c = LoopContention()
    first = window(c, late=WINDOW_TICKS, costs=heavy())
    assert first.entered and not first.left and c.state is State.CUTTING
    second = window(c, late=WINDOW_TICKS, costs=heavy())
    assert not second.entered and not second.left
    judged = None
    for _ in range(100):
        judged = window(c)
        assert not judged.entered
        if c.state is State.CLEAR:
            break
    assert judged.left and c.shares == {}


def test_a_cut_share_comes_back_at_the_recovery_rate_and_is_then_forgotten():
    c = cut_to(4, heavy())
    assert c.share("a") == MIN_SHARE
    window(c)
    assert c.share("a") == pytest.approx(MIN_SHARE + ELAPSED * RECOVER_PER_S)
    windows = 1
    while "a" in c.shares:
        window(c, late=WINDOW_TICKS)  # late elsewhere: recovers all the same
        windows += 1
    assert c.share("a") == 1.0  # whole RECOVER_S after the floor (to a window), then forgotten
    assert RECOVER_S <= windows * ELAPSED < RECOVER_S + ELAPSED


def test_a_pod_not_among_the_causes_recovers_while_others_are_cut():
    c = cut_to(4, heavy("a"))
    window(c, late=WINDOW_TICKS, costs=heavy("b"))
    assert c.share("a") == pytest.approx(MIN_SHARE + ELAPSED * RECOVER_PER_S) and c.share("b") == CUT


def test_a_clock_stepping_back_only_lengthens_the_window():
    c = LoopContention()
    assert c.tick(100.0, ON_TIME) is None
    assert c.tick(50.0, LATE) is None and c.tick(100.0 + WINDOW_S / 2, LATE) is None
    judged = c.tick(100.0 + WINDOW_S, LATE)
    assert judged is not None and judged.late_ticks == 3


def test_charges_of_nothing_are_not_kept():
    c = LoopContention()
    c.charge("a", 0.0)
    c.charge("b", 0.001)
    c.charge("b", 0.002)
    assert c.costs == {"b": pytest.approx(0.003)}


def test_refusals_are_counted_apart_only_while_the_rate_is_cut():
    c = cut_to(1, heavy())
    c.refused("a")
    c.refused("a")
    c.refused("b")  # not cut: its limit's refusal, not the cut's
    assert c.take_refusals() == {"a": 2} and c.take_refusals() == {}


def test_a_cut_rate_keeps_its_floors_and_never_cuts_a_pod_under_the_floor_rate():
    c = cut_to(4, heavy())
    assert c.share("a") == MIN_SHARE
    assert c.rate("a", 50) == pytest.approx(FLOOR_RATE)  # the default: 10/s
    assert c.rate("a", 200) == pytest.approx(200 * MIN_SHARE)  # a share of a raised limit
    assert c.rate("a", 1000) == pytest.approx(200)
    assert c.rate("a", 20) == FLOOR_RATE  # 20 x 0.2 = 4, but never below 10
    assert c.rate("a", 4) == 4  # a limit under the floor rate is never cut
    assert c.rate("b", 50) == 50  # a pod not cut: its whole limit


def test_charger_is_none_without_a_contention_and_charges_the_pod_direction_with_one():
    quota = Quota(limits.parse("handshake-rate=50"))
    assert contention.charger(quota, "outbound") is None
    quota.contention = LoopContention()
    contention.charger(quota, "inbound")(0.004)
    assert quota.contention.costs == {(quota, "inbound"): 0.004}


def quota_cut(pod_limits: str, direction: str) -> Quota:
    """A pod whose handshakes in `direction` were the only cause of 4 late windows: at its floor."""
    quota = Quota(limits.parse(pod_limits))
    quota.contention = cut_to(4, heavy((quota, direction)))
    return quota


def test_a_pod_under_its_cut_rate_never_waits():
    quota = quota_cut("handshake-rate=50", "outbound")
    # one handshake every 0.2 s (5/s) is below the cut rate of 10/s: never a wait
    assert [quota.handshake_turn("outbound", 1.0 + i * 0.2) for i in range(30)] == [0.0] * 30
    assert quota.refusing("outbound", 7.0) is None


def test_under_contention_a_pod_keeps_its_burst_then_gets_the_cut_rate_then_is_refused_for_the_cut_queue():
    quota, told = quota_cut("handshake-rate=50", "outbound"), []
    quota.on_refusing = lambda direction, limit, until: told.append((direction, limit, until))
    turns = [quota.handshake_turn("outbound", 1.0) for _ in range(60)]
    # what it saved up (a second of its limit: a cold pool's burst), then turns 0.1 s apart (the
    # cut rate, 10/s) up to MAX_WAIT_S, then refused
    assert turns[:50] == [0.0] * 50
    assert turns[50:55] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert turns[55:] == [None] * 5
    assert told and told[0][:2] == ("outbound", Limit.HANDSHAKE_RATE)
    assert told[0][2] == pytest.approx(1.5)  # the queue of turns given lasts half a second
    assert quota.contention.take_refusals() == {(quota, "outbound"): 5}
    # a second later the bucket has 10 more tokens, not 50: the cut rate is what the pod gets
    later = [quota.handshake_turn("outbound", 2.5) for _ in range(20)]
    assert later[:10] == [0.0] * 10 and later[10:15] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert later[15:] == [None] * 5


def test_a_cut_direction_leaves_the_other_direction_whole():
    quota = quota_cut("handshake-rate=50", "outbound")
    turns = [quota.handshake_turn("inbound", 1.0) for _ in range(230)]
    assert turns[:200] == [0.0] * 200 and turns[200:] == pytest.approx([0.005 * n for n in range(1, 31)])
    assert quota.contention.take_refusals() == {}


def test_without_contention_a_pod_gets_its_whole_rate():
    quota = Quota(limits.parse("handshake-rate=50"))
    quota.contention = LoopContention()
    turns = [quota.handshake_turn("outbound", 1.0) for _ in range(80)]
    assert turns[:50] == [0.0] * 50 and turns[50:75] == pytest.approx([0.02 * n for n in range(1, 26)])
    assert turns[75:] == [None] * 5
    assert quota.contention.take_refusals() == {}  # refused at its limit: not the cut's


def test_the_inbound_rate_is_cut_by_its_own_share():
    quota = quota_cut("inbound-handshake-rate=200", "inbound")
    turns = [quota.handshake_turn("inbound", 1.0) for _ in range(230)]
    assert turns[:200] == [0.0] * 200 and turns[200:220] == pytest.approx([0.025 * n for n in range(1, 21)])
    assert turns[220:] == [None] * 10  # 40/s: a fifth of 200
