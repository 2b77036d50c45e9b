"""One agent's processes share TLS session-ticket keys (proxy/tickets.py): a ticket issued by
one process resumes in another. Real handshakes on loopback, real certificates, server
contexts built as the proxy builds them, in processes of their own."""

import json
import pickle
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from nodeagent.identity.ca import Authority
from nodeagent.proxy import tickets
from test_mtls import CLIENT, SERVER, identities

SERVER_SCRIPT = Path(__file__).with_name("ticket_server.py")


@pytest.fixture
def pki():
    anchor = Authority.new_anchor("cluster.local")
    return anchor.certificate_pem(), anchor.new_issuer("cluster.local")


class ServerProcess:
    """tests/ticket_server.py: one proxy process's server context, on a port of its own."""

    def __init__(self, anchors: bytes, issuer: Authority, secret: tickets.TicketSecret | None):
        self.popen = subprocess.Popen([sys.executable, str(SERVER_SCRIPT)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, cwd=SERVER_SCRIPT.parent.parent)
        self.popen.stdin.write(pickle.dumps((anchors, issuer.chain_pem(), issuer.key_pem(),
                                             secret.value if secret else None)))
        self.popen.stdin.close()
        self.port = int(self.popen.stdout.readline())
        self.pid = self.popen.pid

    def stop(self) -> None:
        self.popen.kill()
        self.popen.wait()


def ping(port: int, client: ssl.SSLContext, session: ssl.SSLSession | None = None):
    """One connection: (the client's session after it, resumed as the client saw it, as the server did)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with client.wrap_socket(raw, server_hostname=SERVER.server_name, session=session) as tls:
            tls.sendall(b"ping")
            answer = tls.recv(5)  # the tickets came before it
            assert answer[:4] == b"pong"
            return tls.session, tls.session_reused, answer[4:] == b"R"


@pytest.fixture
def servers(pki):
    started = []

    def start(secret):
        server = ServerProcess(*pki, secret)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def test_a_ticket_from_one_process_resumes_in_another_with_the_agents_keys(pki, servers):
    anchors, issuer = pki
    client = identities(issuer, anchors, CLIENT).material(CLIENT).client
    secret = tickets.TicketSecret.new()
    a, b = servers(secret), servers(secret)
    assert a.pid != b.pid
    session, reused, _ = ping(a.port, client)
    assert not reused and session.has_ticket
    for port in (b.port, a.port, b.port):  # every process resumes the first one's ticket
        _, reused, server_saw = ping(port, client, session)
        assert reused and server_saw


def test_with_keys_of_its_own_each_process_makes_a_full_handshake_for_the_others_tickets(pki, servers):
    anchors, issuer = pki
    client = identities(issuer, anchors, CLIENT).material(CLIENT).client
    for a, b in ((servers(None), servers(None)),  # OpenSSL's default: random keys per context
                 (servers(tickets.TicketSecret.new()), servers(tickets.TicketSecret.new()))):
        session, _, _ = ping(a.port, client)
        assert ping(a.port, client, session)[1]  # its own tickets resume
        _, reused, server_saw = ping(b.port, client, session)
        assert not reused and not server_saw  # a full handshake, and it still serves


def test_a_rotation_on_live_contexts_ends_the_old_tickets_and_resumes_the_new(pki):
    anchors, issuer = pki
    client = identities(issuer, anchors, CLIENT).material(CLIENT).client
    first = tickets.TicketSecret.new()
    a, b = identities(issuer, anchors, SERVER), identities(issuer, anchors, SERVER)
    for process in (a, b):
        process.use_ticket_secret(first)
    with InProcessServer(a.material(SERVER).server) as on_a, InProcessServer(b.material(SERVER).server) as on_b:
        old, _, _ = ping(on_a.port, client)
        assert ping(on_b.port, client, old)[1]
        second = tickets.TicketSecret.new()
        for process in (a, b):  # the agent's rotation, on the contexts already serving
            process.use_ticket_secret(second)
        assert not ping(on_b.port, client, old)[1]  # one full handshake after a rotation
        new, _, _ = ping(on_a.port, client)
        assert ping(on_b.port, client, new)[1]


def test_tickets_survive_a_renewal_but_not_new_trust_anchors(pki):
    anchors, issuer = pki
    client = identities(issuer, anchors, CLIENT).material(CLIENT).client
    secret = tickets.TicketSecret.new()
    server = identities(issuer, anchors, SERVER)
    server.use_ticket_secret(secret)
    with InProcessServer(server.material(SERVER).server) as before:
        session, _, _ = ping(before.port, client)
    server._replace(SERVER)  # what renew_due does at 70% of the certificate's life
    with InProcessServer(server.material(SERVER).server) as renewed:
        assert ping(renewed.port, client, session)[1]
    other_bundle = anchors + Authority.new_anchor("cluster.local").certificate_pem()
    server.replace_issuer(issuer, other_bundle)
    with InProcessServer(server.material(SERVER).server) as reissued:
        assert not ping(reissued.port, client, session)[1]


def test_the_derived_keys_are_one_identitys_under_one_bundle_and_the_secret_stays_hidden():
    secret = tickets.TicketSecret.new()
    keys = tickets.ticket_keys(secret, SERVER.uri, b"anchors")
    assert len(keys) == tickets.TICKET_KEYS_BYTES == 80
    assert keys == tickets.ticket_keys(tickets.TicketSecret(secret.value), SERVER.uri, b"anchors")
    assert len({keys, tickets.ticket_keys(secret, CLIENT.uri, b"anchors"),
                tickets.ticket_keys(secret, SERVER.uri, b"other anchors"),
                tickets.ticket_keys(tickets.TicketSecret.new(), SERVER.uri, b"anchors")}) == 4
    # It crosses the workers' channel pickled; it is never shown.
    assert pickle.loads(pickle.dumps(secret, pickle.HIGHEST_PROTOCOL)).value == secret.value
    for shown in (repr(secret), str(secret), f"{secret}", json.dumps({"s": secret}, default=str),
                  repr(("ticket-secret", secret))):
        assert secret.value.hex() not in shown and repr(secret.value) not in shown
    with pytest.raises(ValueError):
        tickets.TicketSecret(b"short")


def test_the_rotation_draws_a_new_secret_every_period():
    now = [100.0]
    rotation = tickets.Rotation(every_s=3600, clock=lambda: now[0])
    first = rotation.secret
    now[0] += 3599
    assert rotation.due() is None and rotation.secret is first
    now[0] += 1
    second = rotation.due()
    assert second is rotation.secret and second.value != first.value
    assert rotation.due() is None


def test_the_keys_are_refused_where_the_length_is_not_openssls(pki):
    anchors, issuer = pki
    context = identities(issuer, anchors, SERVER).material(SERVER).server
    assert tickets.install(context, bytes(80))
    assert not tickets.install(context, bytes(48))


class InProcessServer:
    """A TLS server on a thread of this process, answering as tests/ticket_server.py does."""

    def __init__(self, context: ssl.SSLContext):
        import threading

        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # closed
            connection.settimeout(10)
            try:
                with self.context.wrap_socket(connection, server_side=True) as tls:
                    if tls.recv(4) == b"ping":
                        tls.sendall(b"pong" + (b"R" if tls.session_reused else b"F"))
            except (OSError, ValueError):
                pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (Linux)
        self.listener.close()
        self.thread.join(5)


def test_the_benchmark_runs_and_only_the_shared_keys_resume_across_processes():
    out = subprocess.run([sys.executable, "-m", "benchmarks.ticket_sharing", "20", "1"], capture_output=True,
                         text=True, timeout=120, check=True, cwd=SERVER_SCRIPT.parent.parent).stdout
    report = json.loads(out)
    share = {mode: float(report[mode]["resumed_share"].split()[0])
             for mode in ("own keys per process", "the agent's shared keys")}
    assert share["the agent's shared keys"] == 0.95  # all but the first of 20
    assert share["own keys per process"] < 0.9
