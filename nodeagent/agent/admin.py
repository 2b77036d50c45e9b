"""The admin server: /live, /ready, /metrics (Prometheus), /stats (JSON) and
/tap (a stream of request metadata, JSON lines). Answers only on its own
address (127.0.0.1 by default): none of it is for the pods.

/tap?pod=P&namespace=N&to=svc/ns/name&method=GET&path=/prefix&max=100&seconds=30
ends after `max` events or `seconds` (at most MAX_TAP_SECONDS), or when the
client goes away.
"""

import asyncio
import json
import urllib.parse

import httptools
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

MAX_TAP_SECONDS = 3600


class AdminProtocol(asyncio.Protocol):
    def __init__(self, agent, routes):
        self.agent, self.routes = agent, routes
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.task = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._send(400, "text/plain", b"bad request\n")

    def on_url(self, url):
        self.url += url

    def on_message_complete(self):
        target = urllib.parse.urlsplit(self.url.decode("latin-1"))
        self.url = b""
        query = dict(urllib.parse.parse_qsl(target.query))
        if target.path == "/tap":
            self.task = asyncio.get_running_loop().create_task(self._tap(query))
            return
        handler = self.routes.get(target.path)
        if handler is None:
            self._send(404, "text/plain", b"not found\n")
            return
        answer = handler()
        if asyncio.iscoroutine(answer):  # it gathers from the worker processes first
            self.task = asyncio.get_running_loop().create_task(self._send_when_ready(answer))
        else:
            self._send(*answer)

    async def _send_when_ready(self, answer):
        self._send(*await answer)

    def connection_lost(self, exc):
        if self.task:
            self.task.cancel()

    def _send(self, status: int, content_type: str, body: bytes):
        self.transport.write(f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\ncontent-type: {content_type}\r\n"
                             f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
        self.transport.close()

    async def _tap(self, query: dict):
        if self.agent.proxy is None:
            self._send(503, "text/plain", b"not ready\n")
            return
        try:
            limit = int(query.pop("max", "1000000"))
            seconds = min(float(query.pop("seconds", MAX_TAP_SECONDS)), MAX_TAP_SECONDS)
            subscription = self.agent.proxy.tap.subscribe(query)  # refuses filters it does not know
        except ValueError as e:
            self._send(400, "text/plain", f"{e}\n".encode())
            return
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n"
                             b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        try:
            for _ in range(limit):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    event = await asyncio.wait_for(subscription.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
                line = json.dumps(event).encode() + b"\n"
                self.transport.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.transport.write(b"0\r\n\r\n")
            self.transport.close()
        finally:
            self.agent.proxy.tap.unsubscribe(subscription)


def routes_for(agent) -> dict:
    def live():
        return 200, "text/plain", b"live\n"

    def ready():
        return (200, "text/plain", b"ready\n") if agent.ready else (503, "text/plain", b"not ready\n")

    async def stats():
        return 200, "application/json", json.dumps(await agent.status(), indent=1).encode()

    async def metrics():
        if agent.proxy is None:
            return 503, "text/plain", b"not ready\n"
        return 200, CONTENT_TYPE_LATEST, generate_latest(await agent.metrics_registry())

    return {"/live": live, "/ready": ready, "/stats": stats, "/metrics": metrics}


async def serve_admin(agent, host: str, port: int) -> asyncio.AbstractServer:
    routes = routes_for(agent)
    return await asyncio.get_running_loop().create_server(lambda: AdminProtocol(agent, routes), host, port)
