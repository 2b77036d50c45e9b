"""One client address's share of a pod's mesh handshakes in progress (proxy/source_share.py)."""

import pytest

from nodeagent.proxy.source_share import SourceShares, share_of


@pytest.mark.parametrize("limit, share", [(0, 1), (1, 1), (3, 1), (4, 1), (7, 1), (8, 2), (64, 16), (65, 16)])
def test_a_quarter_of_the_limit_and_at_least_one(limit, share):
    assert share_of(limit) == share


def test_an_address_over_its_share_is_refused_and_others_are_not():
    shares = SourceShares()
    holds = [shares.take("10.0.0.1", 8) for _ in range(3)]
    assert holds[2] is None and shares.held("10.0.0.1") == 2
    other = shares.take("10.0.0.2", 8)
    assert other is not None and len(shares) == 2
    holds[0].release()
    holds[0].release()  # given back once, whoever calls first
    assert shares.held("10.0.0.1") == 1 and shares.take("10.0.0.1", 8) is not None


def test_an_address_is_forgotten_when_it_holds_nothing():
    shares = SourceShares()
    hold = shares.take("10.0.0.1", 64)
    hold.release()
    assert len(shares) == 0 and shares.held("10.0.0.1") == 0


def test_a_lowered_limit_refuses_until_the_address_is_under_its_new_share():
    shares = SourceShares()
    holds = [shares.take("a", 64) for _ in range(4)]
    assert shares.take("a", 8) is None  # the limit lowered live: 4 held, the share now 2
    for hold in holds[:3]:
        hold.release()
    assert shares.take("a", 8) is not None
