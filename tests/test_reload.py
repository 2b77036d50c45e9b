"""The issuer Secret's files picked up live (issue 15): a new trust-anchor bundle or issuer is
read without a restart, a half-updated set is not taken, and the identities are issued again
from it while established connections keep working."""

import asyncio
import datetime
import logging

from nodeagent.identity.ca import Authority, write_identity_files
from nodeagent.identity.reload import CHECK_S, IssuerFiles
from test_mtls import CLIENT, SERVER, Clock, EchoAfterHandshake, Holding, exchange, identities, mesh


def test_a_new_issuer_is_taken_once_the_files_hold_a_whole_one(tmp_path, caplog):
    anchor = Authority.new_anchor("cluster.local")
    first, second = anchor.new_issuer("cluster.local"), anchor.new_issuer("cluster.local")
    write_identity_files(tmp_path, anchor, first)
    files = IssuerFiles(tmp_path, now=0)
    assert files.changed(now=CHECK_S) is None  # nothing changed
    (tmp_path / "issuer.crt").write_bytes(second.chain_pem())  # the key is still the first issuer's
    with caplog.at_level(logging.ERROR):
        assert files.changed(now=2 * CHECK_S) is None
        assert files.changed(now=3 * CHECK_S) is None  # the same half-update: said once
    assert caplog.text.count("issuer.key is not the key of issuer.crt") == 1
    (tmp_path / "issuer.key").write_bytes(second.key_pem())
    assert files.changed(now=3.5 * CHECK_S) is None  # not due yet
    issuer, anchors = files.changed(now=4 * CHECK_S)
    assert issuer.certificate == second.certificate and anchors == anchor.certificate_pem()
    assert files.changed(now=5 * CHECK_S) is None


def test_a_new_bundle_of_anchors_is_taken_and_unreadable_files_keep_the_issuer(tmp_path):
    old, new = Authority.new_anchor("cluster.local"), Authority.new_anchor("cluster.local")
    issuer = old.new_issuer("cluster.local")
    write_identity_files(tmp_path, old, issuer)
    files = IssuerFiles(tmp_path, now=0)
    (tmp_path / "ca.crt").write_bytes(old.certificate_pem() + new.certificate_pem())
    _, anchors = files.changed(now=CHECK_S)
    assert anchors == old.certificate_pem() + new.certificate_pem()
    (tmp_path / "ca.crt").unlink()  # mid-swap
    assert files.changed(now=2 * CHECK_S) is None


def test_identities_are_issued_again_from_the_new_issuer_and_established_tunnels_keep_working():
    old_anchor, new_anchor = Authority.new_anchor("cluster.local"), Authority.new_anchor("cluster.local")
    old_issuer, new_issuer = old_anchor.new_issuer("cluster.local"), new_anchor.new_issuer("cluster.local")
    both = old_anchor.certificate_pem() + new_anchor.certificate_pem()
    server = identities(old_issuer, old_anchor.certificate_pem(), SERVER, clock=Clock())
    client = identities(old_issuer, old_anchor.certificate_pem(), CLIENT)
    retired = []
    server.on_retire.append(retired.append)
    before = server.material(SERVER)

    async def across_the_rotation():
        loop = asyncio.get_running_loop()
        results = []
        listener = await loop.create_server(lambda: EchoAfterHandshake(before.server, results), "127.0.0.1", 0)
        transport, holding = await loop.create_connection(Holding, *listener.sockets[0].getsockname())
        tls = await mesh.client_handshake(transport, holding, client.material(CLIENT).client, SERVER, 9000, 0, 5)
        tls.write(b"before")
        await asyncio.sleep(0.05)
        # Step 2 of a rotation (README), then step 3, on the server's node: the tunnel stays.
        assert server.replace_issuer(old_issuer, both) == 1
        assert server.replace_issuer(new_issuer, both) == 1
        tls.write(b"|after")
        await asyncio.sleep(0.05)
        listener.close()
        return bytes(holding.buffer)

    assert asyncio.run(across_the_rotation()) == b"before|after"
    after = server.material(SERVER)
    assert after.serial != before.serial and before in retired
    # New handshakes use the new material: a client that trusts both anchors accepts it.
    client.replace_issuer(old_issuer, both)
    results, echoed = asyncio.run(exchange(after.server, client.material(CLIENT).client))
    assert results == [("identity", CLIENT.uri)] and echoed


def test_the_first_issuer_and_the_digest_changes_are_measured_from_come_from_one_read(tmp_path):
    anchor = Authority.new_anchor("cluster.local")
    first, second = anchor.new_issuer("cluster.local"), anchor.new_issuer("cluster.local")
    write_identity_files(tmp_path, anchor, first)
    files = IssuerFiles(tmp_path, now=0)
    # The Secret changes after that read (while the agent compiles its data path, say).
    write_identity_files(tmp_path, anchor, second)
    assert files.current[0].certificate == first.certificate  # what the agent starts with
    issuer, _ = files.changed(now=CHECK_S)
    assert issuer.certificate == second.certificate and files.current[0].certificate == second.certificate


def test_an_issuer_that_does_not_chain_to_the_anchors_or_is_not_valid_now_is_not_taken(tmp_path, caplog):
    old, new = Authority.new_anchor("cluster.local"), Authority.new_anchor("cluster.local")
    write_identity_files(tmp_path, old, old.new_issuer("cluster.local"))
    files = IssuerFiles(tmp_path, now=0)
    ca_crt = (tmp_path / "ca.crt").read_bytes()
    rotated = new.new_issuer("cluster.local")
    # A torn read: the old ca.crt with the new issuer (its certificate and key agree).
    (tmp_path / "issuer.crt").write_bytes(rotated.chain_pem())
    (tmp_path / "issuer.key").write_bytes(rotated.key_pem())
    with caplog.at_level(logging.ERROR):
        assert files.changed(now=CHECK_S) is None
        assert files.changed(now=2 * CHECK_S) is None  # said once
    assert caplog.text.count("does not chain to any trust anchor") == 1
    assert files.current[1] == ca_crt
    expired = old.new_issuer("cluster.local", lifetime=datetime.timedelta(seconds=30))  # began a minute ago
    (tmp_path / "issuer.crt").write_bytes(expired.chain_pem())
    (tmp_path / "issuer.key").write_bytes(expired.key_pem())
    with caplog.at_level(logging.ERROR):
        assert files.changed(now=3 * CHECK_S) is None
    assert "not now" in caplog.text
    (tmp_path / "ca.crt").write_bytes(ca_crt + new.certificate_pem())  # the rest of the update
    (tmp_path / "issuer.crt").write_bytes(rotated.chain_pem())
    (tmp_path / "issuer.key").write_bytes(rotated.key_pem())
    issuer, anchors = files.changed(now=4 * CHECK_S)
    assert issuer.certificate == rotated.certificate and anchors == ca_crt + new.certificate_pem()
