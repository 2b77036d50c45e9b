"""A pod's pace of new mutual-TLS handshakes: a token bucket that schedules rather than refuses. Pure.

A mesh handshake is the costliest thing a connection asks of the agent: about 8-10 ms of CPU
for both ends of a same-node hop on this project's 2-core test VM, against a fraction of a
millisecond to accept and refuse a connection (benchmarks/README.md, "Noisy neighbour"). A pod
that opens short connections as fast as it can would take that CPU from every other pod of the
node; the `handshakes` limit bounds how many run at once, not how many a second.

So each pod has a rate per direction (the `handshake-rate` and `inbound-handshake-rate` limits,
per second). A pod
that saved up tokens starts a handshake at once, up to BURST_S seconds' worth in a burst; past
that, each new handshake is given a turn, one every 1/rate seconds in the order asked, and its
connection waits for it in the proxy, holding only what it already holds (the connection, under
the pod's connection limit). A turn more than MAX_WAIT_S away is refused: the pod has been over
its rate for longer than a client should wait, and, as with its other limits, it gets the error
and nobody else does. So at most rate * MAX_WAIT_S + 1 connections of a pod wait at a time.

A turn given to a connection that goes away before it comes is not given back: the pod pays for
what it asked.

While the pod's own handshakes make the process's loop late the rate it is paced at is a share
of its limit (contention.py: as low as a fifth, never under 10 a second); its burst stays a second
of its limit.

A refusal also says how long the pod's queue of turns already given lasts (`reopens_at`): until
it is empty, new turns would be refused or given only to be refused again a moment later, so the
proxy refuses the pod's new connections outright for that long, at accept and in the kernel (limits.Quota.refusing), instead of
accepting, detecting and then refusing each one (benchmarks/README.md, "Noisy neighbour").
"""

BURST_S = 1.0  # tokens a pod may save up: this many seconds' worth of its rate
# The latest turn given; later is refused. Below a second: a mesh client's connect (and handshake)
# deadline is 1 s by default, and an inbound handshake's wait comes out of it.
MAX_WAIT_S = 0.5


class Pace:
    """One pod's bucket for one direction. `turn()` is all there is."""

    __slots__ = ("tokens", "stamp")

    def __init__(self):
        self.tokens: float | None = None  # None: never used, full
        self.stamp = 0.0  # when `tokens` was last brought up to date

    def turn(self, now: float, rate: float, limit: float | None = None) -> float | None:
        """Seconds from `now` until the next handshake may start (0.0: at once), or None: refused.
        `rate`: handshakes per second now; `limit`: the pod's limit (an annotation may change it),
        which sizes its burst, if `rate` is a share of it (contention.py: a busy loop cuts how fast
        the bucket refills, not what a pod that saved up may start at once)."""
        burst = max(1.0, (rate if limit is None else max(rate, limit)) * BURST_S)
        if self.tokens is None:
            tokens = burst
        else:
            tokens = min(burst, self.tokens + max(0.0, now - self.stamp) * rate)
        self.stamp = max(self.stamp, now)  # a clock that steps back gives nothing, then or later
        wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / rate
        if wait > MAX_WAIT_S:
            self.tokens = tokens  # refilled, nothing taken
            return None
        self.tokens = tokens - 1.0  # below zero: turns given and not yet come
        return wait

    def reopens_at(self, now: float, rate: float) -> float:
        """When the pod's queue of turns is empty again (the last turn given so far has come) and
        a new handshake would be given a turn, not refused (`now` if it would be now)."""
        if self.tokens is None:
            return now
        tokens = self.tokens + max(0.0, now - self.stamp) * rate
        needed = max(0.0, 1.0 - rate * MAX_WAIT_S)  # below 0 tokens: turns given and not yet come
        return now + max(0.0, needed - tokens) / rate
