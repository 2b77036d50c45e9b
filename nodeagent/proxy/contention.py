"""Which pods' handshakes make a proxy process's event loop late, and what that leaves of their rates. Pure.

A pod's `handshake-rate` and `inbound-handshake-rate` (pacing.py) bound what one pod's new mesh
connections may cost the process; at the default 50/s, one pod churning short connections still
took about half a core of the node's 2 (both ends of each hop in one agent) and the other pods'
requests waited for it (benchmarks/README.md, "Noisy neighbour"). A lower fixed rate would refuse
legitimate pods on an idle node too. So a pod's rate is cut only while the loop that serves
everyone is late *and* that pod's handshakes are what loads the process:

- a probe asks for the loop every TICK_S and tells `tick` how late it came (a monotonic clock:
  uvloop's own `loop.time()` has 1 ms steps); each handshake step reports the CPU seconds it took
  (`charge`, per pod and direction: the thread's CPU time, not wall time, so a CPU shared with
  other work does not inflate it);
- every WINDOW_S the window is judged (`Window`): QUIET unless at least LATE_TICKS of its ticks
  came more than LATE_S late (sustained lateness: one long callback is one late tick);
  LATE_ELSEWHERE if the handshakes' CPU was under HANDSHAKE_PART of the window's time (the
  lateness comes from requests, bodies, GC, another process: cutting handshakes would not help,
  so nothing is cut); else HANDSHAKES;
- in a HANDSHAKES window each pod-direction that took at least SMALL_PART of the window's
  handshake CPU has its share cut by (1 - (1 - CUT) x its part): the only cause, halved; half of
  it, cut by a quarter; never under MIN_SHARE. The others, and every window that is not
  HANDSHAKES, give back RECOVER_PER_S a second (the whole rate RECOVER_S after the floor).

A pod's rate is `max(min(limit, FLOOR_RATE), limit x share)` (`rate`): never more than its limit,
never less than MIN_SHARE of it nor than FLOOR_RATE a second (its limit if lower). The share cuts
how fast a pod's bucket refills, not its burst (a second of its limit, pacing.Pace.turn). Shares
are kept only for pod-directions cut (at most the pods seen in the last RECOVER_S, two directions
each); the window's charges are cleared at its end.
"""

import enum
import functools
from collections.abc import Callable, Hashable

TICK_S = 0.02  # how often the probe asks for the loop (50 wake-ups a second: a few microseconds each)
# A tick this much late: the loop had other work queued that long. Well above the timer's 1 ms steps
# and the idle loop's own lateness on the test VM (p50 0.25 ms, p99 3.5 ms shared, benchmarks/loopshare.py).
LATE_S = 0.005
WINDOW_S = 0.25  # judged every this long (12 ticks when on time)
LATE_TICKS = 3  # late ticks in one window that make it late: a quarter of them, not one stall
# The handshake steps' CPU (all pods, both directions) over the window's wall time from which they
# are the cause: a twentieth of a core, 20 same-node hops a second resumed (2.6 ms of steps each,
# 0.8 as client and 1.8 as server, of 10.1 ms of the process's CPU per connection, on 5f1c83c:
# `python -m benchmarks.handshake_cpu --runs 5`, medians; 0.74-0.83, 1.67-1.85, 9.22-10.40).
HANDSHAKE_PART = 0.05
# A pod-direction under this part of a HANDSHAKES window's handshake CPU is not cut: not a tenth, or
# a pool-less client at 40/s beside an attacker (0.03 of a core against 0.2: 13%) would be cut a
# little every window, and so to its floor while the attack lasts.
SMALL_PART = 0.2
CUT = 0.5  # the share of the only cause after one window; a part p of the cause: 1 - (1 - CUT) x p
MIN_SHARE = 0.2  # a pod keeps at least this part of its rate: 10 handshakes a second by default
FLOOR_RATE = 10.0  # and never less than this many a second (or its limit, if that is lower)
RECOVER_S = 10.0  # from MIN_SHARE back to the whole rate, with no cut meanwhile
RECOVER_PER_S = (1.0 - MIN_SHARE) / RECOVER_S


class Window(enum.Enum):
    QUIET = "quiet"  # fewer than LATE_TICKS late ticks
    LATE_ELSEWHERE = "late, not handshakes"  # late, handshakes under HANDSHAKE_PART of the time
    HANDSHAKES = "late, handshakes"  # late and handshakes a large part: their pods are cut


class State(enum.Enum):
    CLEAR = "clear"  # no pod's rate is cut
    CUTTING = "cutting"  # some pod's rate is cut (or still recovering)


class Judged:
    """One window's verdict, for the shell's metrics and logs."""

    __slots__ = ("window", "handshake_part", "late_ticks", "cut", "entered", "left")

    def __init__(self, window: Window, handshake_part: float, late_ticks: int, cut: dict, entered: bool, left: bool):
        self.window, self.handshake_part, self.late_ticks = window, handshake_part, late_ticks
        self.cut = cut  # key -> its share after this window, for the keys cut in it
        self.entered, self.left = entered, left  # State changed: CLEAR -> CUTTING, or back


class LoopContention:
    """The loop's lateness and the pods' handshake CPU of one process, and the share of its
    handshake rate each pod-direction (`key`: any hashable) gets now."""

    __slots__ = ("shares", "costs", "refusals", "start", "window_late", "late_ticks", "state")

    def __init__(self):
        self.shares: dict[Hashable, float] = {}  # only keys under 1
        self.costs: dict[Hashable, float] = {}  # this window's handshake CPU seconds per key
        self.refusals: dict[Hashable, int] = {}  # refused while cut, not yet taken (`take_refusals`)
        self.start: float | None = None  # when this window began
        self.window_late = 0  # late ticks in this window
        self.late_ticks = 0  # counted since start (event_loop_late_ticks_total)
        self.state = State.CLEAR

    def charge(self, key: Hashable, cpu_s: float) -> None:
        """A handshake step of `key` took `cpu_s` seconds of CPU."""
        if cpu_s > 0:
            self.costs[key] = self.costs.get(key, 0.0) + cpu_s

    def refused(self, key: Hashable) -> None:
        """A handshake of `key` was refused over its rate: counted apart if its rate is cut now."""
        if key in self.shares:
            self.refusals[key] = self.refusals.get(key, 0) + 1

    def take_refusals(self) -> dict[Hashable, int]:
        taken, self.refusals = self.refusals, {}
        return taken

    def tick(self, now: float, lateness_s: float) -> Judged | None:
        """A tick of the probe came `lateness_s` late at `now`: the window's verdict if it ends."""
        if self.start is None:
            self.start = now
        if lateness_s > LATE_S:
            self.late_ticks += 1
            self.window_late += 1
        elapsed = now - self.start
        if elapsed < WINDOW_S:
            return None  # a clock stepping back only lengthens the window
        return self._judge(now, elapsed)

    def _judge(self, now: float, elapsed: float) -> Judged:
        spent = sum(self.costs.values())
        part = spent / elapsed
        if self.window_late < LATE_TICKS:
            window = Window.QUIET
        elif part < HANDSHAKE_PART:
            window = Window.LATE_ELSEWHERE
        else:
            window = Window.HANDSHAKES
        cut = {}
        if window is Window.HANDSHAKES:
            for key, cost in self.costs.items():
                if cost / spent >= SMALL_PART:
                    cut[key] = max(MIN_SHARE, self.shares.get(key, 1.0) * (1.0 - (1.0 - CUT) * cost / spent))
        for key in list(self.shares):
            if key not in cut:
                share = self.shares[key] + elapsed * RECOVER_PER_S
                if share >= 1.0:
                    del self.shares[key]
                else:
                    self.shares[key] = share
        self.shares.update(cut)
        before = self.state
        self.state = State.CUTTING if self.shares else State.CLEAR
        judged = Judged(window, part, self.window_late, cut, before is State.CLEAR and self.state is State.CUTTING,
                        before is State.CUTTING and self.state is State.CLEAR)
        self.costs.clear()
        self.start, self.window_late = now, 0
        return judged

    def share(self, key: Hashable) -> float:
        return self.shares.get(key, 1.0)

    def rate(self, key: Hashable, limit: float) -> float:
        """How many handshakes a second `key`, whose limit is `limit`, may make now."""
        return max(min(limit, FLOOR_RATE), limit * self.shares.get(key, 1.0))


def charger(quota, direction: str) -> Callable[[float], None] | None:
    """What a handshake of `quota`'s pod in `direction` reports each step's CPU seconds to
    (None: the quota has no process contention attached, tests)."""
    contention = getattr(quota, "contention", None)
    return None if contention is None else functools.partial(contention.charge, (quota, direction))
