"""The admin server: /live, /ready, /metrics (Prometheus), /stats (JSON).
Answers only on its own address (127.0.0.1 by default)."""

import asyncio
import json

import httptools
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


class AdminProtocol(asyncio.Protocol):
    def __init__(self, routes):
        self.routes = routes
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""

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
        path = self.url.split(b"?", 1)[0].decode()
        self.url = b""
        handler = self.routes.get(path)
        if handler is None:
            self._send(404, "text/plain", b"not found\n")
        else:
            self._send(*handler())

    def _send(self, status: int, content_type: str, body: bytes):
        self.transport.write(f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\ncontent-type: {content_type}\r\n"
                             f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
        self.transport.close()


def routes_for(agent) -> dict:
    def live():
        return 200, "text/plain", b"live\n"

    def ready():
        return (200, "text/plain", b"ready\n") if agent.ready else (503, "text/plain", b"not ready\n")

    def stats():
        return 200, "application/json", json.dumps(agent.status(), indent=1).encode()

    def metrics():
        if agent.proxy is None:
            return 503, "text/plain", b"not ready\n"
        return 200, CONTENT_TYPE_LATEST, generate_latest(agent.proxy.metrics.registry)

    return {"/live": live, "/ready": ready, "/stats": stats, "/metrics": metrics}


async def serve_admin(agent, host: str, port: int) -> asyncio.AbstractServer:
    routes = routes_for(agent)
    return await asyncio.get_running_loop().create_server(lambda: AdminProtocol(routes), host, port)
