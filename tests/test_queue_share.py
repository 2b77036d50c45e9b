"""Per-pod shares of a node-wide queue (proxy/queue_share.py): plain values, no threads except
where the hand-over between the writer's thread and the loop is the point."""

import itertools
import threading

import pytest

from nodeagent.proxy.queue_share import QueueShares


def test_a_pod_stops_at_its_share_and_the_others_still_get_in():
    shares = QueueShares(total=8, per_pod=2)
    assert [shares.admit("a") for _ in range(4)] == [True, True, False, False]
    assert shares.admit("b") and shares.admit("b") and not shares.admit("b")
    assert shares.held("a") == 2 and shares.held("b") == 2 and shares.queued == 4


def test_the_total_bounds_the_queue_whatever_the_pods():
    shares = QueueShares(total=5, per_pod=2)
    admitted = [shares.admit(pod) for pod in "abcdef"]
    assert admitted == [True] * 5 + [False] and shares.queued == 5


def test_entries_taken_by_the_writer_give_the_room_back_at_the_next_admit():
    shares = QueueShares(total=4, per_pod=2)
    assert shares.admit("a") and shares.admit("a") and not shares.admit("a")
    shares.taken(["a"])
    assert shares.admit("a") and not shares.admit("a")
    shares.taken(["a", "a"])
    assert shares.held("a") == 0 and shares.queued == 0
    assert "a" not in shares._held  # a pod with nothing queued costs no entry


@pytest.mark.parametrize("total, per_pod, floor", [(1, 1, 0), (4, 1, 0), (4, 4, 0), (7, 3, 0), (2, 1, 1), (3, 2, 1),
                                                   (4, 2, 2)])
def test_every_order_of_admits_and_takes_keeps_the_bounds(total, per_pod, floor):
    """All sequences of six steps over three pods: a pod under its floor is always admitted; above
    it, never more than per_pod for a pod or total in all, and a pod under both is admitted."""
    steps = [("admit", "a"), ("admit", "b"), ("admit", "c"), ("take", None)]
    for sequence in itertools.product(steps, repeat=6):
        shares, queue = QueueShares(total, per_pod, floor), []
        for step, pod in sequence:
            if step == "take":
                if queue:
                    shares.taken([queue.pop(0)])
                continue
            held = queue.count(pod)
            expected = held < floor or (held < per_pod and len(queue) < total)
            assert shares.admit(pod) == expected
            if expected:
                queue.append(pod)
            assert shares.held(pod) == queue.count(pod) and shares.queued == len(queue)


def test_pods_flooding_together_still_leave_each_quiet_pod_its_floor():
    shares = QueueShares(total=100, per_pod=50, floor=5)
    for pod in ("flood-a", "flood-b", "flood-c"):
        for _ in range(1000):
            shares.admit(pod)
    assert shares.held("flood-a") == 50 and shares.held("flood-b") == 50 and shares.held("flood-c") == 5
    assert [shares.admit("quiet") for _ in range(6)] == [True] * 5 + [False]  # its floor, past the total
    assert shares.queued == 110  # at most total + floor x pods with entries


def test_a_share_must_fit_the_queue_and_the_floor_the_share():
    with pytest.raises(ValueError):
        QueueShares(total=4, per_pod=5)
    with pytest.raises(ValueError):
        QueueShares(total=4, per_pod=0)
    with pytest.raises(ValueError):
        QueueShares(total=4, per_pod=2, floor=3)


def test_takes_from_another_thread_are_folded_in_by_the_admitting_thread():
    shares = QueueShares(total=10_000, per_pod=10_000)
    for _ in range(10_000):
        assert shares.admit("a")
    writer = threading.Thread(target=lambda: [shares.taken(["a"] * 10) for _ in range(1000)])
    writer.start()
    while writer.is_alive():
        shares.admit("b")
    writer.join()
    assert shares.held("a") == 0 and shares.queued == shares.held("b")
