"""Which agent enrols the pods that join while two run side by side (agent/succession.py): the
rules with plain values, and the marks on a real directory (bpffs holds them in production)."""

import os
import time

from nodeagent.agent.succession import SETTLE_S, STALE_S, STARTING_S, Mark, Presence, live, successor
from nodeagent.datapath.pins import PinLayout

OLD, NEW, NEWEST = Mark(100, 7), Mark(200, 7), Mark(300, 1)
NOW = 1_000.0


def test_a_mark_is_named_and_parsed_back_and_other_names_are_not_marks():
    assert Mark.parse(NEW.name) == NEW and NEW.name == "200-7"
    for name in ("200", "x-7", "200-", "-7", "200-7-1", ".."):
        assert Mark.parse(name) is None, name


def test_marks_order_by_start_then_pid():
    assert OLD < NEW < NEWEST and Mark(200, 3) < NEW


def test_only_marks_renewed_within_the_bound_are_live():
    marks = {OLD: NOW - STALE_S, NEW: NOW - STALE_S + 0.01, NEWEST: NOW}
    assert live(marks, NOW) == {NEW, NEWEST}


def test_the_successor_is_the_newest_live_newer_mark():
    assert successor(OLD, {NEW: NOW, NEWEST: NOW}, NOW) == NEWEST
    assert successor(OLD, {NEW: NOW, NEWEST: NOW - STALE_S}, NOW) == NEW  # the newest died
    assert successor(NEW, {OLD: NOW}, NOW) is None  # an older agent never takes over
    assert successor(OLD, {NEW: NOW - STALE_S - 1}, NOW) is None  # killed: the old one enrols again
    assert successor(OLD, {}, NOW) is None


def presence(tmp_path, mark: Mark, clock=time.monotonic) -> Presence:
    (tmp_path / "node0").mkdir(exist_ok=True)
    return Presence(PinLayout(tmp_path, "node0"), mark, clock)


def test_an_agent_alone_takes_new_pods_at_once_and_a_second_one_after_settling(tmp_path):
    old = presence(tmp_path, OLD)
    assert old.announce() is False and old.settled() and old.successor() is None
    new = presence(tmp_path, NEW)
    assert new.announce() is True and not new.settled()
    assert 0 < new.settled_at - time.monotonic() <= SETTLE_S
    assert old.successor() == NEW and new.successor() is None
    new.withdraw()  # it drains (a roll undone): the old agent takes new pods again
    assert old.successor() is None
    assert sorted(os.listdir(tmp_path / "node0" / "agents")) == [OLD.name]


def test_a_dead_agents_mark_is_ignored_and_removed_by_the_next_start(tmp_path):
    dead = presence(tmp_path, NEWEST)
    dead.announce()
    stale = time.time() - STALE_S - 1
    os.utime(dead.dir / NEWEST.name, (stale, stale))
    old = presence(tmp_path, OLD)
    assert old.successor() is None  # newer, but not renewed: its agent was killed
    new = presence(tmp_path, NEW)
    assert new.announce() is False  # nothing live beside it: no settling
    assert sorted(os.listdir(new.dir)) == [NEW.name]
    os.utime(new.dir / NEW.name, (stale, stale))
    new.renew(serving=True)
    assert old.successor() == NEW


def test_a_mark_removed_by_a_cleanup_is_not_an_error(tmp_path):
    agent = presence(tmp_path, OLD)
    agent.announce()
    (agent.dir / OLD.name).rmdir()
    agent.renew(serving=True)
    agent.withdraw()
    assert agent.successor() is None


def test_a_new_agent_that_cannot_serve_holds_new_pods_back_for_a_while_only(tmp_path):
    """A new version stuck starting (no complete view: broken RBAC, an API server it cannot
    reach) lets its mark lapse after STARTING_S: the old agent enrols new pods again. Once it
    serves, its mark is live again and it settles before taking a new pod itself."""
    t = [1000.0]
    old = presence(tmp_path, OLD)
    old.announce()
    new = presence(tmp_path, NEW, clock=lambda: t[0])
    new.announce()
    mark = new.dir / NEW.name
    t[0] += STARTING_S - 1
    before = mark.stat().st_mtime
    time.sleep(0.01)
    new.renew(serving=False)  # still within its start: renewed, the old agent leaves new pods to it
    assert mark.stat().st_mtime > before and old.successor() == NEW
    t[0] += 2
    new.renew(serving=False)  # starting for too long: not renewed any more
    stale = time.time() - STALE_S - 1
    os.utime(mark, (stale, stale))  # what STALE_S without renewal makes of it
    new.renew(serving=False)
    assert mark.stat().st_mtime == stale and old.successor() is None and new.lapsed
    assert not new.settled()  # its first complete view comes before the renew: no new pod yet
    new.renew(serving=True)  # it serves at last
    assert old.successor() == NEW and not new.settled()
    t[0] += SETTLE_S
    assert new.settled()
