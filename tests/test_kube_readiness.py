"""The agent's readiness follows its cluster view: not ready, with a log line, while the source
reports a kind unwatched beyond its bound; ready again, with a log line, when it recovers."""

import logging

from nodeagent.agent.agent import Agent, Lifecycle
from nodeagent.settings import AgentSettings


class Source:
    """The source interface the agent reads (KubeSource, ManifestDirSource)."""

    def __init__(self):
        self.current: list[str] = []

    def problems(self) -> list[str]:
        return self.current


def test_readiness_goes_with_the_views_freshness_and_says_why(caplog):
    source = Source()
    agent = Agent(AgentSettings(node_name="node0"), source)
    assert not agent.ready  # nothing served yet
    agent.lifecycle = Lifecycle.SERVING
    agent._check_source()
    assert agent.ready
    source.current = ["pods: not watched for 75 s (12 failures; last: ApiError: 403: forbidden)"]
    with caplog.at_level(logging.INFO, logger="nodeagent.agent"):
        agent._check_source()
        assert not agent.ready
        agent._check_source()  # logged once, not on every round
        source.current = []
        agent._check_source()
    assert agent.ready
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "403: forbidden" in lines[0] and "ready again" in lines[1]
