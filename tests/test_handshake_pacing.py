"""A pod's `handshake-rate` (proxy/pacing.py) through the real proxy: two pods in their own
network namespaces and one real Proxy (benchmarks/podpair.py), real sockets and real mutual-TLS
handshakes between pod A's outbound and pod B's inbound side. A burst of short opaque
connections from pod A to pod B's echo server: past the rate (pod A's `handshake-rate` as
client, pod B's `inbound-handshake-rate` as server), handshakes wait their turn (up to
pacing.MAX_WAIT_S), and the rest are refused and counted, on the side whose rate it is. Needs root
(namespaces), not the lab. Bounded: 12 connections per test, a few seconds."""

import asyncio
import json
import os
import sys
import time
from dataclasses import replace

import pytest

from benchmarks.podpair import A_IP, B_IP, NAMESPACE, PodPair, pod_object
from nodeagent.cluster.model import ClusterView
from nodeagent.proxy import limits
from nodeagent.settings import DEFAULT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

BURST = 12
RATE = 2  # a burst of 2 at once, then 1 turn within MAX_WAIT_S (at 0.5 s): 3 served of 12
MESH = replace(DEFAULT, on_node_plaintext=False, pod_limits=limits.parse(f"handshake-rate={RATE}"))  # pod A's

# `count` threads in pod A, each making connections one after another (`interval` s apart) until
# `seconds` have passed, at least one; each one echo of 4 bytes. Prints what happened as JSON.
CLIENT = """
import json, socket, sys, threading, time
results = []
start = time.monotonic()
def one():
    while True:
        try:
            with socket.create_connection(("127.0.0.1", {port}), timeout=5) as s:
                s.sendall(b"ping")
                results.append(s.recv(4) == b"ping")
        except OSError:
            results.append(False)
        if time.monotonic() - start >= {seconds}:
            return
        time.sleep({interval})
threads = [threading.Thread(target=one) for _ in range({count})]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({{"ok": results.count(True), "failed": results.count(False), "seconds": time.monotonic() - start}}))
"""


def client(port: int, count: int, seconds: float = 0, interval: float = 0) -> list[str]:
    return [sys.executable, "-c", CLIENT.format(port=port, count=count, seconds=seconds, interval=interval)]


def sample(pair, name: str, **labels) -> float:
    return pair.proxy.metrics.registry.get_sample_value(name, labels) or 0.0


def refused(pair, direction: str, pod: str) -> float:
    limit = "handshake-rate" if direction == "outbound" else "inbound-handshake-rate"
    return sample(pair, "limit_exceeded_total", direction=direction, namespace=NAMESPACE, pod=pod, limit=limit)


async def settled(pair, pod: str) -> None:
    """Every connection of `pod` closed and given back (within a few seconds)."""
    for _ in range(50):
        if not pair.proxy.connections.live(pair.pods[pod].key):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{pod} still holds {pair.proxy.connections.live(pair.pods[pod].key)}")


async def burst(pair) -> dict:
    _, port = pair.aim("echo")
    done = await pair.run_in_a_async(client(port, BURST), timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def with_pair(settings, scenario, annotations_b: dict | None = None, annotations_a: dict | None = None,
                    namespace_annotations: dict | None = None):
    pair = await PodPair(settings).start()
    try:
        a, b = pod_object("pod-a", A_IP), pod_object("pod-b", B_IP)
        a["metadata"]["annotations"], b["metadata"]["annotations"] = annotations_a or {}, annotations_b or {}
        namespace = {"metadata": {"name": NAMESPACE, "annotations": namespace_annotations or {}}}
        pair.proxy.update_view(ClusterView([a, b], namespaces=[namespace]))
        return await scenario(pair)
    finally:
        await pair.stop()


def assert_paced(got: dict) -> None:
    """RATE at once, then one turn within MAX_WAIT_S; the rest refused. Connections that arrive
    spread out (a busy machine) find the bucket refilled by RATE a second while they arrive: the
    bound grows with the burst's length instead of assuming it is short."""
    assert got["ok"] + got["failed"] == BURST, got
    assert got["ok"] >= RATE + 1, got  # the burst's tokens, and one connection that waited its turn
    assert got["ok"] <= RATE + 1 + RATE * got["seconds"], got
    assert got["failed"] >= 1, got


def test_over_its_rate_a_pods_handshakes_wait_their_turn_then_are_refused_and_counted():
    async def scenario(pair):
        got = await burst(pair)
        assert_paced(got)
        assert refused(pair, "outbound", "pod-a") == got["failed"]
        # each refused connection is one connection the proxy could not serve (it was counted twice)
        assert sample(pair, "tcp_errors_total", direction="outbound", namespace=NAMESPACE, pod="pod-a",
                      reason="handshake-rate limit") == got["failed"]
        assert refused(pair, "inbound", "pod-b") == 0  # pod B's own rate was never reached
        await asyncio.sleep(1.5)  # the bucket refills: the pod is served again
        again = await burst(pair)
        assert again["ok"] >= RATE + 1, again
        await settled(pair, "pod-a")
    asyncio.run(with_pair(MESH, scenario))


def test_a_pods_rate_as_server_is_its_own_and_refusals_count_against_it():
    async def scenario(pair):
        got = await burst(pair)
        assert_paced(got)
        assert refused(pair, "inbound", "pod-b") == got["failed"]
        assert refused(pair, "outbound", "pod-a") == 0
        await settled(pair, "pod-b")
    # pod A at the default rate (50): only pod B's annotation paces these handshakes
    settings = replace(DEFAULT, on_node_plaintext=False)
    asyncio.run(with_pair(settings, scenario, {"limits.nodeagent.io/inbound-handshake-rate": str(RATE)}))


def test_a_pods_own_annotation_cannot_raise_its_rate_its_namespaces_can():
    """A pod's author could switch pacing off with one annotation (issue 13)."""
    raise_it = {"limits.nodeagent.io/handshake-rate": "1000000"}

    async def still_paced(pair):
        got = await burst(pair)
        assert_paced(got)
        assert refused(pair, "outbound", "pod-a") == got["failed"]
        assert pair.pods["pod-a"].quota.limits[limits.Limit.HANDSHAKE_RATE] == RATE

    async def raised(pair):
        got = await burst(pair)
        assert got["ok"] == BURST and refused(pair, "outbound", "pod-a") == 0, got
        await settled(pair, "pod-a")

    asyncio.run(with_pair(MESH, still_paced, annotations_a=raise_it))
    asyncio.run(with_pair(MESH, raised, namespace_annotations=raise_it))


def test_the_handshake_threads_run_below_the_event_loops_cpu_priority():
    from nodeagent.proxy import tls

    async def niceness_on_a_handshake_thread():
        got = asyncio.get_running_loop().create_future()
        tls.handshake_threads()(lambda: os.getpriority(os.PRIO_PROCESS, 0), got.set_result)
        return await got

    here = os.getpriority(os.PRIO_PROCESS, 0)
    assert asyncio.run(niceness_on_a_handshake_thread()) == min(19, here + tls.HANDSHAKE_NICENESS)


def judgements(pair) -> list:
    """Every window the proxy's own probe judges from now on, as the proxy is told them."""
    seen, judged = [], pair.proxy._judged

    def recorded(verdict):
        seen.append(verdict)
        judged(verdict)
    pair.proxy._judged = recorded
    return seen


async def churn_with_the_loop_held(pair, threads: int, interval: float) -> tuple[dict, list]:
    """Pod A churns connections to pod B's echo for 2 s while a callback that is no handshake
    holds the loop 30 ms at a time with 15 ms between (a pod's big body, GC, another process): the
    probe comes late about every other tick. What the client got, and the windows judged meanwhile."""
    seen = judgements(pair)
    _, port = pair.aim("echo")
    churning = asyncio.ensure_future(pair.run_in_a_async(client(port, threads, 2, interval), timeout=60))
    while not churning.done():
        time.sleep(0.03)
        await asyncio.sleep(0.015)
    done = await churning
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), seen


def test_a_loop_late_for_other_work_than_handshakes_cuts_no_pods_rate():
    """The loop late for other work while pod A makes a few real handshakes a second (under
    HANDSHAKE_PART of the time): late windows, and no rate cut. A design that cuts every pod for
    any lateness fails here."""
    from nodeagent.proxy import contention

    async def scenario(pair):
        got, seen = await churn_with_the_loop_held(pair, threads=1, interval=0.25)
        assert got["ok"] >= 4 and got["failed"] == 0, got
        late = [judged for judged in seen if judged.window is not contention.Window.QUIET]
        assert len(late) >= 3, [(j.window, j.late_ticks, round(j.handshake_part, 3)) for j in seen]
        assert all(judged.window is contention.Window.LATE_ELSEWHERE for judged in late)
        assert sum(judged.handshake_part for judged in seen) > 0  # its handshakes were charged, and small
        assert pair.proxy.contention.shares == {} and not any(judged.cut for judged in seen)
        quota = pair.pods["pod-a"].quota
        assert pair.proxy.contention.rate((quota, "outbound"), quota.limits[limits.Limit.HANDSHAKE_RATE]) == 50
        assert sample(pair, "event_loop_late_ticks_total") == pair.proxy.contention.late_ticks >= 3 * len(late)
        assert sample(pair, "handshake_rate_share", direction="outbound", namespace=NAMESPACE, pod="pod-a") == 0.0
    asyncio.run(with_pair(replace(DEFAULT, on_node_plaintext=False), scenario))


def test_a_late_loop_cuts_the_pods_whose_handshakes_take_a_large_part_of_it():
    """The same late loop while pod A churns real handshakes to pod B as fast as it may: their CPU
    is charged to pod A as client and pod B as server, both are cut, shown per pod, and the
    refusals under the cut are counted apart."""
    from nodeagent.proxy import contention

    async def scenario(pair):
        quota_a, quota_b = pair.pods["pod-a"].quota, pair.pods["pod-b"].quota
        got, seen = await churn_with_the_loop_held(pair, threads=6, interval=0)
        cut = [judged for judged in seen if judged.window is contention.Window.HANDSHAKES]
        assert cut, (got, [(j.window, j.late_ticks, round(j.handshake_part, 3)) for j in seen])
        assert {(quota_a, "outbound"), (quota_b, "inbound")} <= set().union(*(judged.cut for judged in cut))
        assert cut[0].entered and pair.proxy.contention.state is contention.State.CUTTING
        share_a = sample(pair, "handshake_rate_share", direction="outbound", namespace=NAMESPACE, pod="pod-a")
        assert 0 < share_a < 1 and share_a == pytest.approx(pair.proxy.contention.share((quota_a, "outbound")), abs=0.1)
        assert 0 < sample(pair, "handshake_rate_share", direction="inbound", namespace=NAMESPACE, pod="pod-b") < 1
        assert sample(pair, "handshake_rate_share", direction="inbound", namespace=NAMESPACE, pod="pod-a") == 0.0
        contended = sample(pair, "handshake_rate_contended_refusals_total", direction="outbound", namespace=NAMESPACE,
                           pod="pod-a")
        assert contended <= refused(pair, "outbound", "pod-a")  # a part of the rate's refusals
        await settled(pair, "pod-a")
    asyncio.run(with_pair(replace(DEFAULT, on_node_plaintext=False), scenario))


def test_the_probe_goes_on_after_an_exception_and_logs_it(caplog):
    """A probe that raised once is rescheduled all the same (a stopped probe would leave the
    rates as they were, cut or not), and what it raised is logged."""
    from nodeagent.proxy import contention

    async def scenario(pair):
        judged, windows = pair.proxy._judged, []

        def failing_once(verdict):
            windows.append(verdict)
            if len(windows) == 1:
                raise RuntimeError("a probe that failed")
            judged(verdict)
        pair.proxy._judged = failing_once
        for _ in range(40):
            await asyncio.sleep(contention.WINDOW_S / 2)
            if len(windows) >= 3:
                break
        assert len(windows) >= 3
        assert "a probe that failed" in caplog.text
    with caplog.at_level("WARNING"):
        asyncio.run(with_pair(replace(DEFAULT, on_node_plaintext=False), scenario))


# Straight to pod B's mesh port, as anyone who can reach a pod can: a byte of a ClientHello, then close.
BYTE_AND_CLOSE = """
import socket
for _ in range({count}):
    with socket.create_connection(({ip!r}, {port}), timeout=5) as s:
        s.sendall(b"\\x16")
"""


def test_connections_gone_before_their_handshake_spend_none_of_the_pods_rate():
    """'Send a byte, close' cost the attacker nothing and spent pod B's inbound-handshake-rate,
    so real clients of pod B were refused."""
    from nodeagent.ports import MESH_PORT

    async def scenario(pair):
        done = await pair.run_in_a_async([sys.executable, "-c", BYTE_AND_CLOSE.format(ip=B_IP, port=MESH_PORT,
                                                                                        count=BURST)], timeout=60)
        assert done.returncode == 0, done.stderr
        await settled(pair, "pod-b")
        assert refused(pair, "inbound", "pod-b") == 0
        got = await burst(pair)  # real clients: the whole rate is still theirs
        assert got["ok"] >= RATE + 1, got
    settings = replace(DEFAULT, on_node_plaintext=False)
    asyncio.run(with_pair(settings, scenario, {"limits.nodeagent.io/inbound-handshake-rate": str(RATE)}))


# Connections straight to pod B's mesh port, each with a whole ClientHello, then stalled.
STALLED_HELLOS = """
import socket, ssl, sys
context = ssl.create_default_context()
held = []
for _ in range({count}):
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    try:
        context.wrap_bio(incoming, outgoing, server_hostname="x").do_handshake()
    except ssl.SSLWantReadError:
        pass
    s = socket.create_connection(({ip!r}, {port}), timeout=5)
    s.sendall(outgoing.read())
    held.append(s)
print("held", flush=True)
sys.stdin.readline()
"""


def test_one_client_address_holds_at_most_a_quarter_of_a_pods_handshakes():
    """A whole ClientHello, then nothing: each such connection held one of the pod's
    inbound-handshakes until the handshake deadline (10 s), so a few a second from one pod kept
    every real mesh client of the pod out. One address now holds a quarter of them at most."""
    import subprocess
    from nodeagent.ports import MESH_PORT

    limit = 8  # pod B's inbound-handshakes: a share of 2 per client address

    async def scenario(pair):
        argv = ["ip", "netns", "exec", pair.names[0], sys.executable, "-c",
                STALLED_HELLOS.format(ip=B_IP, port=MESH_PORT, count=3)]
        holder = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert (await asyncio.to_thread(holder.stdout.readline)).strip() == "held"
            await asyncio.sleep(0.3)
            assert sample(pair, "limit_exceeded_total", direction="inbound", namespace=NAMESPACE, pod="pod-b",
                          limit="inbound-handshakes-per-client") == 1
            assert pair.pods["pod-b"].handshakes_by_source.held(A_IP) == 2
        finally:
            holder.kill()
            holder.wait()
        await settled(pair, "pod-b")
        assert len(pair.pods["pod-b"].handshakes_by_source) == 0  # every hold given back
        _, port = pair.aim("echo")  # the same address's real clients are served again, within its share
        done = await pair.run_in_a_async(client(port, 2), timeout=60)
        assert json.loads(done.stdout)["ok"] == 2, done.stdout
    settings = replace(DEFAULT, on_node_plaintext=False)
    asyncio.run(with_pair(settings, scenario, {"limits.nodeagent.io/inbound-handshakes": str(limit)}))


# The burst, then, as soon as one of its connections is refused, one silent connection: how long
# until the proxy ends it (it sends nothing, so only a refusal at accept ends it before the
# 10 s detection timeout).
SILENT_AFTER_A_REFUSAL = CLIENT.replace("print(json.dumps(", """while results.count(False) == 0 and any(t.is_alive() for t in threads):
    time.sleep(0.001)
silent = socket.create_connection(("127.0.0.1", {port}), timeout=5)
opened = time.monotonic()
try:
    ended = silent.recv(1) == b""
except ConnectionResetError:
    ended = True
except socket.timeout:
    ended = False
silent_s = time.monotonic() - opened
print(json.dumps({{"silent_ended": ended, "silent_s": silent_s}})); raise SystemExit
print(json.dumps(""").replace("for t in threads: t.join()\n", "")


def test_over_its_rate_a_pods_next_connections_are_refused_at_accept_before_detection():
    """While the pod's queue of turns is full, a new connection is reset before a byte of it is read
    (refusal.py), counted like the others; a silent one would otherwise sit in detection for 10 s."""
    async def scenario(pair):
        _, port = pair.aim("echo")
        script = SILENT_AFTER_A_REFUSAL.format(port=port, count=BURST, seconds=0, interval=0)
        done = await pair.run_in_a_async([sys.executable, "-c", script], timeout=60)
        assert done.returncode == 0, done.stderr
        got = json.loads(done.stdout)
        assert got["silent_ended"] and got["silent_s"] < pair.proxy.timeouts.detect_s / 2, got
        # and the kernel was told to refuse pod A's connects meanwhile (its window, from now on)
        assert pair.datapath.refusals and {cookie for cookie, _ in pair.datapath.refusals} == {pair.pods["pod-a"].cookie}
        await settled(pair, "pod-a")
        refusals = refused(pair, "outbound", "pod-a")
        assert refusals >= 2  # one of the burst, and the silent connection
        assert sample(pair, "tcp_errors_total", direction="outbound", namespace=NAMESPACE, pod="pod-a",
                      reason="handshake-rate limit") == refusals
    asyncio.run(with_pair(MESH, scenario))


def test_over_its_inbound_rate_a_pods_next_mesh_connections_are_refused_before_their_client_hello():
    """Pod B over its inbound-handshake-rate: a new connection to its mesh port is reset at once
    (refusal.py), not held for the ClientHello deadline (2 s) and refused at its turn."""
    from nodeagent.ports import MESH_PORT

    async def scenario(pair):
        _, port = pair.aim("echo")
        script = SILENT_AFTER_A_REFUSAL.format(port=port, count=BURST, seconds=0, interval=0).replace(
            f'silent = socket.create_connection(("127.0.0.1", {port})',
            f"silent = socket.create_connection(({B_IP!r}, {MESH_PORT})")
        assert script.count(f"{B_IP!r}, {MESH_PORT}") == 1  # the silent connection only: straight to B's mesh port
        done = await pair.run_in_a_async([sys.executable, "-c", script], timeout=60)
        assert done.returncode == 0, done.stderr
        got = json.loads(done.stdout)
        assert got["silent_ended"] and got["silent_s"] < pair.proxy.timeouts.client_hello_s / 2, got
        await settled(pair, "pod-b")
        assert refused(pair, "inbound", "pod-b") >= 2  # one of the burst, and the silent connection
        assert refused(pair, "outbound", "pod-a") == 0
    settings = replace(DEFAULT, on_node_plaintext=False)
    asyncio.run(with_pair(settings, scenario, {"limits.nodeagent.io/inbound-handshake-rate": str(RATE)}))


def test_a_burst_of_new_mesh_connections_past_its_handshakes_in_progress_waits_its_turn():
    """A client that opens more connections at once than its `handshakes` (a pool filling up at
    start) had the rest refused: they wait in turn for a handshake to end (limits.QUEUED_PER_UNIT
    x the limit may wait)."""
    settings = replace(DEFAULT, on_node_plaintext=False, pod_limits=limits.parse("handshakes=3"))

    async def scenario(pair):
        got = await burst(pair)  # 12 at once: 3 in progress, 9 waiting (12 may)
        assert got == {**got, "ok": BURST, "failed": 0}, got
        assert sample(pair, "limit_exceeded_total", direction="outbound", namespace=NAMESPACE, pod="pod-a",
                      limit="handshakes") == 0
        assert pair.pods["pod-a"].quota.held[limits.Limit.HANDSHAKES] == 0
        assert not pair.pods["pod-a"].quota.queued[limits.Limit.HANDSHAKES]
        await settled(pair, "pod-a")
    asyncio.run(with_pair(settings, scenario))


def test_a_waiter_cancelled_or_timed_out_holds_no_slot_and_a_cancellation_is_not_swallowed():
    """upstream._handshake_slot on a real loop: a connect cancelled while it waits (its client
    left) or whose wait times out gives up its place; one granted as it was cancelled passes the
    slot on; the cancellation reaches the caller (asyncio.wait_for on 3.11 would swallow it)."""
    from nodeagent.proxy.upstream import HandshakeLimit, _handshake_slot
    HANDSHAKES = limits.Limit.HANDSHAKES

    async def scenario():
        loop = asyncio.get_running_loop()
        quota = limits.Quota(limits.parse("handshakes=1"))
        await _handshake_slot(quota, loop, 1.0)  # the one slot, held
        cancelled = loop.create_task(_handshake_slot(quota, loop, 5.0))
        granted_as_cancelled = loop.create_task(_handshake_slot(quota, loop, 5.0))
        last = loop.create_task(_handshake_slot(quota, loop, 5.0))
        await asyncio.sleep(0)
        assert len(quota.queued[HANDSHAKES]) == 3
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        quota.give(HANDSHAKES)  # to the second waiter; it is cancelled in the same turn
        granted_as_cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await granted_as_cancelled
        await last  # the slot was passed on
        assert quota.held[HANDSHAKES] == 1 and not quota.queued[HANDSHAKES]
        with pytest.raises(HandshakeLimit) as refused:
            await _handshake_slot(quota, loop, 0.05)
        assert not refused.value.retryable and not quota.queued[HANDSHAKES] and quota.held[HANDSHAKES] == 1
        quota.give(HANDSHAKES)
        assert quota.held[HANDSHAKES] == 0
    asyncio.run(scenario())
