"""A small blocking HTTP/2 (prior knowledge) client for tests: concurrent streams on one
connection, bodies of any size under flow control, trailers and resets reported.

    python tests/h2_client.py HOST PORT PATH COUNT   # COUNT GETs on one connection: JSON counts
"""

import collections
import json
import socket
import sys
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions


@dataclass
class Response:
    headers: dict = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    trailers: dict = field(default_factory=dict)
    reset: int | None = None  # the error code of a RST_STREAM
    ended: bool = False

    @property
    def status(self) -> int:
        return int(self.headers.get(b":status", b"0"))


class H2Client:
    def __init__(self, host: str, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(16 * 1024 * 1024)
        self.responses: dict[int, Response] = {}
        self.uploads: dict[int, memoryview] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self._flush()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, method: str, path: str, body: bytes = b"", headers=(), authority: str = "test") -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, [(":method", method), (":path", path), (":scheme", "http"),
                                           (":authority", authority), *headers], end_stream=not body)
        self.responses[stream_id] = Response()
        if body:
            self.uploads[stream_id] = memoryview(body)
            self._send_uploads()
        self._flush()
        return stream_id

    def _send_uploads(self) -> None:
        for stream_id, left in list(self.uploads.items()):
            try:
                while left:
                    window = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
                    if window <= 0:
                        break
                    self.conn.send_data(stream_id, bytes(left[:window]))
                    left = left[window:]
                if not left:
                    self.conn.end_stream(stream_id)
            except h2.exceptions.StreamClosedError:
                left = b""  # the server reset it, or answered and stopped reading: nothing more to send
            self.uploads[stream_id] = left
            if not left:
                del self.uploads[stream_id]

    def reset(self, stream_id: int) -> None:
        self.conn.reset_stream(stream_id, 8)  # CANCEL
        self.responses[stream_id].reset = 8
        self.uploads.pop(stream_id, None)
        self._flush()

    def wait(self, *stream_ids: int, headers_only: bool = False) -> list[Response]:
        """Until each stream ended or was reset (or, with headers_only, got its headers)."""
        def finished(r):
            return r.ended or r.reset is not None or (headers_only and r.headers)
        while not all(finished(self.responses[i]) for i in stream_ids):
            if self.closed:
                raise ConnectionError(f"connection closed (goaway: {self.goaway})")
            self._read()
        return [self.responses[i] for i in stream_ids]

    def _read(self) -> None:
        data = self.sock.recv(1024 * 1024)
        if not data:
            self.closed = True
            return
        for event in self.conn.receive_data(data):
            response = self.responses.get(getattr(event, "stream_id", 0))
            if isinstance(event, h2.events.ResponseReceived):
                response.headers = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                response.body += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived):
                response.trailers = dict(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                response.ended = True
            elif isinstance(event, h2.events.StreamReset):
                response.reset = event.error_code
                self.uploads.pop(event.stream_id, None)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event
        self._send_uploads()
        self._flush()

    def close(self) -> None:
        try:
            self.conn.close_connection()
            self._flush()
        except (OSError, h2.exceptions.ProtocolError):
            pass
        self.sock.close()


def count_served(host: str, port: int, path: str, count: int) -> dict:
    """`count` GETs one after another on one connection: how many each pod answered, by status."""
    client = H2Client(host, port)
    seen = collections.Counter()
    for _ in range(count):
        (response,) = client.wait(client.request("GET", path))
        seen[f"{response.headers.get(b'x-pod', b'none').decode()} {response.status}"] += 1
    client.close()
    return dict(seen)


if __name__ == "__main__":
    print(json.dumps(count_served(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))))
