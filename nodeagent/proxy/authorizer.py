"""Inbound authorization as the proxy asks it: each pod's policy (from its annotations, read
from the current view, as they change while the pod runs) and policy/authz.py's decision,
counted and, when refused, logged without flooding."""

from collections.abc import Callable

from nodeagent.cluster.model import ClusterView
from nodeagent.policy import authz


class Authorizer:
    def __init__(self, default_policy: authz.Mode, cluster_networks: tuple, trust_domain: str,
                 view: Callable[[], ClusterView], observers):
        self.default_policy, self.cluster_networks, self.trust_domain = default_policy, cluster_networks, trust_domain
        self._view = view
        self._observers = observers
        self._policies: dict[str, tuple[dict, authz.PodPolicy]] = {}  # pod key -> (annotations, policy)

    def policy(self, pod) -> authz.PodPolicy:
        annotations = self._view().pods.get(pod.key, pod.info).annotations
        cached = self._policies.get(pod.key)
        if cached is None or cached[0] != annotations:
            policy, errors = authz.pod_policy(annotations, self.default_policy)
            for error in errors:
                self._observers.problems.warning("policy", "pod %s: %s", pod.key, error)
            cached = self._policies[pod.key] = (annotations, policy)
        return cached[1]

    def authorize(self, pod, port: int, client: authz.Client) -> authz.Decision:
        decision = authz.authorize(self.policy(pod), port, client, self.cluster_networks, self.trust_domain)
        self._observers.metrics.authorization(pod, decision.allowed, client.identity is not None)
        if not decision.allowed:
            self._observers.problems.warning("deny", "pod %s port %d: refused %s: %s", pod.key, port,
                                             client.identity or client.ip, decision.reason)
        return decision

    def reconfigure(self, default_policy: authz.Mode, cluster_networks: tuple) -> None:
        """New cluster-wide defaults (live_settings.py): each pod's policy is made again at its next decision."""
        self.default_policy, self.cluster_networks = default_policy, cluster_networks
        self._policies.clear()

    def forget(self, pod_key: str) -> None:
        self._policies.pop(pod_key, None)
