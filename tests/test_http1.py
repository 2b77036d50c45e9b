"""The HTTP/1 proxy layer on loopback: real sockets, the real sample server, a
fixed destination in place of the mesh's routing (tested in test_proxy.py)."""

import asyncio
import http.client
import logging
import re
import socket
import struct
import threading
import time

import pytest

from nodeagent.lab.workloads import SERVERS
from nodeagent.proxy.budget import RetryBudget
from nodeagent.proxy.context import Observers
from nodeagent.proxy.metrics import Metrics
from nodeagent.proxy.problems import ProblemLog
from nodeagent.proxy.retry import Retries
from nodeagent.proxy.tap import TapHub
from nodeagent.cluster.model import ClusterView
from nodeagent.proxy.telemetry import Telemetry
from nodeagent.settings import DEFAULT
from nodeagent.proxy.http1 import Http1Server
from nodeagent.proxy.upstream import Pool


class FixedTarget:
    """Every request to one address; records what the proxy reports."""

    def __init__(self, address, retry_statuses=()):
        self.address, self.pool = address, Pool()
        self.retry_limit, self.request_timeout_s = 1, None
        self.budget = RetryBudget(time.monotonic)
        self.retry_statuses = set(retry_statuses)
        self.errors, self.statuses, self.attempts, self.abandoned = [], [], 0, 0
        metrics, problems = Metrics(), ProblemLog(logging.getLogger("test"))
        self.observers = Observers(metrics, TapHub(), problems, Telemetry(DEFAULT, metrics, problems, lambda: ClusterView([])))

    def retries(self, facts, request):
        self.budget.deposit()
        return Retries(facts, self.retry_limit, frozenset(self.retry_statuses), self.budget)

    def choose(self, tried):
        return None, self.address

    async def acquire(self, address):
        return await self.pool.acquire(None, 0, address, 1.0)

    def pooled(self, address):
        return self.pool.take(0, address)

    def release(self, address, conn):
        self.pool.release(0, address, conn)

    def connect_failed(self, state, exc):
        pass

    @staticmethod
    def connect_failure_reason(exc):
        return "connect failed"

    def count_cut(self, reason):
        self.errors.append((None, reason))

    def sending(self, request, address):
        pass

    def request_started(self, state, address):
        self.attempts += 1
        return 0

    def request_finished(self, state, token, status):
        pass

    def request_abandoned(self, state, token):
        self.abandoned += 1

    def count_response(self, request, status, address=None):
        self.statuses.append(status)

    def count_error(self, status, reason):
        self.errors.append((status, reason))


@pytest.fixture
def proxy_to():
    """proxy_to(kind or address, **target options) -> (proxy port, target)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servers = []

    def start(kind_or_address, **options):
        async def listen():
            if isinstance(kind_or_address, tuple):
                address = kind_or_address
            else:
                app = await loop.create_server(lambda: SERVERS[kind_or_address]("pod-a"), "127.0.0.1", 0)
                servers.append(app)
                address = app.sockets[0].getsockname()
            target = FixedTarget(address, **options)
            proxy = await loop.create_server(lambda: Http1Server(target), "127.0.0.1", 0)
            servers.append(proxy)
            return proxy.sockets[0].getsockname()[1], target

        return asyncio.run_coroutine_threadsafe(listen(), loop).result(5)

    yield start
    for server in servers:
        loop.call_soon_threadsafe(server.close)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def raw(port: int, data: bytes, shut: bool = False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_keep_alive_chunked_head_and_large_bodies(proxy_to):
    port, target = proxy_to("http")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("POST", "/", body=iter([b"a" * 70000, b"b"]), encode_chunked=True,
                 headers={"transfer-encoding": "chunked"})
    response = conn.getresponse()
    assert (response.status, response.read()) == (200, b"a" * 70000 + b"b")
    conn.request("HEAD", "/bytes/10")
    response = conn.getresponse()
    assert (response.status, response.getheader("content-length"), response.read()) == (200, "10", b"")
    conn.request("GET", "/bytes/3000000")
    assert len(conn.getresponse().read()) == 3000000
    assert target.statuses == [200, 200, 200]


def test_pipelined_requests_are_answered_in_order(proxy_to):
    port, _ = proxy_to("http")
    reply = raw(port, b"GET /status/201 HTTP/1.1\r\nhost: a\r\n\r\n" b"GET /status/202 HTTP/1.1\r\nhost: a\r\n\r\n"
                      b"GET /status/203 HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
    assert re.findall(rb"HTTP/1.1 (\d{3}) ", reply) == [b"201", b"202", b"203"]


@pytest.mark.parametrize("request_bytes,status", [
    (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", b"400"),
    (b"\x16\x03\x01garbage\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nx: " + b"a" * 70000 + b"\r\n\r\n", b"431"),
])
def test_bad_requests_get_an_error_and_close_and_the_next_connection_works(proxy_to, request_bytes, status):
    port, target = proxy_to("http")
    reply = raw(port, request_bytes)
    assert reply.split(b" ")[1] == status and b"nodeagent-proxy-error: " in reply
    assert target.errors and target.errors[0][0] == int(status)
    assert raw(port, b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n").endswith(b"hello from pod-a\n")


def test_a_refused_upstream_is_a_502_with_the_reason(proxy_to):
    unused = socket.socket()
    unused.bind(("127.0.0.1", 0))
    address = unused.getsockname()
    unused.close()
    port, _ = proxy_to(address)
    reply = raw(port, b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 502 ") and b"nodeagent-proxy-error: connect failed" in reply


def test_statuses_configured_for_retry_are_retried_within_the_limit(proxy_to):
    port, target = proxy_to("http", retry_statuses={503})
    reply = raw(port, b"GET /status/503 HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 503")
    assert target.attempts == 2  # the request and one retry (limit 1)
    port, target = proxy_to("http", retry_statuses={503})
    raw(port, b"POST /status/503 HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\nconnection: close\r\n\r\nx")
    assert target.attempts == 1  # a request with a body is never retried


UPGRADE_ECHO_REPLY = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: echo\r\nconnection: upgrade\r\n\r\n"


class UpgradeEcho(asyncio.Protocol):
    """Answers an Upgrade request with 101, then echoes raw bytes (as a WebSocket echo would frames)."""

    def connection_made(self, transport):
        self.transport, self.upgraded, self.buffer = transport, False, b""

    def data_received(self, data):
        if self.upgraded:
            self.transport.write(data)
            return
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            head, rest = self.buffer.split(b"\r\n\r\n", 1)
            self.upgraded = True
            self.transport.write(UPGRADE_ECHO_REPLY + rest)


def test_an_upgraded_connection_is_spliced_both_ways(proxy_to):
    loop_ready = {}

    def start_echo():
        async def run():
            server = await asyncio.get_running_loop().create_server(UpgradeEcho, "127.0.0.1", 0)
            loop_ready["address"] = server.sockets[0].getsockname()
            await asyncio.sleep(10)

        asyncio.run(run())

    threading.Thread(target=start_echo, daemon=True).start()
    while "address" not in loop_ready:
        time.sleep(0.01)
    port, _ = proxy_to(loop_ready["address"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /chat HTTP/1.1\r\nhost: a\r\nupgrade: echo\r\nconnection: upgrade\r\n\r\nearly bytes|")
        received = b""
        while not received.endswith(b"early bytes|"):
            received += sock.recv(65536)
        assert received.startswith(UPGRADE_ECHO_REPLY)
        sock.sendall(b"after the upgrade")
        echoed = b""
        while len(echoed) < len(b"after the upgrade"):
            echoed += sock.recv(65536)
        assert echoed == b"after the upgrade"


def test_a_slow_request_head_gets_408_and_is_closed(proxy_to, monkeypatch):
    from nodeagent.proxy import http1

    monkeypatch.setattr(http1, "HEAD_READ_TIMEOUT_S", 0.3)
    port, target = proxy_to("http")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: a\r\nx-slow: ")  # slowloris: never finishes the head
        reply = sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 408 ") and sock.recv(10) == b""
    assert target.errors == [(408, "request head not received in time")]


def test_an_idle_keep_alive_connection_is_closed(proxy_to, monkeypatch):
    from nodeagent.proxy import http1

    monkeypatch.setattr(http1, "KEEPALIVE_IDLE_S", 0.3)
    port, _ = proxy_to("http")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        assert sock.recv(10) == b""  # closed by the proxy (a socket timeout would fail the test instead)


def test_draining_ends_keep_alive_connections_at_their_next_clean_point(proxy_to, monkeypatch):
    """drain(): a connection waiting for a request ends after DRAIN_IDLE_S; one that sends a
    request hears `connection: close` on its response, then the end."""
    from nodeagent.proxy import http1

    monkeypatch.setattr(http1, "DRAIN_IDLE_S", 0.3)
    servers, made = [], Http1Server.connection_made
    monkeypatch.setattr(Http1Server, "connection_made", lambda self, transport: (servers.append(self),
                                                                                  made(self, transport)))
    port, _ = proxy_to("http")
    request = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as idle, \
            socket.create_connection(("127.0.0.1", port), timeout=5) as busy:
        for sock in (idle, busy):
            sock.sendall(request)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        for server in servers:
            server.loop.call_soon_threadsafe(server.drain)
        busy.sendall(request)
        started, reply = time.monotonic(), b""
        while chunk := busy.recv(65536):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200") and b"\r\nconnection: close" in reply.lower()
        assert idle.recv(10) == b"" and time.monotonic() - started < 3  # not the 60 s keep-alive


def test_a_request_timeout_is_a_504_with_the_reason(proxy_to):
    port, target = proxy_to("http")
    target.request_timeout_s = 0.2
    reply = raw(port, b"GET /delay/2000 HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 504 ") and b"nodeagent-proxy-error: request timeout" in reply


class RawServer:
    """A TCP server on loopback that runs `behave(conn)` in a thread for each connection."""

    def __init__(self, behave):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.result = []
        self.thread = threading.Thread(target=self._run, args=(behave,), daemon=True)
        self.thread.start()

    def _run(self, behave):
        conn, _ = self.listener.accept()
        with conn:
            self.result.append(behave(conn))

    def close(self):
        self.listener.close()


def test_the_request_timeout_bounds_the_whole_exchange_not_only_the_head(proxy_to):
    def trickle(conn):
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n")
        try:
            for _ in range(100):  # 10 s of one byte every 0.1 s, unless cut
                conn.sendall(b"x")
                time.sleep(0.1)
        except OSError:
            return "cut"
        return "ran to the end"

    server = RawServer(trickle)
    port, target = proxy_to(server.address)
    target.request_timeout_s = 0.5
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=8) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    assert received.startswith(b"HTTP/1.1 200") and len(received) < 1000000
    assert time.monotonic() - started < 5  # cut near the deadline, not after the 10 s trickle
    assert (None, "request timeout mid-response") in target.errors
    server.thread.join(12)
    assert server.result == ["cut"]
    server.close()



def recv_through_head(sock) -> bytes:
    """Read until a whole head (through its blank line) has come: the head and what followed it."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    return received

def test_the_head_goes_out_before_a_body_that_has_not_come(proxy_to):
    """Head and body share a write when the body is there (one TLS record on a mesh hop), but
    the head never waits for the body: the client may be waiting for the head's answer."""
    head_seen = threading.Event()

    def reads_head_then_body(conn):
        received = recv_through_head(conn)
        head_seen.set()
        body = received.split(b"\r\n\r\n", 1)[1]
        while len(body) < 5:
            body += conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n" + body)
        return body

    server = RawServer(reads_head_then_body)
    port, _ = proxy_to(server.address)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\n")
        assert head_seen.wait(5)  # before any byte of the body was sent
        sock.sendall(b"hello")
        reply = b""
        while not reply.endswith(b"hello"):
            reply += sock.recv(65536)
    server.thread.join(5)  # its result is recorded after its reply is sent
    assert reply.startswith(b"HTTP/1.1 200") and server.result == [b"hello"]
    server.close()


MB = 1 << 20


def test_a_request_body_to_an_endpoint_that_does_not_read_is_held_to_the_buffers(proxy_to):
    """It used to be read in full into the proxy (a 300 MiB POST grew it by 300 MiB)."""
    stop = threading.Event()

    def never_reads(conn):
        stop.wait(10)

    server = RawServer(never_reads)
    port, _ = proxy_to(server.address)
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: %d\r\n\r\n" % (300 * MB))
        sock.settimeout(2)
        chunk = b"p" * MB
        try:
            while sent < 300 * MB:
                sent += sock.send(chunk)
        except (socket.timeout, OSError):
            pass
    stop.set()
    # The kernel's socket buffers on both hops, plus the proxy's bounded queue: tens of MB at most.
    assert sent < 64 * MB, sent
    server.close()


def test_a_response_to_a_client_that_does_not_read_is_held_to_the_buffers(proxy_to):
    sent = []

    def floods(conn):
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (300 * MB))
        conn.settimeout(2)
        total = 0
        try:
            while total < 300 * MB:
                total += conn.send(b"r" * MB)
        except (socket.timeout, OSError):
            pass
        sent.append(total)

    server = RawServer(floods)
    port, _ = proxy_to(server.address)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        server.thread.join(15)  # the client reads nothing while the server tries to send
    assert sent and sent[0] < 64 * MB, sent
    server.close()


def test_a_client_gone_mid_request_takes_its_endpoint_connection_along():
    """A client that resets while its request waits on an endpoint that never answers must not
    leave the endpoint connection open (a pod could repeat it until the node runs out)."""
    clients = 20
    accepted, ended = [], threading.Semaphore(0)
    listener = socket.create_server(("127.0.0.1", 0))

    def hold(conn):
        with conn:
            conn.settimeout(10)
            try:
                while conn.recv(65536):
                    pass  # the request: never answered
            except OSError:
                pass
            ended.release()

    def accept():
        for _ in range(clients):
            conn, _ = listener.accept()
            accepted.append(conn)
            threading.Thread(target=hold, args=(conn,), daemon=True).start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    target = FixedTarget(listener.getsockname())

    async def listen():
        return await loop.create_server(lambda: Http1Server(target), "127.0.0.1", 0)

    proxy = asyncio.run_coroutine_threadsafe(listen(), loop).result(5)
    try:
        port = proxy.sockets[0].getsockname()[1]
        for sent in range(1, clients + 1):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            deadline = time.monotonic() + 5
            while target.attempts < sent and time.monotonic() < deadline:
                time.sleep(0.01)  # until the request is on its way to the endpoint
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset
        for _ in range(clients):
            assert ended.acquire(timeout=5), "an endpoint connection outlived its client"
        assert target.abandoned == clients
    finally:
        loop.call_soon_threadsafe(proxy.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        listener.close()


def test_connect_is_a_tunnel_once_the_endpoint_says_2xx(proxy_to):
    def forward_proxy(conn):
        head = recv_through_head(conn)
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        data = head.split(b"\r\n\r\n", 1)[1]
        while len(data) < 10:
            data += conn.recv(65536)
        conn.sendall(data.upper())
        return head.split(b"\r\n")[0]

    server = RawServer(forward_proxy)
    port, _ = proxy_to(server.address)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"CONNECT db.example:5432 HTTP/1.1\r\nhost: db.example:5432\r\n\r\nhello")
        reply = recv_through_head(sock)
        sock.sendall(b"world")
        while not reply.endswith(b"HELLOWORLD"):
            chunk = sock.recv(65536)
            assert chunk, reply
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 ")
    server.thread.join(5)
    assert server.result == [b"CONNECT db.example:5432 HTTP/1.1"]
    server.close()


def test_a_client_that_expects_100_continue_gets_it_and_its_body_goes_through(proxy_to):
    port, target = proxy_to("http")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n")
        interim = sock.recv(65536)  # the body is held back until the proxy asks for it
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim
        sock.sendall(b"hello")
        sock.sendall(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        reply = interim[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.count(b"HTTP/1.1 200 ") == 2
    assert b"hello" in reply
    assert target.statuses == [200, 200]


def test_bytes_an_endpoint_sends_on_an_idle_pooled_connection_end_it(proxy_to):
    """Bytes from an endpoint on an idle pooled connection (here a head announcing 40 bytes of
    body) answer no request: the connection is closed, not kept to parse the next response as
    that body; the next request gets a new connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    stray_sent, accepted = threading.Event(), []
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    def serve(conn, stray: bool):
        with conn:
            try:
                while conn.recv(65536):
                    conn.sendall(answer)
                    if stray:
                        time.sleep(0.1)  # after the response is relayed and its connection pooled
                        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 40\r\n\r\n")
                        stray, _ = False, stray_sent.set()
            except OSError:
                pass  # the proxy resets the connection it no longer trusts

    def accept():
        for index in range(2):
            conn, _ = listener.accept()
            accepted.append(conn)
            threading.Thread(target=serve, args=(conn, index == 0), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    port, _ = proxy_to(listener.getsockname())
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            for _ in range(2):
                sock.sendall(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
                reply = b""
                while not reply.endswith(b"\r\n\r\nok"):
                    reply += sock.recv(65536)
                assert reply.startswith(b"HTTP/1.1 200 ")
                assert stray_sent.wait(5)
                time.sleep(0.2)  # the stray head reaches the proxy while the connection is pooled
        assert len(accepted) == 2
    finally:
        listener.close()


def test_a_pods_idle_pooled_connections_are_bounded_over_all_its_endpoints(monkeypatch):
    """POOL_MAX_IDLE_PER_POD: a pod cannot keep more idle connections by spreading them over
    endpoints (a one-hop one holds a share of its destination's); another pod keeps its own."""
    from nodeagent.proxy import upstream

    monkeypatch.setattr(upstream, "POOL_MAX_IDLE_PER_POD", 2)

    async def scenario():
        loop = asyncio.get_running_loop()
        servers = [await loop.create_server(asyncio.Protocol, "127.0.0.1", 0) for _ in range(3)]
        addresses = [server.sockets[0].getsockname() for server in servers]
        pool = Pool()
        try:
            conns = [(await pool.acquire(None, 1, address, 1.0))[0] for address in addresses]
            other, _ = await pool.acquire(None, 2, addresses[0], 1.0)
            for address, conn in zip(addresses, conns):
                pool.release(1, address, conn)
            pool.release(2, addresses[0], other)
            assert pool.size() == 3 and conns[2].transport.is_closing() and not other.transport.is_closing()
            assert (await pool.acquire(None, 1, addresses[0], 1.0))[1]  # the kept ones are reused
            pool.drain()
            assert pool.size() == 0 and all(c.transport.is_closing() for c in (conns[1], other))
        finally:
            for server in servers:
                server.close()

    asyncio.run(scenario())


def test_an_interim_response_and_the_final_one_in_one_read_count_the_final_status(proxy_to):
    def interim_and_final_at_once(conn):
        recv_through_head(conn)
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok")
        return "sent"

    server = RawServer(interim_and_final_at_once)
    port, target = proxy_to(server.address)
    reply = raw(port, b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
    assert b"HTTP/1.1 201 Created" in reply and reply.endswith(b"\r\n\r\nok")
    assert target.statuses == [201]
    server.close()
