"""Observers.guarded: a bug in one connection's stage ends that connection, logged and counted;
a cancellation passes through untouched."""

import asyncio
import logging

import pytest

from nodeagent.cluster.model import ClusterView, PodInfo
from nodeagent.identity import naming
from nodeagent.proxy.context import Observers, PodContext
from nodeagent.proxy.limits import PodLimits, Quota
from nodeagent.proxy.metrics import Metrics
from nodeagent.proxy.problems import ProblemLog
from nodeagent.proxy.tap import TapHub
from nodeagent.proxy.telemetry import Telemetry
from nodeagent.settings import DEFAULT


def observers() -> Observers:
    metrics, problems = Metrics(), ProblemLog(logging.getLogger("test-guarded"))
    return Observers(metrics, TapHub(), problems, Telemetry(DEFAULT, metrics, problems, lambda: ClusterView([])))


def pod() -> PodContext:
    info = PodInfo("default", "web-0", "uid", "node0", "10.244.0.9", "web", {}, {})
    return PodContext(info, -1, 1, 0, naming.of_pod("default", "web", "cluster.local"), Quota(PodLimits()))


def test_a_bug_in_a_stage_ends_its_connection_logged_and_counted(caplog):
    seen, cleaned = observers(), []

    async def buggy():
        raise KeyError("oops")

    with caplog.at_level(logging.ERROR, logger="test-guarded"):
        asyncio.run(seen.guarded(buggy(), "outbound", pod(), lambda: cleaned.append(True)))
    assert cleaned == [True]
    assert "outbound connection of default/web-0: KeyError" in caplog.text
    errors = {tuple(s.labels.values()): s.value for m in seen.metrics.tcp_errors_total.collect() for s in m.samples
              if s.name.endswith("_total")}
    assert errors == {("outbound", "default", "web-0", "proxy error"): 1.0}


def test_a_cancelled_stage_is_not_a_bug():
    seen, cleaned = observers(), []

    async def main():
        task = asyncio.ensure_future(seen.guarded(asyncio.sleep(10), "inbound", pod(), lambda: cleaned.append(True)))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert cleaned == []
