"""Mesh tunnels to a node of two proxy processes, with and without the agent's shared ticket
keys (proxy/tickets.py): how many resume, and the CPU per tunnel on both sides.

    python -m benchmarks.ticket_sharing [TUNNELS] [ROUNDS]

Two server processes, each with its server context built as a proxy process builds it
(WorkloadIdentities; the agent's ticket secret or OpenSSL's own random keys) and the
proxy's TLS (tls.handshake, on its handshake threads), on loopback. The client (this
process, as a source agent: mesh.client_handshake with its SessionCache) sends each tunnel
to one of them at random, as SO_REUSEPORT's hash spreads a client's connections. Per mode,
the median of ROUNDS rounds of TUNNELS tunnels, with the range; CPU from /proc (all threads).
"""

import asyncio
import json
import os
import pickle
import random
import statistics
import subprocess
import sys
import time

from nodeagent.identity import naming
from nodeagent.identity.ca import Authority, issuer_from_pem
from nodeagent.identity.workload import WorkloadIdentities
from nodeagent.proxy import mesh, tickets
from nodeagent.proxy.relay import Holding
from nodeagent.proxy.tls import handshake

SERVER, CLIENT = naming.of_pod("default", "server"), naming.of_pod("default", "client")
SERVER_LIFETIME_S = 600  # a server process never outlives a run that forgot it


class Answer(asyncio.Protocol):
    """The server side of a tunnel: one byte back for the header and ping."""

    def __init__(self, context):
        self.context = context

    def connection_made(self, transport):
        asyncio.get_running_loop().create_task(self.serve(transport))

    async def serve(self, raw):
        try:
            self.tls = await handshake(raw, self, self.context, True, 5)
        except (OSError, asyncio.TimeoutError) as e:
            print(f"handshake failed: {e!r}", file=sys.stderr)

    def data_received(self, data):
        self.tls.write(b"k")

    def eof_received(self):
        return False


def serve() -> None:
    """One server process: stdin a pickle (anchors, issuer chain, issuer key, secret or None)."""
    anchors, issuer_crt, issuer_key, secret = pickle.load(sys.stdin.buffer)
    identities = WorkloadIdentities(*issuer_from_pem(anchors, issuer_crt, issuer_key))
    identities.allow({SERVER})
    if secret is not None:
        identities.use_ticket_secret(tickets.TicketSecret(secret))
    context = identities.material(SERVER).server

    async def run():
        listener = await asyncio.get_running_loop().create_server(lambda: Answer(context), "127.0.0.1", 0)
        print(listener.sockets[0].getsockname()[1], flush=True)
        await asyncio.sleep(SERVER_LIFETIME_S)

    asyncio.run(run())


def cpu_s(pid: int) -> float:
    """A process's user + system CPU, all its threads."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_servers(anchor: Authority, issuer: Authority, secret) -> list[tuple[subprocess.Popen, int]]:
    servers = []
    for _ in range(2):
        popen = subprocess.Popen([sys.executable, "-m", "benchmarks.ticket_sharing", "serve"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        popen.stdin.write(pickle.dumps((anchor.certificate_pem(), issuer.chain_pem(), issuer.key_pem(),
                                        secret.value if secret else None)))
        popen.stdin.close()
        servers.append((popen, int(popen.stdout.readline())))
    return servers


async def round_of(n: int, ports: list[int], pids: list[int], client_context, pick: random.Random) -> dict:
    sessions = mesh.SessionCache()
    loop = asyncio.get_running_loop()
    resumed = 0
    client_cpu, server_cpu = time.process_time(), sum(cpu_s(pid) for pid in pids)
    for _ in range(n):
        transport, holding = await loop.create_connection(Holding, "127.0.0.1", pick.choice(ports))
        tls = await mesh.client_handshake(transport, holding, client_context, SERVER, 9000, 0, 5, sessions,
                                          "the node")  # one destination: whichever process takes it
        resumed += tls.get_extra_info("ssl_object").session_reused
        tls.write(b"p" * 8)
        while not holding.buffer:
            await asyncio.sleep(0.0005)
        tls.close()
    await asyncio.sleep(0.2)  # the servers' last closes
    return {"resumed_share": resumed / n,
            "client_cpu_ms_each": (time.process_time() - client_cpu) / n * 1000,
            "servers_cpu_ms_each": (sum(cpu_s(pid) for pid in pids) - server_cpu) / n * 1000}


def summary(rounds: list[dict]) -> dict:
    """Each measure as "median (min-max)" over the rounds."""
    return {key: "{:.2f} ({:.2f}-{:.2f})".format(statistics.median(r[key] for r in rounds),
                                                 min(r[key] for r in rounds), max(r[key] for r in rounds))
            for key in rounds[0]}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    anchor = Authority.new_anchor("cluster.local")
    issuer = anchor.new_issuer("cluster.local")
    client = WorkloadIdentities(issuer, anchor.certificate_pem())
    client.allow({CLIENT})
    client_context = client.material(CLIENT).client
    report = {"tunnels_per_round": n, "rounds": count, "server_processes": 2}
    for mode, secret in (("own keys per process", None), ("the agent's shared keys", tickets.TicketSecret.new())):
        servers = start_servers(anchor, issuer, secret)
        try:
            pick = random.Random(1)
            rounds = [asyncio.run(round_of(n, [port for _, port in servers], [p.pid for p, _ in servers],
                                           client_context, pick)) for _ in range(count)]
        finally:
            for popen, _ in servers:
                popen.kill()
                popen.wait()
        report[mode] = summary(rounds)
    print(json.dumps(report))


if __name__ == "__main__":
    serve() if sys.argv[1:2] == ["serve"] else main()
