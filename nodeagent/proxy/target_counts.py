"""What an HTTP target counts besides its responses, the same on both sides of the proxy: the
HTTP servers (http1.py, http2.py) report through their target the proxy's own answers, a pod's
limit reached, a response cut after its head, and an HTTP/2 peer over a flood budget. Mixed
into HttpTarget (outbound) and AppTarget (inbound), which set `direction`, `observers`, `pod`."""


class TargetCounts:
    direction: str  # "outbound" | "inbound": the metrics' direction label

    def sending(self, request, address) -> None:
        """An attempt of `request` to `address` is about to be sent (its head not built yet):
        HttpTarget starts a one-hop destination's span here; nothing to do on the inbound side."""

    def count_error(self, status: int, reason: str) -> None:
        """The proxy answered the request itself (a 4xx/5xx of its own): counted and logged."""
        self.observers.metrics.http_error(self.direction, self.pod, status, reason)
        self.observers.problems.warning(f"http-error {self.pod.key}", "%s %s: answered %d: %s", self.direction,
                                        self.pod.key, status, reason)

    def count_limit(self, limit: str) -> None:
        self.observers.metrics.limit_exceeded(self.direction, self.pod, limit)

    def count_cut(self, reason: str) -> None:
        """A response cut short after its head was sent (no error response possible)."""
        self.observers.metrics.tcp_error(self.direction, self.pod, reason)

    def count_http2_refusal(self, flood) -> None:
        """An HTTP/2 peer (the client, or an endpoint) went over its budget (h2budget.Flood)."""
        self.observers.metrics.http2_flood(self.direction, self.pod, flood)
