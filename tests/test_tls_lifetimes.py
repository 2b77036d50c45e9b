"""TLS session resumption never outlives what a certificate proved: real handshakes on loopback,
real certificates (some of them seconds long), OpenSSL's own tickets."""

import asyncio
import datetime
import gc
import ssl
import time

import pytest

from nodeagent.identity import naming
from nodeagent.identity.ca import Authority
from nodeagent.identity.workload import RENEW_AT, WorkloadIdentities, session_lifetime_s
from nodeagent.proxy import mesh, openssl, tls
from nodeagent.proxy.relay import Holding
from test_mtls import SERVER, CLIENT, Clock, EchoAfterHandshake, identities


@pytest.fixture
def pki():
    anchor = Authority.new_anchor("cluster.local")
    return anchor.certificate_pem(), anchor.new_issuer("cluster.local")


def short_lived(issuer, anchors, identity, seconds: float) -> WorkloadIdentities:
    """Certificates of `seconds`, on a clock that never moves: the material is never renewed,
    so it is used up to (and past) its real expiry, as an attacker holding it would."""
    workload = WorkloadIdentities(issuer, anchors, datetime.timedelta(seconds=seconds), clock=Clock())
    workload.allow({identity})
    return workload


async def connect(port: int, client_context, sessions=None, session=None):
    """One tunnel: the client's ssl object (or the error), and whether the echo came back.
    `session` is offered as is, bypassing `sessions` and the client's own checks."""
    loop = asyncio.get_running_loop()
    transport, holding = await loop.create_connection(Holding, "127.0.0.1", port)
    try:
        if session is not None:
            raw = await tls.handshake(transport, holding, client_context, False, 5, SERVER.server_name,
                                      session=session)
            holding.transport = raw
            result = raw
        else:
            result = await mesh.client_handshake(transport, holding, client_context, SERVER, 9000, 0, 5, sessions,
                                                 "10.244.0.9")
    except (mesh.TunnelError, ssl.SSLError, OSError) as e:
        return e, False
    sslobj = result.get_extra_info("ssl_object")
    result.write((mesh.encode_header(9000, 0) if session is not None else b"") + b"ping")
    for _ in range(500):  # the session tickets arrive with the server's first bytes (5 s at most, loaded CI)
        if holding.buffer or holding.eof or holding.lost:
            break
        await asyncio.sleep(0.01)
    result.close()
    return sslobj, bytes(holding.buffer) == b"ping"


async def serve(server_context_of):
    """A mesh-port stand-in whose context is asked per connection, as MeshAccept does."""
    results = []
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: EchoAfterHandshake(server_context_of(), results), "127.0.0.1", 0)
    return listener, listener.sockets[0].getsockname()[1], results


def test_server_tickets_live_no_longer_than_the_certificate_has_left_at_renewal(pki):
    anchors, issuer = pki
    assert session_lifetime_s(24 * 3600) == 7200  # OpenSSL's default stays the ceiling
    assert session_lifetime_s(10) == int((1 - RENEW_AT) * 10) == 3
    for seconds, expected in ((24 * 3600, 7200), (600, 180), (10, 3)):
        server = short_lived(issuer, anchors, SERVER, seconds)
        assert openssl.session_lifetime(server.material(SERVER).server) == expected
    # Under a second left: no tickets at all.
    tiny = short_lived(issuer, anchors, SERVER, 2)
    assert tiny.material(SERVER).server.num_tickets == 0


def test_where_the_lifetime_cannot_be_set_no_tickets_are_issued(monkeypatch, pki):
    anchors, issuer = pki
    monkeypatch.setattr(openssl, "ssl_ctx", lambda context: None)  # a Python laid out otherwise
    server = identities(issuer, anchors, SERVER)
    assert server.material(SERVER).server.num_tickets == 0


def test_resumption_is_allowed_while_both_certificates_are_valid(pki):
    anchors, issuer = pki
    server, client = identities(issuer, anchors, SERVER), identities(issuer, anchors, CLIENT)
    sessions = mesh.SessionCache()

    async def scenario():
        listener, port, results = await serve(lambda: server.material(SERVER).server)
        first, echoed = await connect(port, client.material(CLIENT).client, sessions)
        second, echoed_again = await connect(port, client.material(CLIENT).client, sessions)
        listener.close()
        assert echoed and echoed_again
        return first, second, results

    first, second, results = asyncio.run(scenario())
    assert (first.session_reused, second.session_reused) == (False, True)
    assert results == [("identity", CLIENT.uri)] * 2
    # The client keeps the session until the earlier of its ticket's end and the server certificate's.
    expires = sessions._sessions[(client.material(CLIENT).client, "10.244.0.9")][1]
    assert expires <= first.session.time + 7200


def test_resumption_is_refused_after_the_client_certificate_expired(pki):
    """The attack: a client holds a session proven by a certificate that has since expired (a
    stolen ticket, a client that kept its old material). Today OpenSSL resumes it for 2 h."""
    anchors, issuer = pki
    server = identities(issuer, anchors, SERVER)
    client = short_lived(issuer, anchors, CLIENT, 3)
    sessions = mesh.SessionCache()
    material = client.material(CLIENT)

    async def scenario():
        listener, port, results = await serve(lambda: server.material(SERVER).server)
        first, _ = await connect(port, material.client, sessions)
        await asyncio.sleep(max(0.0, material.not_after - time.time()) + 1.1)  # the client certificate expires
        offered = sessions.get(material.client, "10.244.0.9")  # the server's certificate is still valid
        _, echoed = await connect(port, material.client, session=offered)
        await asyncio.sleep(0.1)
        listener.close()
        return first, offered, echoed, results

    first, offered, echoed, results = asyncio.run(scenario())
    assert first.session_reused is False and offered is not None
    assert not echoed, "the server resumed a session of an expired certificate"
    assert results == [("identity", CLIENT.uri), ("failed", "resumed session of an expired certificate")]


def test_a_ticket_outlives_neither_its_lifetime_on_the_server_nor_in_the_client_cache(pki):
    anchors, issuer = pki
    server = short_lived(issuer, anchors, SERVER, 5)  # tickets of 1 s
    client = identities(issuer, anchors, CLIENT)
    sessions = mesh.SessionCache()
    context = client.material(CLIENT).client

    async def scenario():
        listener, port, results = await serve(lambda: server.material(SERVER).server)
        first, _ = await connect(port, context, sessions)
        soon, _ = await connect(port, context, sessions)
        session = soon.session
        await asyncio.sleep(2.2)
        cached = sessions.get(context, "10.244.0.9")
        late, _ = await connect(port, context, session=session)  # offered anyway: the server refuses to resume
        listener.close()
        return first, soon, cached, late

    first, soon, cached, late = asyncio.run(scenario())
    assert (first.session_reused, soon.session_reused) == (False, True)
    assert soon.session.ticket_lifetime_hint == 1
    assert cached is None  # the client cache let it go
    assert isinstance(late, ssl.SSLObject) and late.session_reused is False  # a full handshake


@pytest.mark.parametrize("how", ["dropped and issued again", "renewed"])
def test_a_server_that_let_its_certificate_go_resumes_none_of_its_old_sessions(pki, how):
    # With OpenSSL's random keys per context. With the agent's ticket secret (proxy/tickets.py)
    # the keys stay and old tickets resume, their peer certificates checked: test_ticket_keys.py.
    anchors, issuer = pki
    clock = Clock()
    server = identities(issuer, anchors, SERVER, clock=clock)
    client = identities(issuer, anchors, CLIENT)
    context = client.material(CLIENT).client
    sessions = mesh.SessionCache()

    async def scenario():
        listener, port, results = await serve(lambda: server.material(SERVER).server)
        await connect(port, context, sessions)
        resumed, _ = await connect(port, context, sessions)
        if how == "renewed":
            clock.t += 0.75 * 24 * 3600
            assert server.renew_due() == [SERVER]
        else:
            server.allow(set())  # the last pod of SERVER left this node...
            server.allow({SERVER})  # ...and another came: a new certificate
        after, echoed = await connect(port, context, session=resumed.session)
        listener.close()
        assert echoed
        return resumed, after

    resumed, after = asyncio.run(scenario())
    assert resumed.session_reused is True
    assert isinstance(after, ssl.SSLObject) and after.session_reused is False


def test_the_client_cache_forgets_the_sessions_of_a_renewed_or_dropped_certificate(pki):
    anchors, issuer = pki
    clock = Clock()
    server = identities(issuer, anchors, SERVER)
    client = identities(issuer, anchors, CLIENT, naming.of_pod("default", "other"), clock=clock)
    sessions = mesh.SessionCache()
    client.on_retire.append(lambda material: sessions.retire(material.client))

    async def scenario():
        listener, port, _ = await serve(lambda: server.material(SERVER).server)
        await connect(port, client.material(CLIENT).client, sessions)
        counts = [len(sessions)]
        clock.t += 0.75 * 24 * 3600
        client.renew_due()  # CLIENT's certificate renewed
        counts.append(len(sessions))
        await connect(port, client.material(CLIENT).client, sessions)
        counts.append(len(sessions))
        client.allow(set())  # its pods left
        counts.append(len(sessions))
        listener.close()
        return counts

    assert asyncio.run(scenario()) == [1, 0, 1, 0]


def test_a_session_that_arrives_after_its_certificate_was_retired_is_not_kept(pki):
    """The session comes with the server's first bytes, which on an idle tunnel can be long after
    the handshake: if the client's certificate was renewed or dropped meanwhile, the session must
    not be cached (under a context that may be freed and its id given to another identity)."""
    anchors, issuer = pki
    server = identities(issuer, anchors, SERVER)
    client = identities(issuer, anchors, CLIENT)
    sessions = mesh.SessionCache()

    async def scenario():
        listener, port, _ = await serve(lambda: server.material(SERVER).server)
        loop = asyncio.get_running_loop()
        transport, holding = await loop.create_connection(Holding, "127.0.0.1", port)
        context = client.material(CLIENT).client
        tunnel = await mesh.client_handshake(transport, holding, context, SERVER, 9000, 0, 5, sessions, "10.244.0.9")
        holding.transport = tunnel
        sessions.retire(context)  # before the server's first bytes (and its tickets) came
        tunnel.write(b"ping")
        for _ in range(500):
            if holding.buffer or holding.eof or holding.lost:
                break
            await asyncio.sleep(0.01)
        tunnel.close()
        listener.close()
        return bytes(holding.buffer), len(sessions)

    assert asyncio.run(scenario()) == (b"ping", 0)


def test_sessions_are_kept_per_context_object_not_per_id():
    class Context:  # weakly referenceable, as ssl.SSLContext is
        pass

    class Session:
        has_ticket, time, timeout, ticket_lifetime_hint = True, time.time(), 7200, 100

    cache = mesh.SessionCache()
    first = Context()
    cache.put(first, "s", Session(), time.time() + 60)
    assert cache.get(first, "s") is not None
    stranger = Context()  # another identity's context; an equal id would once have matched
    assert cache.get(stranger, "s") is None
    cache.retire(first)
    cache.put(first, "s", Session(), time.time() + 60)
    assert len(cache) == 0


def test_the_proxy_wires_its_session_cache_to_its_identities(pki):
    from nodeagent.proxy.server import Proxy

    anchors, issuer = pki
    workload = identities(issuer, anchors, CLIENT)

    async def scenario():
        proxy = Proxy(None, workload)
        context = workload.material(CLIENT).client
        proxy.tls_sessions._sessions[(context, "10.244.0.9")] = (object(), time.time() + 60)
        workload.allow(set())
        return len(proxy.tls_sessions)

    assert asyncio.run(scenario()) == 0


def test_the_session_cache_is_bounded_and_expires_by_its_clock():
    clock = Clock()
    cache = mesh.SessionCache(size=3, clock=clock)

    class Session:
        has_ticket, time, timeout, ticket_lifetime_hint = True, clock.t, 7200, 100

    contexts = [object() for _ in range(5)]
    for i, context in enumerate(contexts):
        cache.put(context, "s", Session(), clock.t + 50 + i)
    assert len(cache) == 3 and cache.get(contexts[0], "s") is None and cache.get(contexts[4], "s") is not None
    clock.t += 53.5  # past contexts[2]'s and [3]'s server certificates' expiry (+52, +53)
    assert cache.get(contexts[3], "s") is None and cache.get(contexts[4], "s") is not None
    clock.t += 100  # past every ticket's lifetime
    assert cache.get(contexts[4], "s") is None and cache.get(contexts[2], "s") is None and len(cache) == 0


def test_full_handshakes_against_processes_with_their_own_ticket_keys_leave_no_memory_behind(pki):
    """A node's agent and workers each issue tickets under keys of their own, so a client's
    session from one is a full handshake at another; the client keeps each full handshake's
    session. CPython 3.11's SSLObject.session leaked a copy per read (gh-116810, ~6 KB): the
    soak's client-side agent grew ~15 MiB per 90 s. glibc's bytes in use stay put here."""
    from nodeagent.agent import memory

    anchors, issuer = pki
    processes = [identities(issuer, anchors, SERVER) for _ in range(2)]  # the same identity, two ticket keys
    client = identities(issuer, anchors, CLIENT)
    sessions = mesh.SessionCache()
    warmup, window = 20, 250

    async def scenario():
        servers = [await serve(lambda p=p: p.material(SERVER).server) for p in processes]
        reused, echoed, marks = [], [], []
        for i in range(warmup + 2 * window + 1):
            if i >= warmup and (i - warmup) % window == 0:  # after the warm-up, and after each window
                gc.collect()
                marks.append(memory.allocator()["in_use_kib"])
            if len(marks) == 3:
                break
            sslobj, ok = await connect(servers[i % 2][1], client.material(CLIENT).client, sessions)
            reused.append(sslobj.session_reused)
            echoed.append(ok)
        for listener, _, _ in servers:
            listener.close()
        return reused, echoed, [later - earlier for earlier, later in zip(marks, marks[1:])]

    reused, echoed, grown = asyncio.run(scenario())
    assert all(echoed) and not any(reused)  # every one a full handshake, its session kept
    assert len(sessions) == 1
    # A leak grows both windows alike (~1,450 KiB each); something done once grows only one.
    assert min(grown) < 500, f"{grown} KiB in use after each {window} full handshakes"
