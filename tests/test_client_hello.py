"""client_hello.received on a real ClientHello (made by OpenSSL, no socket): every prefix, the
same message split over several records, and what is not one."""

import ssl

import pytest

from nodeagent.proxy.client_hello import MAX_HELLO, MAX_RECORDS, Hello, received


def a_client_hello() -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = context.wrap_bio(incoming, outgoing, server_hostname="pod.example")
    with pytest.raises(ssl.SSLWantReadError):
        sslobj.do_handshake()
    return outgoing.read()


def records(message: bytes, size: int) -> bytes:
    """The handshake message in records of `size` bytes (RFC 8446 5.1 allows any split)."""
    return b"".join(b"\x16\x03\x01" + len(part).to_bytes(2, "big") + part
                    for part in (message[at:at + size] for at in range(0, len(message), size)))


def test_every_prefix_is_partial_until_the_whole_hello():
    hello = a_client_hello()
    assert hello[0] == 0x16 and hello[5] == 0x01
    assert [received(hello[:n]) for n in range(len(hello))] == [Hello.PARTIAL] * len(hello)
    assert received(hello) is Hello.WHOLE
    assert received(hello + b"more") is Hello.WHOLE


@pytest.mark.parametrize("parts", [1, 2, 3, MAX_RECORDS])
def test_a_hello_split_over_records_is_whole_only_with_its_last_record(parts):
    message = a_client_hello()[5:]
    split = records(message, -(-len(message) // parts))
    answers = [received(split[:n]) for n in range(len(split) + 1)]
    assert answers[-1] is Hello.WHOLE and set(answers[:-1]) == {Hello.PARTIAL}


def test_a_hello_in_more_records_than_ours_ever_uses_is_refused():
    """The parse runs on the event loop at every arrival, before any turn: 1-byte records made
    each call walk up to 256 KiB record by record. Past MAX_RECORDS it is no client of ours."""
    message = a_client_hello()[5:]
    split = records(message, -(-len(message) // (MAX_RECORDS + 1)))
    assert received(split) is Hello.NOT_HELLO
    flood = records(b"\x01\x00\x40\x00" + b"x" * (256 * 1024), 1)  # 1-byte records, 256 KiB of them
    assert received(flood) is Hello.NOT_HELLO


def test_a_hello_longer_than_ours_ever_are_is_refused_from_its_header():
    assert received(b"\x16\x03\x01\x00\x04" + b"\x01" + (MAX_HELLO + 1).to_bytes(3, "big")) is Hello.NOT_HELLO
    assert received(b"\x16\x03\x01\x00\x04" + b"\x01" + MAX_HELLO.to_bytes(3, "big")) is Hello.PARTIAL


@pytest.mark.parametrize("prefix", [
    b"GET / HTTP/1.1\r\n",  # plaintext to the mesh port
    b"\x16\x02",  # not TLS 1.x's record version
    b"\x17\x03\x03\x00\x05hello",  # application data first
    b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello
    b"\x16\x03\x01\x00\x00",  # an empty handshake record
    records(b"\x01\x00\x00\x10" + b"x" * 16, 4)[:9] + b"\x15\x03\x03\x00\x02",  # an alert amid the hello
])
def test_what_is_no_client_hello_is_said_at_once(prefix):
    assert received(prefix) is Hello.NOT_HELLO


def test_nothing_yet_is_partial():
    assert received(b"") is Hello.PARTIAL and received(b"\x16") is Hello.PARTIAL
