"""A pod over its limits, refused outright: at accept, and in the kernel for its own connects.

When one of a pod's new connections is refused for its handshake rate (turns already queued
half a second ahead: its next connections would be refused too), the pod's Quota opens a
refusal window until that queue is empty, half a second at most (limits.Quota.refuse,
pacing.Pace.reopens_at). For
that window:

- the kernel refuses the pod's captured connects: connect() fails with EPERM at once, counted in
  the pod's `over_limit` counter (`kernel_over_limit_refused_total`). The proxy never accepts
  them: no TCP handshake on the pod's loopback, no accept, no detection (bpf/datapath.c,
  `refusing`);
- a connection the kernel let through all the same (accepted before the window reached the
  kernel, or a proxy without a data path) is refused at accept, before detection: reset, counted
  as the refusal it stands for would be, logged rate-limited (`refused_at_accept`).

The window is written as an absolute CLOCK_MONOTONIC deadline (the clock of bpf_ktime_get_ns):
it ends by itself, and a stale entry refuses nothing. Refusals inside a window do not extend it:
the pod is served again as soon as its limit would admit it.
"""

import asyncio
import time

from nodeagent.proxy.limits import Limit


class KernelRefusals:
    """Writes a pod's refusal windows into the data path, if there is one (`refuse_connects`)."""

    def __init__(self, datapath, problems):
        self.refuse_connects = getattr(datapath, "refuse_connects", None)
        self.problems = problems

    def opened(self, pod, direction: str, limit: Limit, until: float) -> None:
        """`pod`'s window in `direction` runs until `until` (the event loop's clock)."""
        seconds = max(0.0, until - asyncio.get_running_loop().time())
        self.problems.warning(f"refusing {limit.value}", "pod %s: over its %s limit: its new %s connections are "
                              "refused for %.2f s", pod.key, limit.value, direction, seconds)
        if direction != "outbound" or self.refuse_connects is None:
            return  # inbound connections are other pods' connects: refused at accept only
        try:
            self.refuse_connects(pod.cookie, time.monotonic_ns() + int(seconds * 1e9))
        except OSError as e:  # the map is full or gone: the proxy still refuses at accept
            self.problems.warning("refusing in the kernel", "pod %s: its refusal could not be written to the data "
                                  "path (%s): refused at accept instead", pod.key, e)


def refused_at_accept(observers, pod, direction: str, limit: Limit, transport) -> None:
    """A connection of a pod in a refusal window: reset before anything is read from it, counted
    as the refusal it stands for (a paced-out outbound handshake is also a connection the proxy
    could not serve: a tcp_error, as when it is refused at its handshake)."""
    observers.metrics.limit_exceeded(direction, pod, limit.value)
    if direction == "outbound" and limit is Limit.HANDSHAKE_RATE:
        observers.metrics.tcp_error(direction, pod, f"{limit.value} limit")
    observers.problems.warning(f"limit {limit.value}", "pod %s: %s connection refused: the %s limit is reached",
                               pod.key, direction, limit.value)
    transport.abort()
