"""The agent's admin and metrics listeners on real loopback sockets: what each serves, and the
bounds an attacker runs into (URL, head, slow heads, connections, tap subscribers, slow readers).
The agent behind them is a stand-in with a real tap hub; tests/test_admin_lab.py runs the real one."""

import asyncio
import json
import socket
import types

import pytest
import uvloop
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, Counter

from nodeagent.agent import admin
from nodeagent.agent.admin import Limits, require_loopback, serve_admin, serve_metrics
from nodeagent.cli import main
from nodeagent.proxy import tap
from nodeagent.proxy.tap import TapHub


class StandInAgent:
    """What the listeners ask of the agent: readiness, the proxy's tap hub, status and metrics."""

    def __init__(self):
        self.ready = True
        self.proxy = types.SimpleNamespace(tap=TapHub())
        self.registry = CollectorRegistry()
        Counter("request", "requests", registry=self.registry).inc()

    async def status(self) -> dict:
        return {"node": "node0"}

    async def metrics_registry(self):
        return self.registry


async def request(port: int, raw: bytes, read_timeout_s: float = 5.0) -> bytes:
    """Send `raw` and read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    try:
        return await asyncio.wait_for(reader.read(), read_timeout_s)
    finally:
        writer.close()


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: agent\r\n\r\n".encode()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def run(scenario, limits: Limits | None = None, private: bool = True, agent=None):
    """Run `scenario(port, listener, agent)` against a listener on 127.0.0.1, on uvloop as the agent does."""
    agent = agent or StandInAgent()

    async def main_():
        serve = serve_admin if private else serve_metrics
        server, listener = await serve(agent, "127.0.0.1", 0, *([limits] if limits else []))
        try:
            return await scenario(server.sockets[0].getsockname()[1], listener, agent)
        finally:
            server.close()

    return uvloop.run(main_())


def test_the_metrics_listener_serves_prometheus_and_probes_and_nothing_else():
    async def scenario(port, listener, agent):
        return {path: await request(port, get(path)) for path in ("/metrics", "/live", "/ready", "/stats",
                                                                  "/tap?max=1", "/tap")}

    answers = run(scenario, private=False)
    assert {path: status_of(a) for path, a in answers.items()} == {
        "/metrics": 200, "/live": 200, "/ready": 200, "/stats": 404, "/tap?max=1": 404, "/tap": 404}
    assert b"request_total 1.0" in answers["/metrics"]


def test_the_admin_listener_serves_everything():
    async def scenario(port, listener, agent):
        stats = await request(port, get("/stats"))
        tap_answer = await request(port, get("/tap?max=1&seconds=0.2"))
        return stats, tap_answer, await request(port, get("/metrics"))

    stats, tap_answer, metrics = run(scenario)
    assert status_of(stats) == 200 and json.loads(stats.split(b"\r\n\r\n", 1)[1]) == {"node": "node0"}
    assert status_of(tap_answer) == 200 and tap_answer.endswith(b"0\r\n\r\n")  # no event in its 0.2 s
    assert status_of(metrics) == 200


@pytest.mark.parametrize("host", ["0.0.0.0", "10.244.0.5", "::", "agent.example"])
def test_the_admin_listener_refuses_any_address_but_loopback(host):
    with pytest.raises(ValueError, match="loopback"):
        require_loopback(host)
    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(serve_admin(StandInAgent(), host, 0))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_addresses_are_accepted(host):
    require_loopback(host)


def test_run_refuses_a_non_loopback_admin_address_and_names_metrics(tmp_path):
    done = CliRunner().invoke(main, ["run", "--node-name", "n", "--cluster-dir", str(tmp_path), "--identity-dir",
                                     str(tmp_path), "--admin", "0.0.0.0:4191"])
    assert done.exit_code == 2 and "loopback" in done.output and "--metrics" in done.output


def test_a_long_url_gets_414_after_at_most_max_url_bytes():
    limits = Limits(max_url_bytes=1024, error_linger_s=0.1)

    async def scenario(port, listener, agent):
        answer = await request(port, b"GET /" + b"a" * 4096 + b" HTTP/1.1\r\n\r\n")
        await asyncio.sleep(0.2)  # the server reads nothing after an error: it closes after error_linger_s
        return answer, listener.report()

    answer, report = run(scenario, limits)
    assert status_of(answer) == 414
    assert report["errors"] == {"414": 1} and report["open"] == 0


def test_a_url_streamed_without_end_is_cut_off_with_414():
    """The 200 MiB URL of the issue, in small: up to 64 MiB sent; the server stops reading at its
    limit and answers; the sender is cut off long before the end (agent RSS: test_admin_lab.py)."""

    def send_url(port: int) -> tuple[int, bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sent, chunk = 0, b"GET /" + b"a" * 65536
            try:
                while sent < 64 * 2**20:
                    sent += sock.send(chunk)
            except OSError:  # reset by the server, after its linger
                pass
            try:
                return sent, sock.recv(4096)
            except OSError:
                return sent, b""

    async def scenario(port, listener, agent):
        sent, answer = await asyncio.to_thread(send_url, port)
        return sent, answer, listener.report()

    sent, answer, report = run(scenario)
    assert sent < 16 * 2**20  # refused, not read to the end
    assert report["errors"] == {"414": 1}
    assert answer == b"" or status_of(answer) == 414


def test_a_long_head_gets_431():
    limits = Limits(max_head_bytes=2048)

    async def scenario(port, listener, agent):
        headers = b"".join(b"x-filler-%d: %s\r\n" % (i, b"v" * 100) for i in range(40))
        return await request(port, b"GET /live HTTP/1.1\r\n" + headers + b"\r\n")

    assert status_of(run(scenario, limits)) == 431


def test_a_head_sent_too_slowly_gets_408_at_the_head_timeout():
    limits = Limits(head_timeout_s=0.3)

    async def scenario(port, listener, agent):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        # Slowloris: a byte at a time, never finishing the head.
        async def dribble():
            for byte in b"GET /live HTTP/1.1\r\nx-slow: " + b"z" * 100:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.05)
        dribbler = asyncio.create_task(dribble())
        answer = await asyncio.wait_for(reader.read(), 5)
        dribbler.cancel()
        writer.close()
        return answer, loop.time() - started, listener.report()

    answer, took, report = run(scenario, limits)
    assert status_of(answer) == 408 and took < 2
    assert report["errors"] == {"408": 1}


def test_connections_over_the_cap_get_503_at_once_and_freed_slots_serve_again():
    limits = Limits(max_connections=4, head_timeout_s=0.5, error_linger_s=0.1)

    async def scenario(port, listener, agent):
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        await asyncio.sleep(0.05)
        over = await request(port, get("/live"), read_timeout_s=1)
        full = listener.report()
        for reader, writer in idle:  # the idle ones are answered 408 at their head timeout
            assert status_of(await asyncio.wait_for(reader.read(), 2)) == 408
            writer.close()
        await asyncio.sleep(0.2)  # closed after error_linger_s
        after = await request(port, get("/live"))
        await asyncio.sleep(0.05)
        return over, full, after, listener.report()

    over, full, after, report = run(scenario, limits)
    assert status_of(over) == 503 and full["open"] == 4 and full["refused"] == 1
    assert status_of(after) == 200 and report["open"] == 0


def test_one_peer_cannot_take_every_metrics_slot():
    limits = Limits(max_connections=10, max_connections_per_peer=2)

    async def scenario(port, listener, agent):
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await asyncio.sleep(0.05)
        third = await request(port, get("/live"), read_timeout_s=1)
        for _, writer in held:
            writer.close()
        return third, listener.report()

    third, report = run(scenario, limits, private=False)
    assert status_of(third) == 503 and report["refused"] == 1


def test_tap_subscribers_beyond_the_cap_get_503():
    async def scenario(port, listener, agent):
        taps = []
        for _ in range(tap.MAX_SUBSCRIBERS):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(get("/tap?seconds=10"))
            assert status_of(await reader.readuntil(b"\r\n\r\n")) == 200
            taps.append((reader, writer))
        refused = await request(port, get("/tap?seconds=10"))
        taps.pop()[1].close()
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(get("/tap?seconds=10"))
        again = await reader.readuntil(b"\r\n\r\n")
        writer.close()
        for _, w in taps:
            w.close()
        return refused, again

    refused, again = run(scenario)
    assert status_of(refused) == 503 and b"taps already listen" in refused
    assert status_of(again) == 200


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def test_a_tap_reader_that_stops_reading_costs_dropped_events_not_memory():
    """30,000 events of ~2 KiB, published at a pace the tap keeps up with, for a reader that
    reads nothing: without backpressure ~60 MiB would wait in the listener's buffer; here the
    tap stops taking events at the write buffer's high-water mark, the subscription's bounded
    queue fills, and the rest is dropped, counted."""
    path = "/x" * 1000

    async def scenario(port, listener, agent):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(get("/tap?seconds=60"))
        hub = agent.proxy.tap
        while not hub.subscriptions:
            await asyncio.sleep(0.01)
        before = rss_bytes()
        event = {"namespace": "default", "pod": "p", "destination": "svc/default/http", "method": "GET",
                 "path": path, "status": 200, "authority": "http", "latency_ms": 1.0, "ts": 0.0, "tls": True}
        for i in range(30_000):
            hub.publish(lambda: dict(event, n=i))
            if i % 50 == 0:
                await asyncio.sleep(0.001)  # the tap task takes what it may
        grown = rss_bytes() - before
        dropped = hub.dropped
        # The reader starts reading: it gets whole, ordered lines.
        sock.setblocking(False)
        received = b""
        for _ in range(100):
            try:
                received += sock.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.01)
        sock.close()
        return grown, dropped, received

    grown, dropped, received = run(scenario)
    assert grown < 20 * 2**20, f"grew by {grown / 2**20:.1f} MiB"
    assert dropped > 20_000
    lines = [json.loads(line) for line in received.split(b"\r\n")[:-1] if line.startswith(b"{")]  # [-1]: cut
    numbers = [line["n"] for line in lines]
    assert numbers and numbers == sorted(numbers)


# --- what tap may show ---


@pytest.mark.parametrize("target, shown", [
    (b"/reset?token=secret", "/reset"),
    (b"/a/b#frag?x", "/a/b"),
    (b"/only", "/only"),
    (b"http://user:secret@example.com/p?q=secret", "/p"),
    (b"http://example.com", "/"),
    (b"*", "*"),
    (b"/a://b?c", "/a://b"),
])
def test_tap_shows_a_path_without_query_fragment_or_userinfo(target, shown):
    assert tap.shown_path(target) == shown


def test_a_tap_event_carries_no_query_header_value_or_body():
    from nodeagent.proxy.http1 import Request

    request = Request(method="POST", url=bytearray(b"/reset?token=secret"), started=0.0,
                      headers=[(b"Host", b"user:secret@http.default"), (b"Authorization", b"Bearer secret"),
                               (b"Cookie", b"session=secret"), (b"X-Reset-Token", b"secret")])
    pod = types.SimpleNamespace(info=types.SimpleNamespace(namespace="default", name="client"))
    event = tap.request_event("outbound", pod, "svc/default/http", request, 200, True)
    assert "secret" not in json.dumps(event)
    assert (event["path"], event["authority"], event["method"]) == ("/reset", "http.default", "POST")
    assert set(event) == {"ts", "direction", "namespace", "pod", "destination", "authority", "method", "path",
                          "status", "latency_ms", "tls"}


def test_long_paths_are_cut_in_tap_events():
    assert len(tap.shown_path(b"/" + b"a" * 100_000)) == tap.MAX_FIELD_CHARS


def test_the_hub_refuses_subscribers_beyond_its_cap():
    hub = TapHub()
    subscriptions = [hub.subscribe({}) for _ in range(tap.MAX_SUBSCRIBERS)]
    with pytest.raises(tap.TapFull):
        hub.subscribe({})
    hub.unsubscribe(subscriptions[0])
    hub.subscribe({})


def test_limits_are_named_in_architecture_md():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "ARCHITECTURE.md").read_text()
    for name in ("max_url_bytes", "max_head_bytes", "head_timeout_s", "answer_timeout_s", "max_connections",
                 "max_connections_per_peer", "write_high_water", "MAX_SUBSCRIBERS", "QUEUE_SIZE",
                 "MAX_FIELD_CHARS", "MAX_FORWARD_PENDING"):
        assert name in text, name
    assert admin.ADMIN_LIMITS.max_url_bytes == 8 * 1024


# --- tap events forwarded by worker processes ---


class Recording:
    """The channel endpoint's `post`, recorded."""

    def __init__(self):
        self.posted = []

    def post(self, message, fds=()):
        self.posted.append(message)


def test_a_worker_forwards_one_batch_at_a_time_and_drops_beyond_its_bound():
    from nodeagent.agent.worker import MAX_FORWARD_PENDING, TapForward

    hub, endpoint = TapHub(), Recording()
    forward = TapForward(endpoint, hub, generation=1)
    hub.subscriptions.append(forward)
    for i in range(5000):  # the agent does not acknowledge meanwhile
        hub.publish(lambda: {"n": i})
    assert endpoint.posted == [("events", 1, [{"n": 0}], 0)]
    assert len(forward.pending) == MAX_FORWARD_PENDING and hub.dropped == 5000 - 1 - MAX_FORWARD_PENDING
    forward.acknowledged()
    _, generation, batch, dropped = endpoint.posted[1]
    assert [e["n"] for e in batch] == list(range(1, 1 + MAX_FORWARD_PENDING)) and dropped == hub.dropped
    forward.acknowledged()
    assert len(endpoint.posted) == 2  # nothing more to send


def test_the_agent_publishes_a_workers_batch_acknowledges_it_and_counts_its_drops():
    from nodeagent.agent.workers import Workers
    from nodeagent.settings import DEFAULT

    async def scenario():
        hub = TapHub()
        workers = Workers(0, DEFAULT, hub)
        subscription = hub.subscribe({})
        process = types.SimpleNamespace(index=1, tap_dropped=0, endpoint=Recording())
        workers._handle(process, ("events", 7, [{"n": 1}, {"n": 2}], 40))
        workers._handle(process, ("events", 7, [{"n": 3}], 45))
        events = [subscription.queue.get_nowait()["n"] for _ in range(3)]
        return events, hub.dropped, process.endpoint.posted

    events, dropped, acks = asyncio.run(scenario())
    assert events == [1, 2, 3] and dropped == 45 and acks == [("tap-ack", 7), ("tap-ack", 7)]


def test_a_pipelined_second_request_is_not_served_and_a_bad_one_gets_400():
    async def scenario(port, listener, agent):
        pipelined = await request(port, get("/live") + b"GET /" + b"x" * 20000 + b" HTTP/1.1\r\n\r\n")
        garbage = await request(port, b"\x16\x03\x01 not http\r\n\r\n")
        return pipelined, garbage

    pipelined, garbage = run(scenario)
    assert pipelined.count(b"HTTP/1.1") == 1 and status_of(pipelined) == 200
    assert status_of(garbage) == 400


def test_the_admin_listener_reports_memory_and_the_metrics_listener_does_not():
    class Reporting(StandInAgent):
        async def memory_report(self, trim: bool = False) -> dict:
            return {"processes": [{"pid": 1}], "trimmed": trim}

    async def scenario(port, listener, agent):
        return await request(port, get("/debug/memory")), await request(port, get("/debug/memory?trim=1"))

    plain, trimmed = run(scenario, agent=Reporting())
    assert status_of(plain) == 200 and json.loads(plain.split(b"\r\n\r\n", 1)[1])["trimmed"] is False
    assert json.loads(trimmed.split(b"\r\n\r\n", 1)[1])["trimmed"] is True

    async def public(port, listener, agent):
        return await request(port, get("/debug/memory"))

    assert status_of(run(public, private=False, agent=Reporting())) == 404
