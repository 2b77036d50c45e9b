"""The proxy's listeners in a pod: opening them, and closing them without resetting a connection.

Every listener is in a SO_REUSEPORT group: the agent's worker processes each listen on the same
ports (the kernel spreads the connections over the group, sk_lookup's assignment too), and at an
upgrade the successor joins the group before the old agent leaves it. The cost: a root process
of the pod (the agent's uid) can join its own pod's group too and, with SO_ATTACH_REUSEPORT_CBPF,
take all of its connections (README, "Upgrades"); never another pod's.

Closing a listening socket resets every connection still in its accept queue (the kernel has
completed their handshakes: the clients think they are connected), unless the namespace has
`net.ipv4.tcp_migrate_req` on: then the kernel moves them, and handshakes still in progress, to
another listener of the group (a successor's). The agent turns it on in every pod it enrols. A
draining proxy also keeps accepting until each listener's queue has been seen empty twice in a
row, or until a bound (no successor: the pods fail closed either way).
"""

import asyncio
import socket
import struct

from nodeagent import netns

BACKLOG = 4096
QUEUE_CHECK_S = 0.05
# struct tcp_info: 8 bytes of u8 fields, then rto, ato, snd_mss, rcv_mss, unacked: for a
# listening socket the kernel reports its accept queue's length in tcpi_unacked.
_UNACKED = struct.Struct("I")
_UNACKED_OFFSET = 24


MIGRATE_SYSCTL = "/proc/sys/net/ipv4/tcp_migrate_req"


def open_listener(netns_path: str, port: int, host: str = "127.0.0.1") -> socket.socket:
    with netns.entered(netns_path):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


def migrate_queues(netns_path: str) -> None:
    """In the pod's namespace, a closing listener hands what is queued on it to the rest of its
    reuseport group instead of resetting it (Linux 5.14). /proc/sys/net is the opening thread's
    namespace's."""
    with netns.entered(netns_path):
        with open(MIGRATE_SYSCTL, "w") as sysctl:
            sysctl.write("1")


def accept_queue(sock) -> int:
    """Connections waiting in a listening socket's accept queue."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _UNACKED_OFFSET + _UNACKED.size)
    return _UNACKED.unpack_from(info, _UNACKED_OFFSET)[0]


def _queued(server: asyncio.AbstractServer) -> int:
    return sum(accept_queue(sock) for sock in server.sockets or ())


async def close_when_drained(servers: list[asyncio.AbstractServer], bound_s: float) -> int:
    """Close each server once its accept queue was empty at two checks in a row, or after
    `bound_s`; how many were closed with connections still queued (those were reset)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound_s
    seen_empty: set = set()
    pending = set(servers)
    forced = 0
    while pending:
        await asyncio.sleep(QUEUE_CHECK_S)  # the event loop accepts meanwhile
        late = loop.time() >= deadline
        for server in list(pending):
            queued = _queued(server)
            if (queued == 0 and server in seen_empty) or late:
                forced += queued > 0
                server.close()
                pending.discard(server)
            elif queued == 0:
                seen_empty.add(server)
            else:
                seen_empty.discard(server)
    return forced
