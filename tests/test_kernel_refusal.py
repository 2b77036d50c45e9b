"""A pod over a limit of its own in the proxy has its connects refused in the kernel for a while
(proxy/refusal.py, the `refusing` map of bpf/datapath.c): real programs, a lab pod's real
connects, the proxy's own clock turned into the kernel's deadline. A stand-in proxy serves."""

import asyncio
import errno
import logging
import os
import time
from types import SimpleNamespace

import pytest

from nodeagent.datapath import abi, libbpf
from nodeagent.datapath.pins import PinLayout
from nodeagent.lab import lab as lab_ops
from nodeagent.proxy.limits import Limit
from nodeagent.proxy.problems import ProblemLog
from nodeagent.proxy.refusal import KernelRefusals
from test_datapath import CONNECT_ERRNO, NODE, lab, loaded, node_cgroup, proxy, run_in, serve  # noqa: F401 (fixtures)

pytestmark = pytest.mark.privileged
WINDOW_S = 3.0  # long enough for a process to start in the pod and connect, on a busy machine


def open_window(refusals: KernelRefusals, pod, direction: str) -> float:
    """The window, opened as the proxy opens it (from its event loop's clock); when it ends (monotonic)."""
    async def opened():
        refusals.opened(pod, direction, Limit.HANDSHAKE_RATE, asyncio.get_running_loop().time() + WINDOW_S)
    asyncio.run(opened())
    return time.monotonic() + WINDOW_S


def refusing_entry(cookie: int):
    fd = libbpf.obj_get(str(PinLayout(lab_ops.BPF_PIN_ROOT, NODE).map("refusing")))
    try:
        return libbpf.map_lookup(fd, abi.u64(cookie), 8)
    finally:
        os.close(fd)


def test_a_pod_in_a_refusal_window_gets_eperm_for_its_connects_until_it_ends_and_no_other_pod_does(lab, proxy):
    noisy, other = serve(lab, proxy, "client-n0-0", slot=40), serve(lab, proxy, "banner-n0-0", slot=41)
    echo = lab.plan.pod("echo-n1-0")
    connect = CONNECT_ERRNO.format(ip=echo.ip, port=9000)
    refusals = KernelRefusals(proxy.datapath, ProblemLog(logging.getLogger("test")))
    ends = open_window(refusals, SimpleNamespace(cookie=noisy, key="lab/client-n0-0"), "outbound")
    assert run_in(lab, "client-n0-0", connect).stdout.strip() == str(errno.EPERM)
    assert run_in(lab, "banner-n0-0", connect).stdout.strip() == "connected"  # its neighbour is served
    assert time.monotonic() < ends, "the machine was too slow for the window: the EPERM above proves it held"
    counters = proxy.datapath.counters(40)
    assert (counters["over_limit"], counters["redirected"], counters["denied"]) == (1, 0, 0)
    assert proxy.datapath.counters(41)["over_limit"] == 0
    time.sleep(max(0.0, ends - time.monotonic()) + 0.05)
    assert run_in(lab, "client-n0-0", connect).stdout.strip() == "connected"  # it ends by itself
    assert proxy.datapath.counters(40)["redirected"] == 1 and proxy.datapath.counters(40)["over_limit"] == 1
    # An inbound window concerns other pods' connects: it is never written to the kernel.
    open_window(refusals, SimpleNamespace(cookie=other, key="lab/banner-n0-0"), "inbound")
    assert run_in(lab, "banner-n0-0", connect).stdout.strip() == "connected"
    # A pod that leaves takes its entry with it.
    assert refusing_entry(noisy) is not None
    proxy.datapath.forget(noisy, lab.plan.pod("client-n0-0").ip)
    assert refusing_entry(noisy) is None
    # A window written after the pod's entry went (a worker not yet told) is swept; an enrolled pod's stays.
    proxy.datapath.refuse_connects(noisy, time.monotonic_ns() + 10**9)
    proxy.datapath.refuse_connects(other, time.monotonic_ns() + 10**9)
    assert proxy.datapath.sweep_refusals() == 1
    assert refusing_entry(noisy) is None and refusing_entry(other) is not None
