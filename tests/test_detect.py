"""Detection, fed every prefix of real captures: the answer changes only once."""

import ssl

import pytest

from nodeagent.proxy.detect import H2_PREFACE, MAX_PREFIX, NEED_MORE, Detection, Protocol, client_hello_sni, detect


def client_hello(server_name: str | None) -> bytes:
    """A real ClientHello from Python's TLS stack."""
    context = ssl.create_default_context()
    context.check_hostname = server_name is not None
    if server_name is None:
        context.verify_mode = ssl.CERT_NONE
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def answers_for_every_prefix(data: bytes) -> list:
    return [detect(data[:n]) for n in range(1, len(data) + 1)]


def assert_decides_once(data: bytes, expected: Detection) -> None:
    answers = answers_for_every_prefix(data)
    first = next(i for i, a in enumerate(answers) if a is not NEED_MORE)
    assert all(a is NEED_MORE for a in answers[:first])
    assert all(a == expected for a in answers[first:]), answers[first:]


@pytest.mark.parametrize("request_line", [
    b"GET / HTTP/1.1\r\nhost: a\r\n\r\n",
    b"POST /submit HTTP/1.0\r\ncontent-length: 0\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\n\r\n",
    b"CONNECT example.test:443 HTTP/1.1\r\n\r\n",
    b"DELETE /x?y=z HTTP/1.1\r\n\r\n",
])
def test_http1_requests(request_line):
    assert_decides_once(request_line, Detection(Protocol.HTTP1))


def test_h2_prior_knowledge_preface():
    assert_decides_once(H2_PREFACE + b"\x00\x00\x12\x04\x00\x00\x00\x00\x00", Detection(Protocol.H2))


@pytest.mark.parametrize("server_name", ["echo.default.svc.cluster.local", "a.test"])
def test_tls_client_hello_with_sni(server_name):
    assert_decides_once(client_hello(server_name), Detection(Protocol.TLS, server_name))


def test_tls_client_hello_without_sni():
    hello = client_hello(None)
    assert detect(hello) == Detection(Protocol.TLS, None)
    assert client_hello_sni(hello[5:]) is None


@pytest.mark.parametrize("data", [
    b"\x00\x01binary",  # binary protocol
    b"*1\r\n$4\r\nPING\r\n",  # redis
    b"HELO mail.test\r\n",  # SMTP client
    b"GET / HTTP/2.0\r\n",  # not a 1.x request line
    b"GETTER / HTTP/1.1\r\n",  # not a method
    b"get / HTTP/1.1\r\n",  # methods are case-sensitive
    b"PRX",  # diverges from the h2 preface
    b"\x16\x01",  # TLS content type, wrong version byte
    b"\x16\x03\x01\x00\x05\x02",  # a handshake record that is not a ClientHello
])
def test_opaque(data):
    assert_decides_once(data, Detection(Protocol.OPAQUE))


def test_undecided_http_line_gives_up_at_the_limit():
    data = b"GET /" + b"a" * MAX_PREFIX
    assert detect(data[:MAX_PREFIX - 1]) is NEED_MORE
    assert detect(data) == Detection(Protocol.OPAQUE)


def test_nothing_is_not_a_decision():
    assert detect(b"") is NEED_MORE


def test_truncated_client_hello_body_yields_no_sni():
    assert client_hello_sni(b"\x01\x00\x00\x10" + b"\x03\x03") is None
