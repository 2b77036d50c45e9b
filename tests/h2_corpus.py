"""Records the seed corpus of the HTTP/2 fuzz test (tests/data/h2corpus/): what real clients
(curl, h2load, grpcio, h2) and real servers (the lab's h2c server, grpcio) send, captured by a
relay on 127.0.0.1 between them. Each capture is two files: `<name>.client` (client to server,
starting with the preface) and `<name>.server`.

    python tests/h2_corpus.py    # rewrites tests/data/h2corpus/
"""

import asyncio
import os
import pathlib
import subprocess
import sys
import threading
from concurrent import futures

CORPUS = pathlib.Path(__file__).parent / "data" / "h2corpus"


class Relay:
    """Forwards one connection at a time to `upstream`, keeping both directions' bytes."""

    def __init__(self, loop, upstream):
        self.loop, self.upstream = loop, upstream
        self.captured: list[tuple[bytearray, bytearray]] = []

    async def serve(self, reader, writer):
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        sent, received = bytearray(), bytearray()
        self.captured.append((sent, received))

        async def pipe(src, dst, into):
            while data := await src.read(65536):
                into += data
                dst.write(data)
                await dst.drain()
            dst.close()
        await asyncio.gather(pipe(reader, up_writer, sent), pipe(up_reader, writer, received),
                             return_exceptions=True)


def main() -> None:
    sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))
    import grpc

    from nodeagent.lab.workloads import SERVERS
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def run(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(30)

    async def listen(factory):
        server = await loop.create_server(factory, "127.0.0.1", 0)
        return server.sockets[0].getsockname()

    app = run(listen(lambda: SERVERS["h2c"]("corpus")))
    grpc_server = grpc.server(futures.ThreadPoolExecutor(2))
    grpc_server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(lambda request, context: request),
        "Stream": grpc.stream_stream_rpc_method_handler(lambda requests, context: (r for r in requests))}),))
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    CORPUS.mkdir(parents=True, exist_ok=True)

    def capture(name, upstream, client):
        relay = Relay(loop, upstream)

        async def start():
            server = await asyncio.start_server(relay.serve, "127.0.0.1", 0)
            return server, server.sockets[0].getsockname()[1]
        server, port = run(start())
        client(port)
        run(asyncio.sleep(0.3))
        server.close()
        for n, (sent, received) in enumerate(relay.captured):
            (CORPUS / f"{name}-{n}.client").write_bytes(bytes(sent))
            (CORPUS / f"{name}-{n}.server").write_bytes(bytes(received))

    def curl(port):
        for args in (["-d", "hello body"], ["-H", "x-a: b"]):
            subprocess.run(["curl", "-sS", "--http2-prior-knowledge", *args, "-o", os.devnull,
                            f"http://127.0.0.1:{port}/bytes/3000"], check=True, timeout=10)

    def h2load(port):
        subprocess.run(["h2load", "-n", "20", "-c", "1", "-m", "4", f"http://127.0.0.1:{port}/bytes/100"],
                       check=True, timeout=20, capture_output=True)

    def h2(port):
        from h2_client import H2Client
        client = H2Client("127.0.0.1", port)
        streams = [client.request("POST", "/", body=b"x" * 70000), client.request("GET", "/bytes/20000"),
                   client.request("GET", "/bytes/5", headers=[("te", "trailers")])]
        client.wait(*streams)
        cancelled = client.request("GET", "/delay/500")
        client.reset(cancelled)
        client.close()

    def grpc_client(port):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            channel.unary_unary("/t.Echo/Unary")(b"\x01" * 5000, timeout=10)
            list(channel.stream_stream("/t.Echo/Stream")(iter([b"a", b"bb", b"c" * 3000]), timeout=10))

    capture("curl", app, curl)
    capture("h2load", app, h2load)
    capture("h2", app, h2)
    capture("grpc", ("127.0.0.1", grpc_port), grpc_client)
    grpc_server.stop(0)
    print("\n".join(sorted(f"{p.name} {p.stat().st_size}" for p in CORPUS.iterdir())))


if __name__ == "__main__":
    main()
