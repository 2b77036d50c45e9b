"""The far end of a same-node hop (hop.py's ON_NODE), done by the near end: when both pods are
this proxy's, the proxy is both ends, and what a mesh hop's destination would do on accepting
the tunnel is done here, once per connection the hop opens (an opaque client connection, or a
pooled HTTP/1 or shared HTTP/2 connection to the destination's app):

- the destination's policy is asked with the source's identity (the kernel said which pod the
  connection came from: the same fact that picks the client certificate on a mesh hop);
- the connection is admitted into the destination's inbound share and counted there under the
  source's identity with tls=false (no TLS is used: no byte leaves the proxy or the two pods'
  own namespaces);
- a policy change that stops admitting the source ends it, as it ends a mesh connection.

The app is then reached from inside the destination's namespace at its IP (connector.open),
as inbound does.
"""

from nodeagent.policy.authz import Client
from nodeagent.proxy.connection import Connection, Direction, Phase


class OnNodeRefused(ConnectionRefusedError):
    """The destination does not take the connection: `status` and `reason` for an HTTP client
    (the 403 a mesh hop's far end would answer, or a 502 for a full share)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def admit(deps, source, hop) -> Connection:
    """The destination's inbound Connection for a new on-node connection from `source` (its
    PodContext); OnNodeRefused if its policy or its share refuses. The caller holds the app's
    transport on it, sets `revoke`, and closes it when the connection ends."""
    local = deps.directory.served(hop.destination)
    client = Client(source.info.ip, source.identity.uri)
    if not deps.authorizer.authorize(local, hop.port, client).allowed:
        raise OnNodeRefused(403, "unauthorized")
    inbound = deps.connections.admit(local, Direction.INBOUND, Phase.AUTHORIZING)
    if inbound is None:  # the destination's share is full (counted and logged by the table)
        raise OnNodeRefused(502, "destination's inbound limit")
    inbound.label(deps.observers.metrics, client.identity, False)
    inbound.peer, inbound.port = client, hop.port
    return inbound
