"""Inbound: a connection to an enrolled pod, steered by sk_lookup onto the
proxy's listener in that pod. getsockname() is the original destination; the
app is reached on the pod's loopback at the same port (apps listen on
0.0.0.0 or 127.0.0.1; an app bound only to the pod IP is not reachable
through the proxy, as with other meshes that forward over loopback).

The upstream connection opens at accept time, so a server that speaks first
is heard at once. Bytes are spliced as they are (HTTP-aware inbound handling
arrives with mTLS and policy, issue #5).
"""

import asyncio

from nodeagent.proxy.relay import Holding, splice_held
from nodeagent.proxy.upstream import open_socket

APP_CONNECT_TIMEOUT_S = 1.0


class InboundAccept(asyncio.Protocol):
    def __init__(self, proxy, pod):
        self.proxy, self.pod = proxy, pod
        self.buffer = bytearray()
        self.eof = False
        self.transport = None
        self.task = None

    def connection_made(self, transport):
        self.transport = transport
        self.proxy.stats.open_connections += 1
        port = transport.get_extra_info("sockname")[1]
        self.proxy.stats.inc("tcp_open", direction="inbound", pod=self.pod.key)
        self.task = asyncio.get_running_loop().create_task(self._forward(port))

    async def _forward(self, port: int):
        try:
            sock = await open_socket(self.pod.netns_path, ("127.0.0.1", port), APP_CONNECT_TIMEOUT_S)
            _, app = await asyncio.get_running_loop().create_connection(Holding, sock=sock)
        except (OSError, asyncio.TimeoutError):
            self.proxy.stats.inc("tcp_errors", direction="inbound", reason="app connect failed")
            self._closed()
            self.transport.abort()
            return
        splice_held(self.transport, bytes(self.buffer), self.eof, app, on_close=lambda _: self._closed())

    def _closed(self):
        self.proxy.stats.open_connections -= 1
        self.proxy.stats.inc("tcp_close", direction="inbound", pod=self.pod.key)

    def data_received(self, data):
        self.buffer += data  # only until the splice replaces this protocol

    def eof_received(self):
        self.eof = True
        return True

    def connection_lost(self, exc):
        if self.task and not self.task.done():
            self.task.cancel()
            self._closed()
