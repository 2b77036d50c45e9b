"""A client that holds and opens echo connections on command, for tests/test_live_settings_lab.py.

    python tests/settings_client.py

At each line on stdin it prints one line:
  "open NAME IP:PORT"  connect, one echo round trip: "ok" (the connection is kept as NAME) or
                       "refused: WHY" (reset, closed, or no echo);
  "echo NAME"          one more round trip on NAME: "ok" or "failed: WHY";
  "close NAME"         "closed".
"""

import os
import socket
import sys

TIMEOUT_S = 5.0


def round_trip(sock: socket.socket) -> None:
    sent = os.urandom(32)
    sock.sendall(sent)
    got = b""
    while len(got) < len(sent):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the peer")
        got += chunk
    if got != sent:
        raise ConnectionError("other bytes came back")


def main() -> None:
    held: dict[str, socket.socket] = {}
    for line in sys.stdin:
        command, name, *rest = line.split() + [""]
        if command == "open":
            host, port = rest[0].rsplit(":", 1)
            try:
                sock = socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
                round_trip(sock)
                held[name] = sock
                answer = "ok"
            except OSError as e:
                answer = f"refused: {e!r}"
        elif command == "echo":
            try:
                round_trip(held[name])
                answer = "ok"
            except OSError as e:
                answer = f"failed: {e!r}"
        elif command == "close":
            held.pop(name).close()
            answer = "closed"
        else:
            answer = f"unknown command {command!r}"
        print(answer, flush=True)


if __name__ == "__main__":
    main()
