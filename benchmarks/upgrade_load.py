"""Traffic that must not notice an agent upgrade, run inside a lab pod for a fixed time:

    python -m benchmarks.upgrade_load keepalive HOST PORT SECONDS   # HTTP/1.1 on one kept-alive connection
    python -m benchmarks.upgrade_load fresh HOST PORT SECONDS       # a new connection per request
    python -m benchmarks.upgrade_load echo HOST PORT SECONDS        # one opaque TCP stream, byte-checked
    python -m benchmarks.upgrade_load h2 HOST PORT SECONDS          # HTTP/2 (prior knowledge), 8 streams at once
    python -m benchmarks.upgrade_load first HOST PORT SECONDS       # a GET on a new connection every 5 ms
                                                                    # until one is answered (its CLOCK_MONOTONIC)

Each prints one JSON line at the end. Requests are paced (RATE per second) so that a 2-core
machine has room for the agents. `keepalive` behaves as a well-behaved client: a response with
`Connection: close` (a draining proxy's) ends the connection and the next request opens a new
one. Counted as failed: any request without a 2xx answer; as resets: ECONNRESET or a connection
closed before its whole answer (or, for `echo`, before the stream's end).
"""

import json
import os
import socket
import sys
import time

RATE = {"keepalive": 200, "fresh": 50, "echo": 50, "h2": 200}
ECHO_CHUNK = 4096
H2_STREAMS = 8  # in flight at once on the current connection


def _response(sock: socket.socket) -> tuple[int, bool]:
    """(status, whether the server closes after it); ConnectionError if it ends before."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response head")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").lower().split("\r\n")
    headers = dict(line.split(":", 1) for line in lines[1:])
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed inside the response body")
        body += chunk
    return int(lines[0].split()[1]), headers.get("connection", "").strip() == "close"


def http(kind: str, host: str, port: int, seconds: float) -> dict:
    counts = {"kind": kind, "requests": 0, "failed": 0, "resets": 0, "connections": 0, "errors": []}
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\n{'Connection: close' + chr(13) + chr(10) if kind == 'fresh' else ''}\r\n"
    sock = None
    end = time.monotonic() + seconds
    next_due = time.monotonic()
    while time.monotonic() < end:
        next_due += 1 / RATE[kind]
        time.sleep(max(0.0, next_due - time.monotonic()))
        counts["requests"] += 1
        try:
            if sock is None:
                sock = socket.create_connection((host, port), timeout=10)
                counts["connections"] += 1
            sock.sendall(request.encode())
            status, closing = _response(sock)
            if not 200 <= status < 300:
                counts["failed"] += 1
                counts["errors"].append(f"status {status}")
            if closing or kind == "fresh":
                sock.close()
                sock = None
        except OSError as e:
            counts["failed"] += 1
            counts["resets"] += isinstance(e, ConnectionResetError) or "closed" in str(e)
            if len(counts["errors"]) < 20:
                counts["errors"].append(f"{type(e).__name__}: {e}")
            if sock is not None:
                sock.close()
            sock = None
    if sock is not None:
        sock.close()
    return counts


def echo(host: str, port: int, seconds: float) -> dict:
    counts = {"kind": "echo", "bytes": 0, "exact": True, "failed": 0, "resets": 0, "errors": []}
    end = time.monotonic() + seconds
    try:
        with socket.create_connection((host, port), timeout=10) as sock:
            while time.monotonic() < end:
                sent = os.urandom(ECHO_CHUNK)
                sock.sendall(sent)
                got = b""
                while len(got) < len(sent):
                    chunk = sock.recv(len(sent) - len(got))
                    if not chunk:
                        raise ConnectionError("the stream closed before its end")
                    got += chunk
                counts["exact"] = counts["exact"] and got == sent
                counts["bytes"] += len(got)
                time.sleep(1 / RATE["echo"])
    except OSError as e:
        counts["failed"] = 1
        counts["resets"] = int(isinstance(e, ConnectionResetError) or "closed" in str(e))
        counts["errors"].append(f"{type(e).__name__}: {e}")
    return counts


def first(host: str, port: int, seconds: float) -> dict:
    """Waits for the mesh to serve again (benchmarks/restart.py): the clock is the machine's, the
    same in every namespace."""
    end = time.monotonic() + seconds
    attempts = 0
    while time.monotonic() < end:
        attempts += 1
        try:
            with socket.create_connection((host, port), timeout=0.5) as sock:
                sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                if 200 <= _response(sock)[0] < 300:
                    return {"kind": "first", "served_at": time.monotonic(), "attempts": attempts}
        except OSError:
            pass
        time.sleep(0.005)
    return {"kind": "first", "served_at": None, "attempts": attempts}


class H2Connection:
    """One HTTP/2 connection of the `h2` client, and the streams it carries."""

    def __init__(self, host: str, port: int):
        import h2.config
        import h2.connection

        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setblocking(False)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        # python-h2 takes a received GOAWAY for the end of the connection and refuses the frames of
        # the streams that go on below its last stream id; RFC 9113 (6.8) has them finish: stay open.
        machine = self.h2.state_machine
        open_ = h2.connection.ConnectionState.CLIENT_OPEN
        machine._transitions = {**machine._transitions,
                                (open_, h2.connection.ConnectionInputs.RECV_GOAWAY): (None, open_)}
        self.h2.initiate_connection()
        self.streams: dict[int, int] = {}  # stream id -> status (0 until the head)
        self.last_stream_id: int | None = None  # of the GOAWAY received: no new stream goes here
        self.host = host
        self.flush()

    def request(self) -> None:
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, [(":method", "GET"), (":path", "/"), (":scheme", "http"),
                                         (":authority", self.host)], end_stream=True)
        self.streams[stream_id] = 0
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.setblocking(True)
            self.sock.sendall(data)
            self.sock.setblocking(False)


def h2_client(host: str, port: int, seconds: float) -> dict:
    """A well-behaved HTTP/2 client (RFC 9113, 6.8): after a GOAWAY it opens no stream on that
    connection, lets the streams up to its last stream id finish there and sends those above it
    (and any refused with REFUSED_STREAM: not processed) again on a new connection."""
    import select

    import h2.events

    counts = {"kind": "h2", "requests": 0, "failed": 0, "resets": 0, "connections": 0, "sent_again": 0,
              "goaways": 0, "errors": []}
    live: list[H2Connection] = []
    owed = 0  # requests to send again
    end = time.monotonic() + seconds
    next_due = time.monotonic()

    def fail(reason: str, reset: bool = False) -> None:
        counts["failed"] += 1
        counts["resets"] += reset
        if len(counts["errors"]) < 20:
            counts["errors"].append(reason)

    give_up = end + 30  # what is owed or in flight by then has failed
    while (time.monotonic() < end or owed or any(c.streams for c in live)) and time.monotonic() < give_up:
        current = live[-1] if live and live[-1].last_stream_id is None else None
        now = time.monotonic()
        if current is None and (owed or now < end):
            try:
                current = H2Connection(host, port)
            except OSError as e:
                fail(f"connect: {e}")
                owed = max(owed - 1, 0)
                time.sleep(0.01)
                continue
            live.append(current)
            counts["connections"] += 1
        while current is not None and len(current.streams) < H2_STREAMS and (owed or (now < end and now >= next_due)):
            if owed:
                owed -= 1
            else:
                counts["requests"] += 1
                next_due += 1 / RATE["h2"]
            current.request()
        readable, _, _ = select.select([c.sock for c in live], [], [], 0.005)
        for conn in [c for c in live if c.sock in readable]:
            try:
                data = conn.sock.recv(65536)
            except ConnectionResetError:
                data = None
            if not data:
                for stream_id in conn.streams:
                    if conn.last_stream_id is not None and stream_id > conn.last_stream_id:
                        owed += 1
                        counts["sent_again"] += 1
                    else:
                        fail(f"stream {stream_id}: connection closed before its response", reset=True)
                conn.streams.clear()
                conn.sock.close()
                live.remove(conn)
                continue
            for event in conn.h2.receive_data(data):
                stream_id = getattr(event, "stream_id", None)
                if isinstance(event, h2.events.ResponseReceived):
                    conn.streams[stream_id] = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    conn.h2.acknowledge_received_data(event.flow_controlled_length, stream_id)
                elif isinstance(event, h2.events.StreamEnded) and stream_id in conn.streams:
                    status = conn.streams.pop(stream_id)
                    if not 200 <= status < 300:
                        fail(f"status {status}")
                elif isinstance(event, h2.events.StreamReset) and stream_id in conn.streams:
                    conn.streams.pop(stream_id)
                    if event.error_code == 7:  # REFUSED_STREAM: not processed, safe to send again
                        owed += 1
                        counts["sent_again"] += 1
                    else:
                        fail(f"stream {stream_id} reset ({event.error_code})", reset=True)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    counts["goaways"] += 1
                    last = event.last_stream_id
                    conn.last_stream_id = last if conn.last_stream_id is None else min(last, conn.last_stream_id)
                    for refused in [i for i in conn.streams if i > conn.last_stream_id]:
                        conn.streams.pop(refused)
                        owed += 1
                        counts["sent_again"] += 1
            conn.flush()
        for conn in [c for c in live if c.last_stream_id is not None and not c.streams]:
            conn.sock.close()
            live.remove(conn)
    for _ in range(owed + sum(len(c.streams) for c in live)):
        fail("no response 30 s after the end")
    for conn in live:
        conn.sock.close()
    return counts


KINDS = {"echo": echo, "first": first, "h2": h2_client}


def main() -> None:
    kind, host, port, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    result = KINDS[kind](host, port, seconds) if kind in KINDS else http(kind, host, port, seconds)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
