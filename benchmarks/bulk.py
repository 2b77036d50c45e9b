"""Opaque TCP bulk throughput: send N MiB to a discard sink as fast as the path
allows. Run inside a pod: python -m benchmarks.bulk HOST PORT --mib 256; prints JSON."""

import argparse
import json
import socket
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--mib", type=int, default=256)
    args = parser.parse_args()
    chunk = b"\0" * (1 << 20)
    with socket.create_connection((args.host, args.port), timeout=30) as sock:
        start = time.perf_counter()
        for _ in range(args.mib):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # the sink closes once it has read everything
        seconds = time.perf_counter() - start
    print(json.dumps({"mib": args.mib, "seconds": round(seconds, 4), "mib_per_s": round(args.mib / seconds, 1)}))


if __name__ == "__main__":
    main()
