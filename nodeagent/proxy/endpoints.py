"""A Service's endpoints as the balancer sees them: latency and failure state
per endpoint, shared by every pod on the node that talks to the Service."""

import random
import time
from dataclasses import dataclass, field

from nodeagent.cluster.model import Endpoint
from nodeagent.proxy.accrual import FailureAccrual
from nodeagent.proxy.balance import PeakEwma, p2c, prior


@dataclass
class EndpointState:
    endpoint: Endpoint
    ewma: PeakEwma
    accrual: FailureAccrual
    connections: int = 0  # open TCP connections balanced here (opaque traffic)

    @property
    def address(self) -> tuple[str, int]:
        return self.endpoint.ip, self.endpoint.port


@dataclass
class EndpointSet:
    """Kept across cluster updates: an endpoint that stays keeps its history."""

    rng: random.Random = field(default_factory=random.Random)
    clock: object = time.monotonic
    states: dict[tuple[str, int], EndpointState] = field(default_factory=dict)

    def update(self, endpoints: tuple[Endpoint, ...]) -> None:
        fresh = {}
        staying = [self.states[key].ewma for key in ((e.ip, e.port) for e in endpoints) if key in self.states]
        start_rtt = prior(staying)  # a joining endpoint is tried at once, not after its default decays
        for endpoint in endpoints:
            key = (endpoint.ip, endpoint.port)
            state = self.states.get(key)
            if state is None:
                state = EndpointState(endpoint, PeakEwma(self.clock, rtt_s=start_rtt),
                                      FailureAccrual(self.clock, jitter=lambda: self.rng.random() * 0.1))
            else:
                state.endpoint = endpoint
            fresh[key] = state
        self.states = fresh

    def available(self) -> list[EndpointState]:
        return [s for s in self.states.values() if s.accrual.available()]

    def choose_for_request(self, exclude: set | None = None) -> EndpointState | None:
        """P2C over peak-EWMA cost among endpoints not ejected (and not already tried)."""
        candidates = [s for s in self.available() if not exclude or s.address not in exclude]
        if not candidates:
            return None
        return p2c(candidates, lambda s: s.ewma.cost(), self.rng)

    def choose_for_connection(self, exclude: set | None = None) -> EndpointState | None:
        """Opaque TCP is balanced per connection: P2C over open connections."""
        candidates = [s for s in self.available() if not exclude or s.address not in exclude]
        if not candidates:
            return None
        return p2c(candidates, lambda s: s.connections, self.rng)

    def why_unavailable(self) -> str:
        if not self.states:
            return "no endpoints"
        return "all endpoints ejected"
