"""Traffic probes run inside a pod: `python -m nodeagent.lab.client KIND HOST PORT`.

Each probe talks to one of the lab's sample servers, checks the answer, and
prints one JSON line: {"kind", "ok", "detail", "ms"} where `ms` is the time of
the whole exchange (for banner: time to the first byte).
"""

import argparse
import hashlib
import http.client
import json
import os
import socket
import threading
import time

import h2.connection
import h2.events
import h2.exceptions

TIMEOUT_S = 5.0


def probe_http(host: str, port: int, requests: int = 10) -> str:
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
    try:
        for _ in range(requests):  # one keep-alive connection
            conn.request("GET", "/")
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise RuntimeError(f"status {response.status}")
        return f"{requests} requests on one connection, served by {response.getheader('x-pod')}: {body.decode().strip()!r}"
    finally:
        conn.close()


def probe_h2c(host: str, port: int) -> str:
    with socket.create_connection((host, port), timeout=TIMEOUT_S) as sock:
        conn = h2.connection.H2Connection()
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, [(":method", "GET"), (":path", "/"), (":scheme", "http"),
                                   (":authority", f"{host}:{port}")], end_stream=True)
        sock.sendall(conn.data_to_send())
        status, body = None, bytearray()
        while True:
            data = sock.recv(65536)
            if not data:
                raise RuntimeError("connection closed before the response ended")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers)[b":status"].decode()
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    if status != "200":
                        raise RuntimeError(f"status {status}")
                    return f"HTTP/2 stream {stream}: {body.decode().strip()!r}"
            sock.sendall(conn.data_to_send())


def probe_echo(host: str, port: int, size: int = 1 << 20) -> str:
    payload = os.urandom(size)
    with socket.create_connection((host, port), timeout=TIMEOUT_S) as sock:

        def send():  # while the main thread reads: an echo fills both ways at once
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        digest, received = hashlib.sha256(), 0
        while chunk := sock.recv(1 << 16):
            digest.update(chunk)
            received += len(chunk)
        sender.join()
    if digest.digest() != hashlib.sha256(payload).digest():
        raise RuntimeError(f"echo mismatch: sent {size} bytes, got {received} back")
    return f"{size} bytes echoed, sha256 matches"


def probe_banner(host: str, port: int) -> str:
    with socket.create_connection((host, port), timeout=TIMEOUT_S) as sock:
        line = sock.makefile("rb").readline()
    if not line.startswith(b"220 "):
        raise RuntimeError(f"unexpected greeting {line!r}")
    return f"greeted first: {line.decode().strip()!r}"


PROBES = {"http": probe_http, "h2c": probe_h2c, "echo": probe_echo, "banner": probe_banner}


def run(kind: str, host: str, port: int, **options) -> dict:
    start = time.perf_counter()
    try:
        detail, ok = PROBES[kind](host, port, **options), True
    except (OSError, RuntimeError, h2.exceptions.ProtocolError) as e:
        detail, ok = f"{type(e).__name__}: {e}", False
    return {"kind": kind, "ok": ok, "detail": detail, "ms": round((time.perf_counter() - start) * 1000, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=sorted(PROBES))
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--size", type=int, help="echo: bytes to send")
    args = parser.parse_args()
    result = run(args.kind, args.host, args.port, **({"size": args.size} if args.size else {}))
    print(json.dumps(result))
    raise SystemExit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
