"""The console's HTTP server and tap reader on real sockets, without a lab: its answers when no
agent answers, the Host check, its bounds (connections, tap streams), and a tap stream that
close() ends while it waits for events."""

import http.client
import json
import socket
import threading
import time

import pytest

from nodeagent.observe import admin_client, console


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server():
    """A console whose one agent is a closed port."""
    served = console.serve([f"127.0.0.1:{free_port()}"], "127.0.0.1", 0, 0.5)
    thread = threading.Thread(target=served.serve_forever, daemon=True)
    thread.start()
    yield served
    served.shutdown()
    served.server_close()


def get(server, path: str, host: str | None = None) -> tuple[int, dict, str]:
    port = server.server_address[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host or f"127.0.0.1:{port}"})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        conn.close()


def test_pages_say_which_agents_did_not_answer(server):
    status, headers, body = get(server, "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and body.startswith("<!doctype html>")
    assert "did not answer" in body and "No namespaces in the agents&#x27; view." in body
    status, _, live = get(server, "/?part=live")
    assert status == 200 and not live.startswith("<!doctype") and "did not answer" in live
    assert get(server, "/workloads/default/app/http")[0] == 200
    assert get(server, "/namespaces/default")[0] == 200 and get(server, "/edges")[0] == 200
    status, headers, script = get(server, "/static/console.js")
    assert status == 200 and headers["content-type"] == "text/javascript" and "EventSource" in script
    assert get(server, "/static/../console.py")[0] == 404 and get(server, "/nothing")[0] == 404


def test_only_requests_for_its_loopback_address_are_answered(server):
    port = server.server_address[1]
    assert get(server, "/", host=f"localhost:{port}")[0] == 200
    assert get(server, "/", host=f"attacker.example:{port}")[0] == 403  # DNS rebinding
    with pytest.raises(ValueError, match="loopback"):
        console.serve(["127.0.0.1:1"], "0.0.0.0", 0, 1)


def test_connections_beyond_the_cap_are_refused_at_once(server):
    port = server.server_address[1]
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(console.MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
            assert extra.recv(100).startswith(b"HTTP/1.0 503")
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 5
    while True:  # the idle connections' threads notice the closes
        try:
            if get(server, "/")[0] == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_tap_streams_are_capped_and_say_what_failed(server):
    port = server.server_address[1]
    streams = []
    try:
        for _ in range(console.MAX_TAP_STREAMS):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/tap/default/app/http")
            response = conn.getresponse()
            assert response.status == 200 and response.getheader("content-type") == "text/event-stream"
            streams.append((conn, response))
        assert response.readline() == b"retry: 2000\n"
        response.readline()
        assert response.readline() == b"event: problem\n"
        assert b"tap of agent 127.0.0.1:" in response.readline()
        assert get(server, "/tap/default/app/http")[0] == 503
    finally:
        for conn, response in streams:
            response.close()
            conn.close()
    deadline = time.monotonic() + console.HEARTBEAT_S + 5  # a stream notices its browser left when it next writes
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/tap/default/app/http")
        status = conn.getresponse().status
        conn.close()
        if status == 200:
            break
        assert status == 503 and time.monotonic() < deadline
        time.sleep(0.5)


def test_closing_a_tap_stream_ends_a_reader_waiting_for_events():
    """A stand-in agent that sends one event and then nothing: close() from another thread ends
    the reader at once, without an error."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def agent():
        sock, _ = listener.accept()
        accepted.append(sock)
        sock.recv(4096)
        line = json.dumps({"path": "/one"}).encode() + b"\n"
        sock.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n" % (len(line), line))

    threading.Thread(target=agent, daemon=True).start()
    stream = admin_client.TapStream(f"127.0.0.1:{listener.getsockname()[1]}", {}, 10, 60)
    got, ended = [], threading.Event()

    def read():
        got.extend(stream)
        ended.set()

    threading.Thread(target=read, daemon=True).start()
    time.sleep(0.5)
    assert got == [{"path": "/one"}] and not ended.is_set()
    stream.close()
    assert ended.wait(2)
    listener.close()
    for sock in accepted:
        sock.close()
