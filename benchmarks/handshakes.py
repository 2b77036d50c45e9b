"""The cost of one mesh tunnel's mutual-TLS handshake, full and resumed, both ends in one
process on loopback (as for two pods on one node): `python -m benchmarks.handshakes [N]`."""

import asyncio
import json
import sys
import time

from nodeagent.identity import naming
from nodeagent.identity.ca import Authority
from nodeagent.identity.workload import WorkloadIdentities
from nodeagent.proxy import mesh
from nodeagent.proxy.relay import Holding
from nodeagent.proxy.tls import handshake

SERVER, CLIENT = naming.of_pod("default", "server"), naming.of_pod("default", "client")


class Server(asyncio.Protocol):
    def __init__(self, context):
        self.context = context

    def connection_made(self, transport):
        asyncio.get_running_loop().create_task(self.serve(transport))

    async def serve(self, raw):
        self.tls = await handshake(raw, self, self.context, True, 5)

    def data_received(self, data):
        self.tls.write(b"k")


async def tunnels(n: int, sessions) -> dict:
    anchor = Authority.new_anchor("cluster.local")
    issuer = anchor.new_issuer("cluster.local")
    server, client = (WorkloadIdentities(issuer, anchor.certificate_pem()) for _ in range(2))
    server.allow({SERVER})
    client.allow({CLIENT})
    server_context, client_context = server.material(SERVER).server, client.material(CLIENT).client
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: Server(server_context), "127.0.0.1", 0)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):
        transport, holding = await loop.create_connection(Holding, *listener.sockets[0].getsockname())
        tls = await mesh.client_handshake(transport, holding, client_context, SERVER, 9000, 0, 5, sessions, "s")
        tls.write(b"p" * 8)
        while not holding.buffer:
            await asyncio.sleep(0)
        tls.close()
    result = {"tunnels": n, "cpu_ms_each": round((time.process_time() - cpu) / n * 1000, 2),
              "wall_ms_each": round((time.perf_counter() - wall) / n * 1000, 2)}
    listener.close()
    return result


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    print(json.dumps({"full": asyncio.run(tunnels(n, None)), "resumed": asyncio.run(tunnels(n, mesh.SessionCache()))}))


if __name__ == "__main__":
    main()
