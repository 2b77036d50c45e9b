"""periodic.Every: plain values, no clock."""

from nodeagent.periodic import Every


def test_due_a_period_after_it_is_made_then_a_period_after_each_time_it_was_due():
    every = Every(2.0, now=10.0)
    assert [every.due(t) for t in (10.0, 11.9)] == [False, False]
    assert every.due(12.0) and not every.due(12.5) and not every.due(13.9)
    assert every.due(20.0)  # late: due once, not once per missed period
    assert not every.due(21.9) and every.due(22.0)
