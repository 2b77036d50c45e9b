"""HTTP/1's fast path (exchange1.py): a whole request on a pooled connection, served in
callbacks. The behaviours of the general path hold on it: connection-level headers stay on
their hop, a lost pooled connection is retried on a new one, a configured status is retried, the
request timeout bounds the exchange, and what the client sent goes upstream unchanged."""

import socket
import threading
import time

from test_http1 import RawServer, proxy_to  # noqa: F401 (the fixture)


def serve_requests(answers):
    """A RawServer behaviour: per request read, the next answer (None: close without one)."""

    def behave(conn):
        received = []
        for answer in answers:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return received
                head += chunk
            received.append(head)
            if answer is None:
                return received
            conn.sendall(answer)
        return received

    return behave


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


def exchange(sock, request: bytes, body: bytes = b"ok") -> bytes:
    sock.sendall(request)
    reply = b""
    while not reply.endswith(b"\r\n\r\n" + body):
        chunk = sock.recv(65536)
        assert chunk, reply
        reply += chunk
    return reply


def test_a_pooled_request_goes_upstream_as_sent_or_without_its_connection_headers(proxy_to):
    server = RawServer(serve_requests([OK, OK, OK]))
    port, target = proxy_to(server.address)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        exchange(sock, b"GET /first HTTP/1.1\r\nhost: a\r\n\r\n")  # opens the pooled connection
        exchange(sock, b"GET /as-sent HTTP/1.1\r\nhost: a\r\nx-spaced:   kept  \r\n\r\n")
        reply = exchange(sock, b"GET /hop HTTP/1.1\r\nhost: a\r\nconnection: keep-alive, x-hop\r\nkeep-alive: 5\r\n"
                               b"x-after: 1\r\n\r\n")
    server.thread.join(5)
    first, as_sent, hop = server.result[0]
    assert as_sent == b"GET /as-sent HTTP/1.1\r\nhost: a\r\nx-spaced:   kept  \r\n\r\n"
    assert hop == b"GET /hop HTTP/1.1\r\nhost: a\r\nx-after: 1\r\n\r\n"
    assert reply.startswith(b"HTTP/1.1 200 ") and target.statuses == [200, 200, 200]
    server.close()


def test_a_pooled_connection_lost_before_the_head_is_retried_on_a_new_one(proxy_to):
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def accept():
        for behave in (serve_requests([OK, None]), serve_requests([OK])):
            conn, _ = listener.accept()
            accepted.append(conn)
            threading.Thread(target=lambda c=conn, b=behave: (b(c), c.close()), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    port, target = proxy_to(listener.getsockname())
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            exchange(sock, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            reply = exchange(sock, b"GET /again HTTP/1.1\r\nhost: a\r\n\r\n")  # the pooled one closes unanswered
        assert reply.startswith(b"HTTP/1.1 200 ") and len(accepted) == 2 and target.attempts == 3
    finally:
        listener.close()


def test_a_configured_status_on_a_pooled_connection_is_retried(proxy_to):
    unavailable = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\nno"
    listener = socket.create_server(("127.0.0.1", 0))

    def accept():
        for behave in (serve_requests([OK, unavailable]), serve_requests([OK])):
            conn, _ = listener.accept()
            threading.Thread(target=lambda c=conn, b=behave: (b(c), c.close()), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    port, target = proxy_to(listener.getsockname(), retry_statuses={503})
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            exchange(sock, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            reply = exchange(sock, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200 ") and target.statuses == [200, 200] and target.attempts == 3
    finally:
        listener.close()


def test_the_request_timeout_bounds_a_pooled_exchange(proxy_to):
    def answer_then_hang(conn):
        serve_requests([OK])(conn)
        conn.recv(65536)  # the second request, never answered
        time.sleep(3)

    server = RawServer(answer_then_hang)
    port, target = proxy_to(server.address)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        exchange(sock, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        target.request_timeout_s = 0.3
        started = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 504 ") and b"nodeagent-proxy-error: request timeout" in reply
    assert time.monotonic() - started < 2
    server.close()


def test_a_new_connection_lost_before_its_first_request_tells_no_one():
    """A fresh upstream connection has no listener yet: its loss (or a stray byte) is no error."""
    import asyncio

    from nodeagent.proxy.upstream import Response, ResponseReader

    async def scenario():
        loop = asyncio.get_running_loop()
        errors = []
        loop.set_exception_handler(lambda loop, context: errors.append(context))

        class SpeaksThenCloses(asyncio.Protocol):
            def connection_made(self, transport):
                transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
                transport.close()

        server = await loop.create_server(SpeaksThenCloses, "127.0.0.1", 0)
        _, conn = await loop.create_connection(ResponseReader, *server.sockets[0].getsockname())
        assert conn.state is Response.IDLE
        await asyncio.sleep(0.2)
        server.close()
        assert conn.transport.is_closing() and errors == []

    asyncio.run(scenario())
