"""The lab's sample servers against the lab's probes and raw sockets, over loopback."""

import asyncio
import socket
import threading

import pytest

from nodeagent.lab import client
from nodeagent.lab.workloads import SERVERS, route


@pytest.mark.parametrize("target,status,body_start,delay", [
    ("/", 200, b"hello from p", 0.0),
    ("/status/503", 503, b"status 503", 0.0),
    ("/status/99", 404, b"no route", 0.0),
    ("/status/abc", 404, b"no route", 0.0),
    ("/delay/250", 200, b"hello from p after 250", 0.25),
    ("/bytes/3", 200, b"xxx", 0.0),
    ("/bytes/-1", 404, b"no route", 0.0),
    ("/nowhere", 404, b"no route", 0.0),
    ("/?q=1", 200, b"hello", 0.0),
])
def test_route(target, status, body_start, delay):
    got_status, body, got_delay = route("p", "GET", target, b"")
    assert (got_status, got_delay) == (status, delay)
    assert body.startswith(body_start)


def test_behaviour_controls_make_a_pod_slow_or_failing():
    from nodeagent.lab.workloads import Behaviour

    behaviour = Behaviour()
    assert route("p", "GET", "/set-delay/150", b"", behaviour)[0] == 200
    assert route("p", "GET", "/set-status/503", b"", behaviour)[0] == 200
    assert route("p", "GET", "/", b"", behaviour)[::2] == (503, 0.15)
    route("p", "GET", "/set-status/0", b"", behaviour)
    route("p", "GET", "/set-delay/0", b"", behaviour)
    assert route("p", "GET", "/", b"", behaviour)[::2] == (200, 0.0)


def test_route_echoes_a_request_body():
    assert route("p", "POST", "/", b"ping")[:2] == (200, b"ping")


@pytest.fixture
def serve():
    """Start a sample server on an ephemeral loopback port; yields its port."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servers = []

    def start(kind):
        async def listen():
            return await loop.create_server(lambda: SERVERS[kind]("pod-a"), "127.0.0.1", 0)

        server = asyncio.run_coroutine_threadsafe(listen(), loop).result(5)
        servers.append(server)
        return server.sockets[0].getsockname()[1]

    yield start
    for server in servers:
        loop.call_soon_threadsafe(server.close)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


@pytest.mark.parametrize("kind", ["http", "h2c", "echo", "banner"])
def test_each_server_passes_its_probe(serve, kind):
    result = client.run(kind, "127.0.0.1", serve(kind))
    assert result["ok"], result
    if kind in ("http", "h2c"):
        assert "pod-a" in result["detail"]


def _exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_http_server_answers_malformed_requests_with_400_and_keeps_serving(serve):
    port = serve("http")
    assert _exchange(port, b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert client.run("http", "127.0.0.1", port)["ok"]


def test_http_server_keeps_alive_and_echoes_chunked_bodies(serve):
    port = serve("http")
    request = (b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n4\r\nping\r\n0\r\n\r\n"
               b"GET /status/201 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    reply = _exchange(port, request)
    assert reply.count(b"HTTP/1.1 ") == 2
    assert b"\r\n\r\nping" in reply and b"HTTP/1.1 201 " in reply


def test_banner_greets_before_the_client_speaks(serve):
    with socket.create_connection(("127.0.0.1", serve("banner")), timeout=5) as sock:
        assert sock.recv(100).startswith(b"220 pod-a ")
