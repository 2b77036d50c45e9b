"""Real gRPC and WebSocket peers for the lab tests, run inside pods:

    python tests/protocol_peers.py grpc-server PORT | ws-server PORT
    python tests/protocol_peers.py grpc-client HOST PORT | ws-client HOST PORT

gRPC uses generic handlers on raw bytes (no protoc needed): a unary echo and a
bidirectional stream; its status travels in HTTP/2 trailers, so a call that
succeeds proves the trailers arrived. The WebSocket pair is the `websockets`
library's real handshake and framing.
"""

import asyncio
import json
import sys
from concurrent import futures


def grpc_server(port: int) -> None:
    import grpc

    def unary(request, context):
        return b"echo:" + request

    def stream(requests, context):
        for request in requests:
            yield b"stream:" + request

    handler = grpc.method_handlers_generic_handler("lab.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.stream_stream_rpc_method_handler(stream),
    })
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    server.wait_for_termination()


def grpc_client(host: str, port: int) -> dict:
    import grpc

    with grpc.insecure_channel(f"{host}:{port}") as channel:
        unary = channel.unary_unary("/lab.Echo/Unary")(b"hello", timeout=10)
        replies = list(channel.stream_stream("/lab.Echo/Stream")(iter([b"a", b"b", b"c"]), timeout=10))
    return {"unary": unary.decode(), "stream": [r.decode() for r in replies]}


def ws_server(port: int) -> None:
    import websockets

    async def echo(connection):
        async for message in connection:
            await connection.send(message)

    async def main():
        async with websockets.serve(echo, "0.0.0.0", port):
            await asyncio.Future()

    asyncio.run(main())


def ws_client(host: str, port: int) -> dict:
    import websockets

    async def main():
        async with websockets.connect(f"ws://{host}:{port}/", open_timeout=10) as connection:
            echoed = []
            for message in ("one", "two", "x" * 100000):
                await connection.send(message)
                echoed.append(await connection.recv())
            return {"echoed": [m if len(m) < 10 else f"{len(m)} chars" for m in echoed]}

    return asyncio.run(main())


if __name__ == "__main__":
    role = sys.argv[1]
    if role.endswith("server"):
        {"grpc-server": grpc_server, "ws-server": ws_server}[role](int(sys.argv[2]))
    else:
        print(json.dumps({"grpc-client": grpc_client, "ws-client": ws_client}[role](sys.argv[2], int(sys.argv[3]))))
