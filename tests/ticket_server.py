"""A mesh-port stand-in in a process of its own, for tests/test_ticket_keys.py: the server
context built as a proxy process builds it (WorkloadIdentities, the agent's ticket secret if
given), a TLS server on loopback answering each client "pong" and R (resumed) or F (full).

stdin: a pickle (anchors, issuer_crt, issuer_key, secret bytes or None); stdout: the port.
Bounded: it exits after MAX_CONNECTIONS or LIFETIME_S, whichever comes first."""

import pickle
import signal
import socket
import sys

from nodeagent.identity import naming
from nodeagent.identity.ca import issuer_from_pem
from nodeagent.identity.workload import WorkloadIdentities
from nodeagent.proxy.tickets import TicketSecret

SERVER = naming.of_pod("default", "echo")
MAX_CONNECTIONS, LIFETIME_S = 50, 60


def main() -> None:
    signal.alarm(LIFETIME_S)  # never outlives a test that forgot it
    anchors, issuer_crt, issuer_key, secret = pickle.load(sys.stdin.buffer)
    identities = WorkloadIdentities(*issuer_from_pem(anchors, issuer_crt, issuer_key))
    identities.allow({SERVER})
    if secret is not None:
        identities.use_ticket_secret(TicketSecret(secret))
    context = identities.material(SERVER).server
    with socket.create_server(("127.0.0.1", 0)) as listener:
        print(listener.getsockname()[1], flush=True)
        for _ in range(MAX_CONNECTIONS):
            connection, _ = listener.accept()
            connection.settimeout(10)
            try:
                with context.wrap_socket(connection, server_side=True) as tls:
                    if tls.recv(4) == b"ping":
                        tls.sendall(b"pong" + (b"R" if tls.session_reused else b"F"))
            except (OSError, ValueError) as e:
                print(f"connection failed: {e!r}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
