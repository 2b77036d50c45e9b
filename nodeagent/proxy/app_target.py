"""Where the requests of one inbound HTTP connection go: the pod's own app, at the pod's IP and
the port the client asked for (inbound.py terminates HTTP/1 and HTTP/2 there, as Linkerd's
inbound proxy does). The same Http1Server and Http2Server serve it as outbound, through this
target instead of an HttpTarget: one endpoint, no balancer, no retries (the client's own proxy
retries), connections to the app pooled per (pod, port) apart from the outbound pools, and every
request counted with direction="inbound" under the client's identity, so a workload's success
rate is visible from its own node whoever its clients are.
"""

import time

from nodeagent.proxy.limits import Limit
from nodeagent.proxy.retry import Retries
from nodeagent.proxy.tap import request_event
from nodeagent.proxy.target_counts import TargetCounts


class AppTarget(TargetCounts):
    direction = "inbound"
    request_timeout_s = None  # the client side's Service sets the timeout

    def __init__(self, deps, pod, port: int, peer: str, tls: bool, client_ip: str):
        self.pod, self.peer, self.tls = pod, peer, tls
        self.address = (pod.info.ip, port)
        self.pools, self.observers = deps.app_pools, deps.observers
        self.connect_timeout_s = deps.timeouts.app_connect_s
        self._requests = deps.observers.metrics.requests("inbound", pod, peer, tls)
        # None: no access log and no tracing for this connection's requests (telemetry.py)
        self.log = deps.observers.telemetry.requests("inbound", pod, f"pod/{pod.key}", f"pod/{pod.key}:{port}",
                                                     client_addr=client_ip, client_id=peer)

    # --- each request ---

    def retries(self, facts, request) -> Retries:
        if self.log is not None:
            self.log.start(request)  # this hop's trace context
        return Retries(facts, 0, frozenset(), None)  # a limit of 0: never retried here, the budget never asked

    def choose(self, tried: set):
        return None, self.address

    async def acquire(self, address):
        return await self.pools.http1.acquire(self.pod.netns_path, self.pod.cookie, address, self.connect_timeout_s)

    def pooled_h2(self, address):
        return self.pools.http2.ready(self.pod.cookie, address)

    async def acquire_h2(self, address):
        return await self.pools.http2.acquire(self.pod.netns_path, self.pod.cookie, address, self.connect_timeout_s,
                                              report=self.count_http2_refusal)

    def pooled(self, address):
        return self.pools.http1.take(self.pod.cookie, address)

    def release(self, address, conn) -> None:
        self.pools.http1.release(self.pod.cookie, address, conn)

    stream_limit = Limit.INBOUND_HTTP2_STREAMS  # the pod's clients cannot use up its own outbound share

    def take_stream(self) -> bool:
        return self.pod.quota.take(self.stream_limit)

    def give_stream(self) -> None:
        self.pod.quota.give(self.stream_limit)

    # --- what happened ---

    def connect_failed(self, state, exc) -> None:
        self.observers.metrics.tcp_error("inbound", self.pod, "app connect failed")

    @staticmethod
    def connect_failure_reason(exc) -> str:
        return "app connect failed"

    def request_started(self, state, address) -> float:
        self._requests.request()
        return time.monotonic()

    def request_finished(self, state, token, status, grpc_status=None) -> None:
        pass

    def request_abandoned(self, state, token) -> None:
        pass

    def count_response(self, request, status, address=None, failure=None) -> None:
        self._requests.response(status, request.started, failure, getattr(request, "head_at", None))
        if self.log is not None:
            self.log.response(request, status, self.tls, failure)
        tap = self.observers.tap
        if tap.subscriptions:
            tap.publish(lambda: request_event("inbound", self.pod, self.peer, request, status, self.tls))
