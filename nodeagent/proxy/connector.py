"""Hops, planned and opened: for a source pod and a destination address, which hop
(proxy/hop.py decides), and the connection that carries it.

- PLAIN: a socket created in the source pod's namespace (the destination sees the pod's own
  address), connected as addressed.
- MESH: the same, to the destination pod's mesh port, then mutual TLS as the source's
  ServiceAccount, the server's identity checked, the tunnel header sent (upstream.connect).
  The handshake counts against the source pod's `handshakes` limit while it runs.
- ON_NODE: a socket created in the destination pod's namespace, connected to its app; the
  caller has asked the destination's policy first.
"""

import asyncio
from collections.abc import Callable

from nodeagent.cluster.model import PodInfo
from nodeagent.identity.workload import WorkloadIdentities
from nodeagent.proxy import mesh
from nodeagent.proxy.hop import Hint, Hop, HopKind, plan_hop
from nodeagent.proxy.upstream import Tunnel, connect, open_socket


class HopRefused(ConnectionRefusedError):
    """The plan refused the hop (a proxy port as the destination)."""

    def __init__(self, hop: Hop):
        super().__init__(f"{hop.reason}: {hop.destination.key if hop.destination else ''} port {hop.port}")
        self.reason = hop.reason


class Connector:
    def __init__(self, directory, identities: WorkloadIdentities, sessions: mesh.SessionCache,
                 trust_domain: str, on_node_plaintext: bool, on_handshake: Callable[[bool], None] | None = None):
        """`on_handshake(resumed)`: once each mesh handshake as client is done."""
        self.directory, self.identities, self.sessions = directory, identities, sessions
        self.trust_domain, self.on_node_plaintext = trust_domain, on_node_plaintext
        self.on_handshake = on_handshake

    def plan(self, address: tuple[str, int], destination: PodInfo | None, hint: Hint) -> Hop:
        return plan_hop(address, destination, meshed=self.directory.meshed(destination),
                        served_here=self.directory.served(destination) is not None,
                        on_node_plaintext=self.on_node_plaintext, hint=hint, trust_domain=self.trust_domain)

    def tunnel(self, source, hop: Hop) -> Tunnel | None:
        """How upstream.connect reaches the hop: a Tunnel for MESH, None for PLAIN; HopRefused."""
        if hop.kind is HopKind.REFUSED:
            raise HopRefused(hop)
        if hop.kind is not HopKind.MESH:
            return None
        return Tunnel(hop.connect_to[0], hop.port, hop.hint, self.identities.material(source.identity).client,
                      hop.expected, self.sessions, source.quota, self.on_handshake)

    async def open(self, source, hop: Hop, timeout_s: float, factory) -> tuple[asyncio.Transport, asyncio.Protocol]:
        """The connection for `hop` from `source` (PodContext); ON_NODE needs the destination served here."""
        if hop.kind is HopKind.ON_NODE:
            local = self.directory.served(hop.destination)
            sock = await open_socket(local.netns_path, hop.connect_to, timeout_s)
            return await asyncio.get_running_loop().create_connection(factory, sock=sock)
        return await connect(source.netns_path, hop.connect_to, timeout_s, factory, self.tunnel(source, hop))
