"""The counts of handshakes in progress agree with the handshake rates (limits.DEFAULTS): a pod
within its `handshake-rate` is not refused by a count while each handshake finishes within the
mesh client's connect deadline, however long the node's busy CPU makes it take. Plain values.

Handshakes in progress = rate x how long each takes (Little's law). The soak (40 new opaque
connections a second from one pod, under its rate of 50) lost a few in a thousand to the
`handshakes` count (16) and to a client's share of `inbound-handshakes` (64 / 4) whenever the
loaded node made handshakes take 0.4 s (benchmarks/README.md, "Soak")."""

import heapq

import pytest

from nodeagent.proxy import limits, source_share
from nodeagent.proxy.limits import Limit, Quota
from nodeagent.proxy.service_config import ServiceConfig

DEADLINE_S = ServiceConfig().connect_timeout_s  # a mesh client's connect (and handshake) deadline


def refused_over_count(rate: float, handshake_s: float, seconds: float = 5.0,
                       pod_limits: limits.PodLimits = limits.PodLimits()) -> int:
    """A pod opens `rate` connections a second, each a handshake that takes `handshake_s` once its
    turn has come (upstream.connect's order: the turn, then one of the pod's `handshakes`). How
    many the `handshakes` count refused (the rate refused none: `rate` is under it)."""
    quota, events, refused = Quota(pod_limits), [], 0
    for i in range(int(rate * seconds)):
        heapq.heappush(events, (i / rate, 1, "arrive"))
    while events:
        now, _, what = heapq.heappop(events)
        if what == "arrive":
            turn = quota.handshake_turn("outbound", now)
            assert turn is not None, "the pod is under its rate: every handshake gets a turn"
            heapq.heappush(events, (now + turn, 1, "start"))
        elif what == "start":
            if quota.take(Limit.HANDSHAKES):
                heapq.heappush(events, (now + handshake_s, 0, "done"))  # done before a start at the same time
            else:
                refused += 1
        else:
            quota.give(Limit.HANDSHAKES)
    return refused


@pytest.mark.parametrize("handshake_s", [0.01, 0.4, 0.5, 0.9, 0.99 * DEADLINE_S])
def test_a_pod_at_its_rate_is_not_refused_while_its_handshakes_finish_in_time(handshake_s):
    rate = limits.DEFAULTS[Limit.HANDSHAKE_RATE]
    assert refused_over_count(rate, handshake_s) == 0
    assert refused_over_count(40, handshake_s) == 0  # the soak's pace


def test_the_count_still_bounds_handshakes_slower_than_the_deadline():
    """Slower than the deadline a handshake fails anyway: the count holds them to rate x deadline."""
    rate = limits.DEFAULTS[Limit.HANDSHAKE_RATE]
    assert refused_over_count(rate, 2 * DEADLINE_S) > 0


def test_the_old_count_refused_the_soak_pod_once_handshakes_took_half_a_second():
    old = limits.parse("handshakes=16")
    assert refused_over_count(40, 0.5, pod_limits=old) > 0
    assert refused_over_count(40, 0.5) == 0


def test_one_client_pod_at_its_rate_fits_in_its_share_of_a_servers_inbound_handshakes():
    """Mesh clients connect from their own pod's address, and an address holds at most a quarter
    of the server pod's `inbound-handshakes` (source_share.py): that quarter is at least what a
    client pod may have in progress at its rate, so none within its limits meets it."""
    share = source_share.share_of(limits.DEFAULTS[Limit.INBOUND_HANDSHAKES])
    assert share >= limits.DEFAULTS[Limit.HANDSHAKES]
    assert share >= limits.DEFAULTS[Limit.HANDSHAKE_RATE] * DEADLINE_S
