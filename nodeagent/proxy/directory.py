"""What the node's pods share about destinations: the cluster view, and per Service port its
balancer (an EndpointSet: latency and failure state per endpoint), per Service its config
(from annotations) and retry budget; and which pods this proxy serves.

Every view change refreshes each Service's endpoints at once and forgets the Services that
left, so nothing here grows with time, only with the cluster. (EndpointSets used to be
refreshed lazily, keyed by id(view); CPython reuses ids, so a Service kept its old endpoints
after about half of the view changes.)
"""

import logging
import random
import time
from collections.abc import Callable

from nodeagent.cluster.model import ClusterView, PodInfo
from nodeagent.proxy import service_config
from nodeagent.proxy.budget import RetryBudget
from nodeagent.proxy.endpoints import EndpointSet
from nodeagent.proxy.routing import Route, ToService, route

log = logging.getLogger("nodeagent.proxy")
NO_SERVICE = "default"  # the budget of requests to pods and outside addresses


class Directory:
    def __init__(self, rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic):
        self.view = ClusterView()
        self._rng = rng or random.Random()
        self._clock = clock
        self._endpoint_sets: dict[tuple[str, int], EndpointSet] = {}  # (service key, port) -> balancer
        self._configs: dict[str, tuple[dict, service_config.ServiceConfig]] = {}
        self._budgets: dict[str, RetryBudget] = {}
        self._served: dict[str, object] = {}  # pod key -> PodContext of a pod this process serves

    # --- the view ---

    def update(self, view: ClusterView) -> None:
        self.view = view
        for key, endpoints in list(self._endpoint_sets.items()):
            match = view.service_by_address.get(self._address_of(key))
            if match is None:
                del self._endpoint_sets[key]
            else:
                endpoints.update(view.endpoints(*match))
        for key in [k for k in self._configs if k not in view.services]:
            del self._configs[key]
        for key in [k for k in self._budgets if k != NO_SERVICE and k not in view.services]:
            del self._budgets[key]

    def _address_of(self, key: tuple[str, int]) -> tuple[str, int]:
        service = self.view.services.get(key[0])
        return (service.cluster_ip, key[1]) if service is not None else ("", 0)

    def route(self, ip: str, port: int) -> Route:
        return route(self.view, ip, port)

    def meshed(self, pod: PodInfo | None) -> bool:
        return pod is not None and self.view.meshed(pod)

    # --- per Service ---

    def endpoints_for(self, decision: ToService) -> EndpointSet:
        key = (decision.service.key, decision.port.port)
        endpoints = self._endpoint_sets.get(key)
        if endpoints is None:
            endpoints = self._endpoint_sets[key] = EndpointSet(rng=self._rng, clock=self._clock)
            endpoints.update(decision.endpoints)
        return endpoints

    def config_for(self, decision: Route) -> service_config.ServiceConfig:
        if not isinstance(decision, ToService):
            return service_config.DEFAULT
        service = decision.service
        cached = self._configs.get(service.key)
        if cached is None or cached[0] != service.annotations:
            config, errors = service_config.from_annotations(service.annotations)
            for error in errors:  # once per change of the annotations
                log.warning("service %s: %s", service.key, error)
            cached = (service.annotations, config)
            self._configs[service.key] = cached
        return cached[1]

    def budget_for(self, decision: Route) -> RetryBudget:
        key = decision.service.key if isinstance(decision, ToService) else NO_SERVICE
        budget = self._budgets.get(key)
        if budget is None:
            budget = self._budgets[key] = RetryBudget(self._clock)
        return budget

    # --- the pods this process serves ---

    def serve(self, key: str, pod) -> None:
        self._served[key] = pod

    def unserve(self, key: str) -> None:
        self._served.pop(key, None)

    def served(self, pod: PodInfo | None):
        """The PodContext of `pod` if this process serves it (it is on this node), else None."""
        return self._served.get(pod.key) if pod is not None else None

    def sizes(self) -> dict[str, int]:
        """How much is cached (for /stats and the memory tests)."""
        return {"endpoint_sets": len(self._endpoint_sets), "configs": len(self._configs),
                "budgets": len(self._budgets)}
