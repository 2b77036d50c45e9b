"""A client that holds connections across its proxy's drain, for tests/test_drain_lab.py.

    python tests/drain_client.py HTTP_IP:PORT ECHO_IP:PORT

Opens an HTTP/1.1 keep-alive connection (one GET) and an opaque echo connection (one round
trip), prints "open", then at each line on stdin:
  "go"    a second GET on the same HTTP connection (its status, its Connection header, whether
          the proxy closed the connection after it) and an echo round trip of 64 KiB, as JSON;
  "close" closes the echo connection and exits.
"""

import json
import os
import socket
import sys


def address(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


def get(sock: socket.socket, host: str) -> tuple[int, dict, bytes]:
    sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {data!r}")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def echo(sock: socket.socket, size: int) -> bool:
    sent = os.urandom(size)
    sock.sendall(sent)
    got = b""
    while len(got) < size:
        chunk = sock.recv(65536)
        if not chunk:
            return False
        got += chunk
    return got == sent


def main() -> None:
    http_at, echo_at = address(sys.argv[1]), address(sys.argv[2])
    http = socket.create_connection(http_at, timeout=10)
    stream = socket.create_connection(echo_at, timeout=10)
    status, _, _ = get(http, http_at[0])
    assert status == 200 and echo(stream, 1024)
    print("open", flush=True)
    for line in sys.stdin:
        if line.strip() == "go":
            status, headers, body = get(http, http_at[0])
            closed_after = http.recv(1) == b""
            print(json.dumps({"status": status, "connection": headers.get("connection"), "body": body.decode(),
                              "closed_after": closed_after, "echo_exact": echo(stream, 64 * 1024)}), flush=True)
        elif line.strip() == "close":
            stream.close()
            print("closed", flush=True)
            return


if __name__ == "__main__":
    main()
