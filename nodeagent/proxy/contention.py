"""How contended a proxy process's event loop is, and what that leaves of the pods' handshake rates. Pure.

A pod's `handshake-rate` and `inbound-handshake-rate` (pacing.py) bound what one pod's new mesh
connections may cost the process; at the default 50/s, one pod churning short connections still
took about half a core of the node's 2 (both ends of each hop in one agent) and the other pods'
requests waited for it: the noisy neighbour's victim saw its p99 at 2.7-3.2x quiet
(benchmarks/README.md, "Noisy neighbour"). A lower fixed rate would refuse legitimate pods on an
idle node too. So the rate a pod gets depends on whether the loop that serves everyone is late:

- a probe asks for the loop every TICK_S and tells `observe` how late it came;
- later than LATE_S: the loop is contended; the share of every pod's handshake rate is cut to
  CUT of what it was, down to MIN_SHARE (multiplicative decrease: a few late ticks in a row take
  the heaviest pods to their floor within a fraction of a second);
- on time: the share grows back by RECOVER_PER_S per second up to 1 (additive increase: the
  full rate is back about RECOVER_S seconds after the last late tick from the floor).

The share scales each pod's own limit, so it cuts the pods that handshake the most: a pod under
`rate x share` meets no wait at all, however contended the loop (a pod making 5 a second is
untouched down to a share of 0.1), and a pod that handshakes as fast as it may is held to that,
as its turns (pacing.Pace) and refusal windows (refusal.py) already hold it. The bound stays
nameable per pod: never more than its limit, never less than MIN_SHARE of it nor than FLOOR_RATE
a second (its limit if that is lower: a pod limited to a few a second is never cut). The share
cuts how fast a pod's bucket refills, not its burst (a second of its limit, pacing.Pace.turn): a
pod that opens its pools at once after a quiet spell is not refused for a busy loop.
"""

TICK_S = 0.02  # how often the probe asks for the loop (50 wake-ups a second: a few microseconds each)
# A tick this much late means the loop had other work queued for that long: requests waited too.
# Near the idle loop's own lateness on the test VM (p50 0.25 ms, p99 3.5 ms with the VM shared,
# benchmarks/loopshare.py): a late tick on an idle loop only lowers rates nobody is using.
LATE_S = 0.002
CUT = 0.7  # the share after a late tick, of what it was
MIN_SHARE = 0.2  # a pod keeps at least this part of its rate: 10 handshakes a second by default
FLOOR_RATE = 10.0  # and never less than this many a second (or its limit, if that is lower)
RECOVER_S = 10.0  # from MIN_SHARE back to the whole rate, with no late tick meanwhile
RECOVER_PER_S = (1.0 - MIN_SHARE) / RECOVER_S


class LoopContention:
    """The share of their handshake rates the pods of one process get now (`share`, in
    [MIN_SHARE, 1]), from how late the process's loop has been."""

    __slots__ = ("share", "stamp", "late_ticks")

    def __init__(self):
        self.share = 1.0
        self.stamp: float | None = None  # when the last tick was observed
        self.late_ticks = 0  # counted since start: the probe's record of contention

    def observe(self, now: float, lateness_s: float) -> float:
        """A tick of the probe came `lateness_s` late at `now`; the share from now on."""
        since = 0.0 if self.stamp is None else max(0.0, now - self.stamp)  # a clock stepping back gives nothing
        self.stamp = now if self.stamp is None else max(self.stamp, now)
        if lateness_s > LATE_S:
            self.late_ticks += 1
            self.share = max(MIN_SHARE, self.share * CUT)
        else:
            self.share = min(1.0, self.share + since * RECOVER_PER_S)
        return self.share

    @property
    def contended(self) -> bool:
        return self.share < 1.0

    def rate(self, limit: float) -> float:
        """How many handshakes a second a pod whose limit is `limit` may make now."""
        return max(min(limit, FLOOR_RATE), limit * self.share)
