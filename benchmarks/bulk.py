"""Opaque TCP bulk throughput, both ways. Run inside pods; the clients print JSON.

  python -m benchmarks.bulk upload HOST PORT --mib 256    send to a discard sink
  python -m benchmarks.bulk download HOST PORT --mib 256  ask `serve` for N MiB, read to the end
  python -m benchmarks.bulk serve PORT                    the download server (one byte in, N MiB out)

A download is a request and then a stream: the shape of a fetch from a cache,
a database dump or an object store, and the case where the sender starts only
once asked (which the kernel splice can take from the first byte).
"""

import argparse
import json
import socket
import struct
import threading
import time

CHUNK = 1 << 20


def upload(host: str, port: int, mib: int) -> dict:
    chunk = b"\0" * CHUNK
    with socket.create_connection((host, port), timeout=30) as sock:
        start = time.perf_counter()
        for _ in range(mib):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # the sink closes once it has read everything
        return _result(mib, time.perf_counter() - start)


def download(host: str, port: int, mib: int) -> dict:
    buffer = memoryview(bytearray(CHUNK))
    received = 0
    with socket.create_connection((host, port), timeout=30) as sock:
        start = time.perf_counter()
        sock.sendall(struct.pack("!I", mib))
        while count := sock.recv_into(buffer):
            received += count
        seconds = time.perf_counter() - start
    if received != mib * CHUNK:
        raise SystemExit(f"download: got {received} bytes of {mib * CHUNK}")
    return _result(mib, seconds)


def _result(mib: int, seconds: float) -> dict:
    return {"mib": mib, "seconds": round(seconds, 4), "mib_per_s": round(mib / seconds, 1)}


def serve(port: int) -> None:
    chunk = b"\0" * CHUNK
    listener = socket.create_server(("0.0.0.0", port), reuse_port=False)

    def one(conn: socket.socket) -> None:
        with conn:
            wanted = b""
            while len(wanted) < 4 and (more := conn.recv(4 - len(wanted))):
                wanted += more
            if len(wanted) == 4:
                for _ in range(struct.unpack("!I", wanted)[0]):
                    conn.sendall(chunk)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=one, args=(conn,), daemon=True).start()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("upload", "download"):
        client = sub.add_parser(name)
        client.add_argument("host")
        client.add_argument("port", type=int)
        client.add_argument("--mib", type=int, default=256)
    sub.add_parser("serve").add_argument("port", type=int)
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.port)
    else:
        print(json.dumps((upload if args.command == "upload" else download)(args.host, args.port, args.mib)))


if __name__ == "__main__":
    main()
