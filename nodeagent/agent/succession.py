"""Which of two agents side by side on a node enrols the pods that join (issue 15, "Handover").

During a handover the old and the new agent serve a node together for a few seconds. If both
enrolled a pod that joins then, each would choose a counter slot of its own (two pods could get
one slot: sk_lookup steers both by whichever listener was written there last) and write its own
listener into the pod's sk_lookup entry (the old agent's, if written last, leaves the entry empty
when it exits: inbound connections refused). So only the newest agent takes new pods: each agent
marks its presence on bpffs, `<pins>/agents/<start ns since boot>-<pid>` (a directory whose mtime
it renews every poll, removed when it drains or exits), and an agent that sees a newer mark
renewed within STALE_S leaves new pods to that agent; it keeps serving those it has until it
drains.

A mark not renewed for STALE_S (its agent was killed, or hangs) is ignored, so the older agent
takes new pods again, and is removed by the next agent to start.

A new agent that cannot serve (no complete view: broken RBAC, an API server it cannot reach)
would hold new pods back for as long as a stuck roll lasts, unserved. So a starting agent renews
its mark for STARTING_S at most; then it lets the mark lapse (the older agent takes new pods
again) until it serves, when its mark is live again and it settles once more before enrolling a
new pod (the older agent may be enrolling one in the same poll; the newer agent finds that pod's
pinned entry and shares its slot, agent.py `_new_slot`).
"""

import os
import time
from dataclasses import dataclass
from pathlib import Path

from nodeagent.datapath.pins import PinLayout

STALE_S = 5.0  # a mark not renewed for this long is a dead agent's (agents renew every 0.25 s)
SETTLE_S = 1.0  # a new agent beside a live one takes new pods this long after its mark (below)
STARTING_S = 30.0  # a starting agent holds an older one's new pods back this long at most


@dataclass(frozen=True, order=True)
class Mark:
    """One agent's presence: ordered by start, newest last."""

    started_ns: int
    pid: int

    @property
    def name(self) -> str:
        return f"{self.started_ns}-{self.pid}"

    @classmethod
    def parse(cls, name: str) -> "Mark | None":
        started, _, pid = name.partition("-")
        return cls(int(started), int(pid)) if started.isdigit() and pid.isdigit() else None


def live(marks: dict[Mark, float], now: float) -> set[Mark]:
    """The marks (with their last renewal, wall-clock seconds) renewed within STALE_S of `now`."""
    return {mark for mark, renewed in marks.items() if now - renewed < STALE_S}


def successor(own: Mark, marks: dict[Mark, float], now: float) -> Mark | None:
    """The newest live mark newer than `own`: the agent that takes new pods instead of this one."""
    newer = [mark for mark in live(marks, now) if mark > own]
    return max(newer, default=None)


class Presence:
    """This agent's mark, and what it reads of the others'. I/O only: the rules are above.

    Why the new agent waits SETTLE_S before enrolling a pod no entry names yet: the old agent
    reads the marks once per poll, so for up to a poll after the new mark it may still enrol a
    pod; the new agent must find that pod's pinned entry (and take its slot) rather than choose
    a slot of its own for it at the same moment."""

    def __init__(self, layout: PinLayout, own: Mark | None = None, clock=time.monotonic):
        self.dir: Path = layout.agents
        # CLOCK_BOOTTIME: one clock for the node's processes that a wall-clock step never reorders.
        self.own = own or Mark(time.clock_gettime_ns(time.CLOCK_BOOTTIME), os.getpid())
        self.clock = clock
        self.settled_at = 0.0  # clock() from which this agent takes new pods
        self.announced_at = 0.0
        self.lapsed = False  # starting for longer than STARTING_S: the mark is left to go stale

    def announce(self) -> bool:
        """Mark this agent (first: before the pins are read) and remove dead agents' marks; True
        if another agent is live beside it (then new pods wait SETTLE_S)."""
        self.dir.mkdir(exist_ok=True)
        (self.dir / self.own.name).mkdir()
        others = self._read()
        now = time.time()
        for mark in set(others) - live(others, now):
            self._remove(mark)
        beside = bool(live(others, now))
        self.announced_at = self.clock()
        self.settled_at = self.announced_at + (SETTLE_S if beside else 0.0)
        return beside

    def renew(self, serving: bool) -> None:
        """Each poll. A starting agent stops renewing after STARTING_S; serving again renews, and
        then it settles before enrolling a new pod, as at a start beside another agent."""
        now = self.clock()
        if not serving and now - self.announced_at >= STARTING_S:
            self.lapsed = True
            return
        if self.lapsed:
            self.lapsed = False
            self.settled_at = now + SETTLE_S
        try:
            os.utime(self.dir / self.own.name)
        except FileNotFoundError:  # removed by `nodeagent cleanup` (the data path is gone too)
            pass

    def withdraw(self) -> None:
        """Draining or exiting: an older agent still serving takes new pods again at once."""
        self._remove(self.own)

    def successor(self) -> Mark | None:
        return successor(self.own, self._read(), time.time())

    def settled(self) -> bool:
        # Lapsed, it takes no new pod: its first complete view is reconciled before the poll's
        # renew makes its mark live again (and the older agent, seeing none, enrols meanwhile).
        return not self.lapsed and self.clock() >= self.settled_at

    def _read(self) -> dict[Mark, float]:
        marks = {}
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return {}
        for entry in entries:
            mark = Mark.parse(entry.name)
            if mark is not None and mark != self.own:
                try:
                    marks[mark] = entry.stat().st_mtime
                except FileNotFoundError:  # removed meanwhile
                    pass
        return marks

    def _remove(self, mark: Mark) -> None:
        try:
            (self.dir / mark.name).rmdir()
        except FileNotFoundError:
            pass
