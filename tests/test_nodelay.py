"""The proxy sets no TCP_NODELAY itself: the event loop does, on every TCP transport it makes
(accepted or connected). A small write (a TLS flight, a tunnel header, an HTTP head) must not
wait for the peer's delayed ACK (40 ms); this holds the loop to it (a setsockopt per connection
saved: benchmarks/README.md, "A new connection per request")."""

import asyncio
import socket

import uvloop


def nodelay(transport) -> int:
    return transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


async def both_ends() -> tuple[int, int]:
    loop = asyncio.get_running_loop()
    accepted = loop.create_future()

    class Server(asyncio.Protocol):
        def connection_made(self, transport):
            accepted.set_result(nodelay(transport))
            transport.close()

    server = await loop.create_server(Server, "127.0.0.1", 0)
    sock = socket.socket()  # as upstream.open_socket: a socket of ours, connected, then given to the loop
    sock.setblocking(False)
    await loop.sock_connect(sock, server.sockets[0].getsockname())
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=sock)
    connected = nodelay(transport)
    result = await asyncio.wait_for(accepted, 5), connected
    transport.close()
    server.close()
    return result


def test_the_loop_sets_nodelay_on_accepted_and_connected_sockets():
    accepted, connected = uvloop.run(both_ends())
    assert accepted and connected
