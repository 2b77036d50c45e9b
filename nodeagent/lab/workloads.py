"""Sample servers for lab pods: HTTP/1.1, h2c, TCP echo, server-speaks-first.

Run as `python -m nodeagent.lab.workloads KIND --port P --name POD`. Each one
answers with the pod's name so tests can see which endpoint served them.

HTTP paths: `/` hello, `/status/<code>`, `/delay/<ms>`, `/bytes/<n>`, and
any request body is echoed back. Tests make one pod misbehave with
`/set-delay/<ms>` (every later answer waits that long) and `/set-status/<code>`
(every later answer has that status; 0 restores).
"""

import argparse
import asyncio
import http

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h11
import uvloop

MAX_BYTES = 64 * 1024 * 1024


class Behaviour:
    """How this pod answers every request, as set by /set-delay and /set-status."""

    delay_s = 0.0
    status = 0


def route(pod: str, method: str, target: str, body: bytes, behaviour: Behaviour | None = None
          ) -> tuple[int, bytes, float]:
    """(status, response body, delay in seconds) for a request, shared by both HTTP servers."""
    parts = target.split("?", 1)[0].strip("/").split("/")
    if behaviour is not None and len(parts) == 2 and parts[0] in ("set-delay", "set-status") and parts[1].isdigit():
        if parts[0] == "set-delay":
            behaviour.delay_s = int(parts[1]) / 1000
        else:
            behaviour.status = int(parts[1])
        return 200, f"{pod}: {parts[0]} {parts[1]}\n".encode(), 0.0
    status, answer, delay = _answer(pod, parts, target, body)
    if behaviour is not None:
        return behaviour.status or status, answer, delay + behaviour.delay_s
    return status, answer, delay


def _answer(pod: str, parts: list[str], target: str, body: bytes) -> tuple[int, bytes, float]:
    try:
        if parts[0] == "status" and len(parts) == 2:
            code = int(parts[1])
            if 200 <= code <= 599:
                return code, f"status {code} from {pod}\n".encode(), 0.0
        elif parts[0] == "delay" and len(parts) == 2:
            return 200, f"hello from {pod} after {int(parts[1])} ms\n".encode(), int(parts[1]) / 1000
        elif parts[0] == "bytes" and len(parts) == 2 and 0 <= int(parts[1]) <= MAX_BYTES:
            return 200, b"x" * int(parts[1]), 0.0
        elif parts == [""]:
            return 200, body if body else f"hello from {pod}\n".encode(), 0.0
    except ValueError:
        pass
    return 404, f"no route {target} on {pod}\n".encode(), 0.0


def _phrase(status: int) -> bytes:
    """The reason phrase (some clients, h2load among them, count a response without one as failed)."""
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Status"


class Http1Server(asyncio.Protocol):
    def __init__(self, pod: str):
        self.pod = pod
        self.conn = h11.Connection(h11.SERVER)
        self.request: h11.Request | None = None
        self.body = bytearray()
        self.responding = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.conn.receive_data(data)
        self._next_events()

    def eof_received(self):
        self.conn.receive_data(b"")
        self._next_events()

    def _next_events(self):
        while not self.responding:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError:
                self._send_error(400)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.request, self.body = event, bytearray()
            elif isinstance(event, h11.Data):
                self.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.responding = True
                asyncio.get_running_loop().create_task(self._respond())
            elif isinstance(event, h11.ConnectionClosed):
                self.transport.close()
                return

    def _send_error(self, status: int):
        try:
            if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                self.transport.write(self.conn.send(h11.Response(status_code=status, reason=_phrase(status), headers=[
                    ("content-length", "0"), ("connection", "close")])))
                self.transport.write(self.conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:
            pass  # h11 cannot answer in this state: closing says enough
        self.transport.close()

    async def _respond(self):
        request = self.request
        status, body, delay = route(self.pod, request.method.decode(), request.target.decode(), bytes(self.body),
                                    BEHAVIOUR)
        if delay:
            await asyncio.sleep(delay)
        if self.transport.is_closing():
            return
        headers = [("content-type", "text/plain"), ("content-length", str(len(body))), ("x-pod", self.pod)]
        self.transport.write(self.conn.send(h11.Response(status_code=status, reason=_phrase(status), headers=headers)))
        if request.method != b"HEAD":  # a HEAD response announces the body's length but has none
            self.transport.write(self.conn.send(h11.Data(data=body)))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        if self.conn.our_state is h11.MUST_CLOSE:
            self.transport.close()
            return
        self.conn.start_next_cycle()
        self.responding = False
        self._next_events()


class H2cServer(asyncio.Protocol):
    """HTTP/2 with prior knowledge (no TLS, no Upgrade). Bodies of any size, sent as the
    client's flow control allows. A request with `te: trailers` (as gRPC sends) gets
    trailers: `x-body-bytes`, the response body's size."""

    def __init__(self, pod: str):
        self.pod = pod
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.streams: dict[int, tuple[dict, bytearray]] = {}
        self.sending: dict[int, list] = {}  # stream id -> [body left to send, trailers]

    def connection_made(self, transport):
        self.transport = transport
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())

    def data_received(self, data):
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.transport.write(self.conn.data_to_send())
            self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.streams[event.stream_id] = (dict(event.headers), bytearray())
            elif isinstance(event, h2.events.DataReceived):
                self.streams[event.stream_id][1].extend(event.data)
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                asyncio.get_running_loop().create_task(self._respond(event.stream_id))
            elif isinstance(event, h2.events.StreamReset):
                self.streams.pop(event.stream_id, None)
                self.sending.pop(event.stream_id, None)
            elif isinstance(event, h2.events.WindowUpdated):
                for stream_id in [event.stream_id] if event.stream_id else list(self.sending):
                    self._send_more(stream_id)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.transport.close()
        self.transport.write(self.conn.data_to_send())

    async def _respond(self, stream_id: int):
        request = self.streams.pop(stream_id, None)
        if request is None:
            return  # reset by the client in the same read that ended it
        headers, body = request
        status, payload, delay = route(self.pod, headers[b":method"].decode(), headers[b":path"].decode(),
                                       bytes(body), BEHAVIOUR)
        if delay:
            await asyncio.sleep(delay)
        if self.transport.is_closing():
            return
        trailers = [("x-body-bytes", str(len(payload)))] if headers.get(b"te") == b"trailers" else None
        try:
            self.conn.send_headers(stream_id, [(":status", str(status)), ("content-type", "text/plain"),
                                               ("x-pod", self.pod)])
        except h2.exceptions.ProtocolError:
            return  # the client reset the stream, or ended the connection, while we waited
        self.sending[stream_id] = [memoryview(payload), trailers]
        self._send_more(stream_id)
        self.transport.write(self.conn.data_to_send())

    def _send_more(self, stream_id: int):
        """What the client's windows allow now; the rest when it opens them further."""
        entry = self.sending.get(stream_id)
        if entry is None:
            return
        body, trailers = entry
        try:
            while body:
                window = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
                if window <= 0:
                    entry[0] = body
                    return
                self.conn.send_data(stream_id, bytes(body[:window]))
                body = body[window:]
            if trailers:
                self.conn.send_headers(stream_id, trailers, end_stream=True)
            else:
                self.conn.end_stream(stream_id)
        except h2.exceptions.StreamClosedError:
            pass  # reset by the client in the same read as the window update that woke us
        del self.sending[stream_id]


class EchoServer(asyncio.Protocol):
    def __init__(self, pod: str):
        self.pod = pod

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


class BannerServer(EchoServer):
    """Speaks first, like SMTP or MySQL: a client that waits to be greeted must be."""

    def connection_made(self, transport):
        super().connection_made(transport)
        transport.write(f"220 {self.pod} nodeagent-lab banner ready\r\n".encode())


BEHAVIOUR = Behaviour()  # one per workload process, that is, per pod
SERVERS = {"http": Http1Server, "h2c": H2cServer, "echo": EchoServer, "banner": BannerServer}


async def serve(kind: str, port: int, pod: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SERVERS[kind](pod), host="0.0.0.0", port=port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=sorted(SERVERS))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.kind, args.port, args.name))


if __name__ == "__main__":
    main()
