"""The HTTP/2 proxy layer on loopback: real sockets, the real sample h2c server, fixed
endpoints in place of the mesh's routing (the lab tests are in test_proxy.py and
test_protocols_lab.py)."""

import asyncio
import hashlib
import logging
import os
import socket
import threading
import time

import h2.errors
import h2.exceptions
import h2.events
import pytest

from h2_client import H2Client
from nodeagent.lab import workloads
from nodeagent.lab.workloads import SERVERS
from nodeagent.proxy import h2exchange, h2peer, http2
from nodeagent.proxy.budget import RetryBudget
from nodeagent.proxy.context import Observers
from nodeagent.proxy.metrics import Metrics
from nodeagent.proxy.limits import Limit
from nodeagent.proxy.problems import ProblemLog
from nodeagent.proxy.retry import Retries, Verdict
from nodeagent.proxy.tap import TapHub
from nodeagent.cluster.model import ClusterView
from nodeagent.proxy.telemetry import Telemetry
from nodeagent.settings import DEFAULT
from nodeagent.proxy.h2upstream import H2Pool

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class FixedTargets:
    """Requests go to the given addresses in turn (the untried first); records what the proxy reports."""

    def __init__(self, addresses, retry_statuses=(), retry_limit=1, request_timeout_s=None):
        self.addresses, self.pool = list(addresses), H2Pool()
        self.retry_limit, self.request_timeout_s = retry_limit, request_timeout_s
        self.budget = RetryBudget(time.monotonic)
        self.retry_statuses = set(retry_statuses)
        self.errors, self.statuses, self.finished, self.chosen, self.failures = [], [], [], [], []
        self.floods = []
        self.abandoned = self.connect_failures = self.retried = self.streams = 0
        metrics, problems = Metrics(), ProblemLog(logging.getLogger("test"))
        self.observers = Observers(metrics, TapHub(), problems, Telemetry(DEFAULT, metrics, problems, lambda: ClusterView([])))

    def retries(self, facts, request):
        self.budget.deposit()
        return Retries(facts, self.retry_limit, frozenset(self.retry_statuses), self.budget, self._verdict)

    def _verdict(self, verdict):
        self.retried += verdict is Verdict.RETRY

    def choose(self, tried):
        if not self.addresses:
            return "no endpoints"
        address = next((a for a in self.addresses if a not in tried), self.addresses[0])
        self.chosen.append(address)
        return "state", address

    def pooled_h2(self, address):
        return self.pool.ready(0, address)

    async def acquire_h2(self, address):
        return await self.pool.acquire(None, 0, address, 1.0, report=self.count_http2_refusal)

    def count_http2_refusal(self, flood):
        self.floods.append(flood)

    def connect_failed(self, state, exc):
        self.connect_failures += 1

    @staticmethod
    def connect_failure_reason(exc):
        return "connect failed"

    stream_limit = Limit.HTTP2_STREAMS

    def take_stream(self):
        self.streams += 1
        return True

    def give_stream(self):
        self.streams -= 1

    def count_limit(self, limit):
        self.errors.append((None, limit))

    def count_cut(self, reason):
        self.errors.append((None, reason))

    def sending(self, request, address):
        pass

    def request_started(self, state, address):
        return time.monotonic()

    def request_finished(self, state, token, status, grpc_status=None):
        self.finished.append((status, grpc_status))

    def request_abandoned(self, state, token):
        self.abandoned += 1

    def count_response(self, request, status, address=None, failure=None):
        self.statuses.append(status)
        self.failures.append(failure)

    def count_error(self, status, reason):
        self.errors.append((status, reason))


class LoopThread:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers = []

    def run(self, coroutine, timeout=5):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self):
        async def shut():
            for server in self.servers:
                server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.run(shut())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def lt():
    loop_thread = LoopThread()
    yield loop_thread
    loop_thread.stop()


def start_app(lt, pod="pod-a", factory=None):
    """A sample h2c server, or one made by `factory` (a subclass that misbehaves)."""
    async def listen():
        app = await lt.loop.create_server(lambda: (factory or SERVERS["h2c"])(pod), "127.0.0.1", 0)
        lt.servers.append(app)
        return app.sockets[0].getsockname()
    return lt.run(listen())


def start_proxy(lt, addresses, **options):
    """(port, target, the Http2Server of each connection accepted)."""
    target = FixedTargets(addresses, **options)
    accepted = []

    def make():
        accepted.append(http2.Http2Server(target))
        return accepted[-1]

    async def listen():
        proxy = await lt.loop.create_server(make, "127.0.0.1", 0)
        lt.servers.append(proxy)
        return proxy.sockets[0].getsockname()[1]
    return lt.run(listen()), target, accepted


def frames(data: bytes):
    """(type, stream id, payload) of each HTTP/2 frame in `data`."""
    at = 0
    while at + 9 <= len(data):
        length = int.from_bytes(data[at:at + 3], "big")
        yield data[at + 3], int.from_bytes(data[at + 5:at + 9], "big") & 0x7FFFFFFF, data[at + 9:at + 9 + length]
        at += 9 + length


@pytest.fixture
def behave(monkeypatch):
    """Make the sample servers (one BEHAVIOUR per process) answer differently for a test."""
    behaviour = workloads.Behaviour()
    monkeypatch.setattr(workloads, "BEHAVIOUR", behaviour)
    return behaviour


def test_many_concurrent_requests_on_one_connection(lt):
    port, target, _ = start_proxy(lt, [start_app(lt)])
    client = H2Client("127.0.0.1", port)
    streams = [client.request("GET", f"/bytes/{n}") for n in range(1, 101)]
    responses = client.wait(*streams)
    assert [len(r.body) for r in responses] == list(range(1, 101))
    deadline = time.monotonic() + 5  # a stream is counted after its last frame went to the client
    while len(target.finished) < 100 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert {r.status for r in responses} == {200} and target.statuses == [200] * 100
    assert target.finished == [(200, None)] * 100
    client.close()


def test_a_request_on_a_pooled_connection_needs_no_task(lt, monkeypatch):
    """Only the first request, which waits for the pooled connection to open, goes on in a
    task; the others are driven by the codecs' events alone (h2exchange.py)."""
    in_task = []
    original = h2exchange.Exchange._continue_in_task

    def continue_in_task(exchange, tried, first):
        in_task.append(exchange.client.id)
        original(exchange, tried, first)
    monkeypatch.setattr(h2exchange.Exchange, "_continue_in_task", continue_in_task)
    port, target, accepted = start_proxy(lt, [start_app(lt)])
    client = H2Client("127.0.0.1", port)
    client.wait(client.request("GET", "/bytes/1"))
    responses = client.wait(*[client.request("GET", "/bytes/2") for _ in range(20)])
    assert [r.body for r in responses] == [b"xx"] * 20 and in_task == [1]
    deadline = time.monotonic() + 5
    while (accepted[0].exchanges or len(target.finished) < 21) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not accepted[0].exchanges and target.finished == [(200, None)] * 21 and target.streams == 0
    client.close()


def test_large_bodies_both_ways_under_flow_control(lt):
    """Bodies far beyond every window, both ways, on concurrent streams: byte-exact."""
    port, _, _ = start_proxy(lt, [start_app(lt)])
    client = H2Client("127.0.0.1", port, timeout=30)
    upload = os.urandom(8 * 1024 * 1024)
    echo = client.request("POST", "/", body=upload)
    downloads = [client.request("GET", f"/bytes/{20 * 1024 * 1024}") for _ in range(2)]
    responses = client.wait(echo, *downloads)
    assert hashlib.sha256(responses[0].body).digest() == hashlib.sha256(upload).digest()
    assert [len(r.body) for r in responses[1:]] == [20 * 1024 * 1024] * 2
    client.close()


def test_a_receiver_that_stops_reading_holds_the_proxy_to_its_windows(lt):
    """The client reads nothing of a 64 MiB response: the proxy must not gather it."""
    port, _, accepted = start_proxy(lt, [start_app(lt)])
    client = H2Client("127.0.0.1", port)
    client.request("GET", f"/bytes/{64 * 1024 * 1024}")
    client.wait(1, headers_only=True)
    time.sleep(1.0)

    async def held() -> int:
        """Bytes the proxy holds for this response: waiting in its Forwards and its transports."""
        total = 0
        for exchange in accepted[0].exchanges.values():
            for end in (exchange.client, exchange.upstream):
                total += sum(len(entry[0]) for entry in end.incoming.pending)
                total += end.peer.transport.get_write_buffer_size()
        return total
    # The client's stream window is 64 KiB and the proxy's toward the server 256 KiB: the
    # server is acknowledged only what was passed on, so the rest of the 64 MiB stays with it.
    assert lt.run(held()) < 1024 * 1024
    client.close()


def test_trailers_pass_through(lt):
    port, target, _ = start_proxy(lt, [start_app(lt)])
    client = H2Client("127.0.0.1", port)
    (response,) = client.wait(client.request("GET", "/bytes/5", headers=[("te", "trailers")]))
    assert response.body == b"xxxxx" and response.trailers == {b"x-body-bytes": b"5"}
    client.close()


def test_each_request_is_balanced_on_its_own(lt):
    port, target, _ = start_proxy(lt, [start_app(lt, "pod-a"), start_app(lt, "pod-b")])
    # FixedTargets picks the first untried address; alternate by making the list rotate.
    seen = set()
    client = H2Client("127.0.0.1", port)
    for _ in range(4):
        target.addresses.reverse()
        (response,) = client.wait(client.request("GET", "/"))
        seen.add(response.headers[b"x-pod"])
    assert seen == {b"pod-a", b"pod-b"}
    assert len(target.pool._conns) == 2  # one pooled connection per endpoint, reused
    client.close()


def test_statuses_configured_for_retry_are_retried_within_the_limit(lt, behave):
    port, target, _ = start_proxy(lt, [start_app(lt, "pod-a"), start_app(lt, "pod-b")], retry_statuses={503})
    behave.status = 503
    client = H2Client("127.0.0.1", port)
    (get,) = client.wait(client.request("GET", "/"))
    (post,) = client.wait(client.request("POST", "/", body=b"not safe to repeat"))
    assert get.status == 503 and post.status == 503
    assert target.retried == 1 and len(target.chosen) == 3  # the GET twice, the POST once
    # Both pooled connections are open now: this GET starts without a task, its retry goes on in one.
    (get,) = client.wait(client.request("GET", "/"))
    assert get.status == 503 and target.retried == 2
    assert target.chosen[3:] == [target.addresses[0], target.addresses[1]]  # the retry to the untried one
    client.close()


def test_a_refused_connection_is_retried_then_a_502_with_the_reason(lt):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead = closed.getsockname()
    closed.close()
    port, target, _ = start_proxy(lt, [dead, start_app(lt)])
    client = H2Client("127.0.0.1", port)
    (response,) = client.wait(client.request("POST", "/", body=b"replayed"))
    assert response.status == 200 and response.body == b"replayed"
    assert target.connect_failures == 1 and target.retried == 1
    target.addresses = [dead]
    (response,) = client.wait(client.request("GET", "/"))
    assert response.status == 502
    assert response.headers[b"nodeagent-proxy-error"] == b"connect failed"
    target.addresses = []
    (response,) = client.wait(client.request("GET", "/"))
    assert (response.status, response.headers[b"nodeagent-proxy-error"]) == (503, b"no endpoints")
    client.close()


def test_a_request_timeout_is_a_504_and_the_connection_serves_on(lt, behave):
    port, target, _ = start_proxy(lt, [start_app(lt)], request_timeout_s=0.2)
    client = H2Client("127.0.0.1", port)
    for _ in range(2):  # the first waits for the pooled connection (a task), the second not
        slow = client.request("GET", "/delay/2000")
        (response,) = client.wait(slow)
        assert (response.status, response.headers[b"nodeagent-proxy-error"]) == (504, b"request timeout")
        (response,) = client.wait(client.request("GET", "/"))
        assert response.status == 200
    client.close()


def test_a_client_reset_cancels_the_upstream_stream_and_not_the_connection(lt):
    port, target, _ = start_proxy(lt, [start_app(lt)])
    client = H2Client("127.0.0.1", port)
    for _ in range(2):  # the first waits for the pooled connection (a task), the second not
        big = client.request("GET", f"/bytes/{32 * 1024 * 1024}")
        client.wait(big, headers_only=True)
        client.reset(big)
        (response,) = client.wait(client.request("GET", "/bytes/10"))
        assert response.status == 200 and len(response.body) == 10
    client.close()


def test_malformed_http2_is_a_goaway_counted_and_the_next_connection_works(lt):
    port, target, _ = start_proxy(lt, [start_app(lt)])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        # A HEADERS frame on stream 0 is a connection error (PROTOCOL_ERROR).
        sock.sendall(H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + b"\x00\x00\x05\x01\x05\x00\x00\x00\x00hello")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    goaways = [payload for kind, _, payload in frames(reply) if kind == 7]
    assert [int.from_bytes(g[4:8], "big") for g in goaways] == [h2.errors.ErrorCodes.PROTOCOL_ERROR]
    assert target.errors and target.errors[0][0] == 400
    client = H2Client("127.0.0.1", port)
    (response,) = client.wait(client.request("GET", "/"))
    assert response.status == 200
    client.close()


def test_an_upstream_lost_mid_response_resets_the_clients_stream(lt):
    class Dies(workloads.H2cServer):
        """Sends its headers and part of the body, then the connection drops."""

        async def _respond(self, stream_id):
            self.streams.pop(stream_id)
            self.conn.send_headers(stream_id, [(":status", "200"), ("x-pod", self.pod)])
            self.conn.send_data(stream_id, b"partial")
            self.transport.write(self.conn.data_to_send())
            await asyncio.sleep(0.05)
            self.transport.abort()

    port, target, _ = start_proxy(lt, [start_app(lt, factory=Dies)])
    client = H2Client("127.0.0.1", port)
    (response,) = client.wait(client.request("GET", "/"))
    assert response.status == 200 and response.reset == h2.errors.ErrorCodes.INTERNAL_ERROR
    assert target.finished == [(None, None)]
    client.close()


def test_a_refused_stream_is_retried_even_for_a_post(lt):
    class Refuses(workloads.H2cServer):
        def data_received(self, data):
            events = self.conn.receive_data(data)
            for event in events:
                if isinstance(event, h2.events.RequestReceived):
                    self.conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            self.transport.write(self.conn.data_to_send())

    port, target, _ = start_proxy(lt, [start_app(lt, factory=Refuses), start_app(lt, "pod-b")])
    client = H2Client("127.0.0.1", port)
    (response,) = client.wait(client.request("POST", "/", body=b"x" * 1000))
    assert response.status == 200 and response.body == b"x" * 1000
    assert target.retried == 1
    client.close()


def test_forward_acknowledges_only_what_it_sent_and_replays_without_acknowledging_twice():
    """Forward with plain values: a recording source, and a destination whose codec pulls."""
    class Source:
        def __init__(self):
            self.acknowledged = self.replay_held = 0

        def acknowledge(self, size, stream_id):
            self.acknowledged += size

    class Destination:
        closed = False

        def __init__(self):
            self.bodies, self.wanted = {}, 0

        def want_body(self, stream_id):
            self.wanted += 1

    def pull(forward, length):
        """What a codec with `length` bytes of window takes, frame by frame (16 KiB at most)."""
        taken, ended = [], False
        while length > 0 and not ended:
            piece, ended, _ = forward.read(min(length, 16384))
            if piece is None:
                break
            taken.append(piece)
            length -= len(piece)
        return b"".join(taken), ended

    source = Source()
    forward = h2peer.Forward(source, 1, keep_for_replay=True)
    forward.push(b"a" * 10000, 10010)  # 10 bytes of padding
    first = Destination()
    forward.attach(first, 3)
    assert first.bodies == {3: forward} and first.wanted == 1
    assert pull(forward, 4000) == (b"a" * 4000, False) and source.acknowledged == 4000
    assert pull(forward, 100000) == (b"a" * 6000, False) and source.acknowledged == 10010
    assert forward.read(16384) == (None, False, None)  # nothing more yet: the codec defers
    forward.finish([(b"grpc-status", b"0")])
    assert forward.read(16384) == (b"", True, [(b"grpc-status", b"0")]) and forward.done
    forward.rewind()
    assert first.bodies == {}
    second = Destination()
    forward.attach(second, 5)
    assert pull(forward, 100000) == (b"a" * 10000, True) and source.acknowledged == 10010
    assert source.replay_held == 10000
    forward.forget_replay()
    assert source.replay_held == 0


class GrpcLike(workloads.H2cServer):
    """Answers like a gRPC server: /ok with grpc-status 0 in trailers, /down trailers-only 14."""

    async def _respond(self, stream_id):
        headers, _ = self.streams.pop(stream_id)
        if headers[b":path"] == b"/down":
            self.conn.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc"),
                                               ("grpc-status", "14")], end_stream=True)
        else:
            self.conn.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])
            self.conn.send_data(stream_id, b"\x00\x00\x00\x00\x02hi")
            self.conn.send_headers(stream_id, [("grpc-status", "0")], end_stream=True)
        self.transport.write(self.conn.data_to_send())


def test_grpc_statuses_classify_responses_in_trailers_and_trailers_only(lt):
    port, target, _ = start_proxy(lt, [start_app(lt, factory=GrpcLike)])
    client = H2Client("127.0.0.1", port)
    grpc = [("content-type", "application/grpc"), ("te", "trailers")]
    ok, down = client.wait(client.request("POST", "/ok", b"\x00\x00\x00\x00\x00", grpc),
                           client.request("POST", "/down", b"\x00\x00\x00\x00\x00", grpc))
    assert ok.trailers == {b"grpc-status": b"0"} and down.headers[b"grpc-status"] == b"14"
    assert sorted(zip(target.finished, target.failures)) == [((200, 0), False), ((200, 14), True)]
    client.close()


def test_an_endpoints_malformed_status_is_a_502_and_the_connection_serves_on(lt):
    class BadStatus(workloads.H2cServer):
        """Answers /bad with a :status that is not a number."""

        async def _respond(self, stream_id):
            headers = self.streams[stream_id][0]
            if headers[b":path"] == b"/bad":
                self.streams.pop(stream_id)
                self.conn.config.validate_outbound_headers = False
                self.conn.send_headers(stream_id, [(":status", "2xx")], end_stream=True)
                self.transport.write(self.conn.data_to_send())
            else:
                await workloads.H2cServer._respond(self, stream_id)

    port, target, _ = start_proxy(lt, [start_app(lt, factory=BadStatus)])
    client = H2Client("127.0.0.1", port)
    for _ in range(2):  # the first waits for the pooled connection (a task), the second not
        (bad,) = client.wait(client.request("GET", "/bad"))
        assert (bad.status, bad.headers[b"nodeagent-proxy-error"]) == (502, b"malformed response")
        (good,) = client.wait(client.request("GET", "/"))
        assert good.status == 200
    client.close()


def test_a_header_list_over_the_limit_ends_the_connection_and_is_counted(lt):
    port, target, _ = start_proxy(lt, [start_app(lt)])
    client = H2Client("127.0.0.1", port)
    client.request("GET", "/", headers=[("x-big", "a" * (h2peer.MAX_HEADER_LIST + 1))])
    with pytest.raises(ConnectionError):
        client.wait(1)
    assert client.goaway is not None and client.goaway.error_code != 0
    assert [status for status, _ in target.errors] == [400]
    client.close()
    client = H2Client("127.0.0.1", port)
    (response,) = client.wait(client.request("GET", "/", headers=[("x-fine", "a" * 1000)]))
    assert response.status == 200
    client.close()


def test_streams_reset_at_random_moments_leave_no_error_behind(lt):
    """Bounded churn: 8 connections x 40 streams of mixed sizes, a third reset by the client at
    once, after the headers, or mid-body; then every stream of a fresh connection is served
    and the event loop saw no exception escape."""
    import random

    errors = []
    lt.loop.call_soon_threadsafe(lt.loop.set_exception_handler, lambda loop, context: errors.append(context))
    port, target, accepted = start_proxy(lt, [start_app(lt)])
    rng = random.Random(7)
    for _ in range(8):
        client = H2Client("127.0.0.1", port, timeout=30)
        streams = []
        for _ in range(40):
            size = rng.choice([0, 10, 70000, 3 * 1024 * 1024])
            body = os.urandom(rng.choice([0, 0, 100, 300000]))
            streams.append(client.request("POST" if body else "GET", f"/bytes/{size}" if not body else "/", body))
        for stream in streams:
            if rng.random() < 0.33:
                moment = rng.choice(["now", "headers", "body"])
                if moment != "now":
                    client.wait(stream, headers_only=True)
                if moment == "body" and not client.responses[stream].ended:
                    client._read()
                if not client.responses[stream].ended:
                    client.reset(stream)
        client.wait(*streams)
        client.close()
    client = H2Client("127.0.0.1", port)
    responses = client.wait(*[client.request("GET", "/bytes/1000") for _ in range(20)])
    assert [(r.status, len(r.body)) for r in responses] == [(200, 1000)] * 20
    client.close()
    time.sleep(0.2)
    assert errors == [], errors[0].get("exception")
    assert all(not server.exchanges for server in accepted[:-1])  # nothing left in flight


def test_an_endpoint_that_stops_reading_holds_the_client_to_the_windows(lt):
    """The upload direction: the endpoint never acknowledges a 16 MiB request body."""
    class Deaf(workloads.H2cServer):
        def data_received(self, data):
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    self.streams[event.stream_id] = (dict(event.headers), bytearray())
            self.transport.write(self.conn.data_to_send())  # settings acks; never a WINDOW_UPDATE

    port, _, accepted = start_proxy(lt, [start_app(lt, factory=Deaf)])
    client = H2Client("127.0.0.1", port)
    upload = 16 * 1024 * 1024
    stream = client.request("POST", "/", body=b"u" * upload)
    deadline = time.monotonic() + 1.0
    client.sock.settimeout(0.1)
    while time.monotonic() < deadline:
        try:
            client._read()  # window updates, if the proxy sent any
        except TimeoutError:
            pass

    async def held() -> int:
        exchange = accepted[0].exchanges[stream]
        return sum(len(entry[0]) for entry in exchange.client.incoming.pending)
    sent = upload - len(client.uploads.get(stream, b""))
    # The endpoint took its default 64 KiB stream window; the proxy holds what its own window
    # toward the client let in, and no more arrives: the client is stopped at the windows.
    assert sent <= 65535 + h2peer.STREAM_WINDOW, sent
    assert lt.run(held()) <= h2peer.STREAM_WINDOW
    client.close()


def test_idle_connections_are_closed_both_sides(lt, monkeypatch):
    """The client's connection after idle_s with no stream (GOAWAY), and the pooled one to the
    endpoint after its own idle time (the next request opens a new one)."""
    from nodeagent.proxy.h2upstream import H2Upstream
    monkeypatch.setattr(http2.Http2Server, "idle_s", 0.5)
    monkeypatch.setattr(H2Upstream, "idle_s", 0.2)
    port, target, _ = start_proxy(lt, [start_app(lt)])
    client = H2Client("127.0.0.1", port)
    (response,) = client.wait(client.request("GET", "/"))
    assert response.status == 200
    (pooled,) = target.pool._conns[(0, target.addresses[0])]
    time.sleep(0.3)
    assert pooled.closed  # idle 0.2 s: closed, while the client's connection lives on
    (response,) = client.wait(client.request("GET", "/"))
    assert response.status == 200
    assert [c for c in target.pool._conns[(0, target.addresses[0])] if not c.closed] != [pooled]
    while not client.closed:
        client._read()  # nothing more comes but the GOAWAY after 0.5 s, then the close (or a timeout)
    assert client.goaway is not None and client.goaway.error_code == 0
    client.close()


def test_the_request_timeout_bounds_the_whole_exchange_not_only_the_head(lt):
    class Trickles(workloads.H2cServer):
        """Sends its headers at once, then one byte of body every 0.1 s for 10 s."""

        async def _respond(self, stream_id):
            self.streams.pop(stream_id)
            self.conn.send_headers(stream_id, [(":status", "200"), ("x-pod", self.pod)])
            self.transport.write(self.conn.data_to_send())
            for _ in range(100):
                await asyncio.sleep(0.1)
                if self.transport.is_closing() or stream_id not in self.conn.streams:
                    return
                try:
                    self.conn.send_data(stream_id, b"x")
                except h2.exceptions.StreamClosedError:
                    return
                self.transport.write(self.conn.data_to_send())

    port, target, _ = start_proxy(lt, [start_app(lt, factory=Trickles)], request_timeout_s=0.5)
    client = H2Client("127.0.0.1", port)
    for _ in range(2):  # the first waits for the pooled connection (a task), the second not
        started = time.monotonic()
        (response,) = client.wait(client.request("GET", "/"))
        assert response.status == 200 and response.reset == h2.errors.ErrorCodes.CANCEL
        assert time.monotonic() - started < 5  # cut near the deadline, not after the 10 s trickle
    assert target.errors.count((None, "request timeout mid-response")) == 2
    client.close()


def test_a_refused_http2_client_hears_403_with_its_body_then_goaway(lt):
    """inbound.H2Refusal on loopback: each request it sent gets the whole 403, then GOAWAY."""
    from nodeagent.proxy.inbound import H2Refusal
    refused = []

    async def listen():
        server = await lt.loop.create_server(lambda: H2Refusal(lambda: refused.append(1)), "127.0.0.1", 0)
        lt.servers.append(server)
        return server.sockets[0].getsockname()[1]
    client = H2Client("127.0.0.1", lt.run(listen()))
    (response,) = client.wait(client.request("GET", "/"))
    assert (response.status, bytes(response.body)) == (403, b"unauthorized\n") and refused == [1]
    while not client.closed:
        client._read()
    assert client.goaway is not None and client.goaway.error_code == 0
    client.close()


def test_a_malformed_request_is_reset_and_counted_and_its_neighbours_are_served(lt):
    """An upper-case field name breaks HTTP/2's rules: that stream is reset (PROTOCOL_ERROR),
    counted as a 400, and the connection serves the next request."""
    import hpack
    port, target, _ = start_proxy(lt, [start_app(lt)])
    encoder = hpack.Encoder()
    base = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"t")]
    bad = encoder.encode(base + [(b"X-Upper", b"1")], huffman=False)
    good = encoder.encode(base, huffman=False)
    head = len(bad).to_bytes(3, "big") + b"\x01\x05" + (1).to_bytes(4, "big") + bad
    head += len(good).to_bytes(3, "big") + b"\x01\x05" + (3).to_bytes(4, "big") + good
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + head)
        reply = b""
        while not any(kind == 0 and flags & 1 and stream == 3 for kind, stream, _, flags in _frames_flags(reply)):
            reply += sock.recv(65536)
    resets = [(stream, payload) for kind, stream, payload, _ in _frames_flags(reply) if kind == 3]
    assert resets == [(1, b"\x00\x00\x00\x01")]
    time.sleep(0.1)  # the response is counted once its exchange has finished
    assert [status for status, _ in target.errors] == [400] and target.statuses == [200]


def _frames_flags(data: bytes):
    at = 0
    while at + 9 <= len(data):
        length = int.from_bytes(data[at:at + 3], "big")
        yield data[at + 3], int.from_bytes(data[at + 5:at + 9], "big") & 0x7FFFFFFF, data[at + 9:at + 9 + length], \
            data[at + 4]
        at += 9 + length


def test_a_response_that_all_arrived_is_delivered_after_its_endpoint_hangs_up(lt):
    """The endpoint sends a whole response (more than the client's stream window), GOAWAY,
    and closes at once: what the proxy has received is still passed on, not reset."""
    class AnswersThenLeaves(workloads.H2cServer):
        async def _respond(self, stream_id):
            self.streams.pop(stream_id)
            self.conn.send_headers(stream_id, [(":status", "200"), ("x-pod", self.pod)])
            for at in range(0, 100000, 10000):
                self.conn.send_data(stream_id, b"z" * 10000, end_stream=at == 90000)
            self.conn.close_connection()
            self.transport.write(self.conn.data_to_send())
            self.transport.close()

    port, target, _ = start_proxy(lt, [start_app(lt, factory=AnswersThenLeaves)])
    client = H2Client("127.0.0.1", port)
    (response,) = client.wait(client.request("GET", "/"))
    assert (response.status, len(response.body), response.reset) == (200, 100000, None)
    client.close()
