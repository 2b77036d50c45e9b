"""The libnghttp2 binding (nodeagent/proxy/nghttp2.py) on its own: two real sessions handing
each other bytes in memory, and what the installed library (Debian's 1.52 with its backported
fixes) does about floods when nothing of ours stands in front of it."""

import logging

import pytest

from nodeagent.proxy import h2budget, nghttp2
from nodeagent.proxy.h2budget import Flood
from nodeagent.proxy.nghttp2 import CodecError, ErrorCodes, Session

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GET = b"\x82\x84\x86\x01\x04test"
REQUEST = [(b":method", b"POST"), (b":path", b"/x"), (b":scheme", b"http"), (b":authority", b"svc")]


def frame(kind: int, flags: int = 0, stream: int = 0, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def frames(data: bytes):
    at = 0
    while at + 9 <= len(data):
        length = int.from_bytes(data[at:at + 3], "big")
        yield data[at + 3], int.from_bytes(data[at + 5:at + 9], "big"), data[at + 9:at + 9 + length]
        at += 9 + length


class Recorder:
    """A handler that records events and serves bodies from `bodies` (stream id -> chunks)."""

    def __init__(self):
        self.events, self.bodies, self.data = [], {}, {}
        self.session: Session | None = None

    def h2_headers(self, stream_id, headers, category, end_stream):
        self.events.append(("headers", stream_id, category, end_stream, headers))

    def h2_end_stream(self, stream_id):
        self.events.append(("end", stream_id))

    def h2_data(self, stream_id, data):
        self.data.setdefault(stream_id, bytearray()).extend(data)

    def h2_reset(self, stream_id, code):
        self.events.append(("reset", stream_id, code))

    def h2_closed(self, stream_id, code):
        self.events.append(("closed", stream_id, code))

    def h2_goaway(self, last_stream_id, code):
        self.events.append(("goaway", last_stream_id, code))

    def h2_connection_error(self, code):
        self.events.append(("error", code))

    def h2_invalid(self, stream_id, lib_error):
        self.events.append(("invalid", stream_id, lib_error))

    def read_body(self, stream_id, length):
        chunks = self.bodies.get(stream_id)
        if not chunks:
            return None, False, None
        piece = chunks[0]
        if piece is None:  # the end, with trailers
            chunks.pop(0)
            return b"", True, [(b"x-trailer", b"1")]
        if len(piece) > length:
            chunks[0] = piece[length:]
            return piece[:length], False, None
        chunks.pop(0)
        return piece, not chunks, None


def pair():
    client, server = Recorder(), Recorder()
    client.session = Session(client, server=False, settings={nghttp2.SETTINGS_ENABLE_PUSH: 0},
                             connection_window=1 << 20)
    server.session = Session(server, server=True, settings={nghttp2.SETTINGS_MAX_CONCURRENT_STREAMS: 10},
                             connection_window=1 << 20)
    return client, server


def exchange(a: Recorder, b: Recorder) -> bytes:
    """Everything `a` has to send, into `b`."""
    sent = b""
    while data := a.session.send():
        sent += data
        b.session.receive(data)
    return sent


def settle(client, server):
    for _ in range(4):
        exchange(client, server)
        exchange(server, client)


def test_a_request_and_a_response_with_bodies_trailers_and_manual_windows():
    client, server = pair()
    client.bodies[1] = [b"q" * 70000]
    stream = client.session.submit_request(REQUEST, body=True)
    assert stream == 1
    settle(client, server)
    # The server's default stream window is 65,535: without consume() no more arrives.
    assert len(server.data[1]) == 65535
    server.session.consume(1, 65535)
    settle(client, server)
    assert bytes(server.data[1]) == b"q" * 70000
    assert ("headers", 1, nghttp2.HCAT_REQUEST, False, REQUEST) in server.events and ("end", 1) in server.events
    server.session.submit_response(1, [(b":status", b"200")], body=True)
    settle(client, server)  # the body is deferred: nothing yet
    server.bodies[1] = [b"r" * 10, None]
    server.session.resume(1)
    settle(client, server)
    assert bytes(client.data[1]) == b"r" * 10
    heads = [e for e in client.events if e[0] == "headers"]
    assert heads[0][2] == nghttp2.HCAT_RESPONSE and heads[1][2] == nghttp2.HCAT_HEADERS
    assert heads[1][4] == [(b"x-trailer", b"1")] and heads[1][3] is True
    assert ("closed", 1, 0) in client.events
    for side in (client, server):
        side.session.close()


def test_a_field_with_a_nul_resets_the_stream_even_unvalidated():
    """An endpoint's response is not validated by nghttp2 (validate=False), but a NUL in a
    field is malformed (RFC 9113, 8.2.1): the stream is reset, the field never reaches us."""
    client, server = Recorder(), Recorder()
    client.session = Session(client, server=False, settings={}, connection_window=1 << 20, validate=False)
    server.session = Session(server, server=True, settings={}, connection_window=1 << 20)
    for field in ((b"x-nul", b"a\x00b"), (b"x-\x00nul", b"ab")):
        stream = client.session.submit_request(REQUEST, body=False)
        settle(client, server)
        server.session.submit_response(stream, [(b":status", b"200"), field], body=False)
        settle(client, server)
        assert not [e for e in client.events if e[0] == "headers" and e[1] == stream]
        assert ("closed", stream, ErrorCodes.INTERNAL_ERROR) in client.events
    for side in (client, server):
        side.session.close()


def test_header_lists_of_any_size_and_bytes_like_fields_are_submitted():
    client, server = pair()
    fields = [(f"x-{i}".encode(), b"v" * (i % 7)) for i in range(300)]
    stream = client.session.submit_request(REQUEST + [(bytearray(b"x-ba"), memoryview(b"mv"))] + fields, body=False)
    settle(client, server)
    [head] = [e for e in server.events if e[0] == "headers"]
    assert head[1] == stream and head[4] == REQUEST + [(b"x-ba", b"mv")] + fields
    for side in (client, server):
        side.session.close()


def test_no_server_push_and_the_remote_settings():
    client, server = pair()
    settle(client, server)
    assert client.session.remote_max_concurrent_streams() == 10
    assert server.session.remote_max_concurrent_streams() == 2 ** 32 - 1  # the client set none


def test_a_header_list_over_the_limit_fails_the_session():
    _, server = pair()
    big = b"\x00\x05x-big\x7f" + _hpack_int(40000 - 127) + b"a" * 40000
    payload = GET + big + big
    chunks = [payload[at:at + 16384] for at in range(0, len(payload), 16384)]
    data = PREFACE + frame(0x4) + frame(0x1, 0x1, 1, chunks[0])
    data += b"".join(frame(0x9, 0x4 if c is chunks[-1] else 0, 1, c) for c in chunks[1:])
    with pytest.raises(CodecError) as failed:
        server.session.receive(data)
    assert server.session.header_overflow and failed.value.code == ErrorCodes.PROTOCOL_ERROR


def _hpack_int(value: int) -> bytes:
    out = bytearray()
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def test_an_exception_in_a_handler_fails_the_session_and_is_logged(caplog):
    class Broken(Recorder):
        def h2_headers(self, *args):
            raise ValueError("a bug")

    server = Broken()
    server.session = Session(server, server=True, settings={}, connection_window=1 << 20)
    with caplog.at_level(logging.ERROR), pytest.raises(CodecError):
        server.session.receive(PREFACE + frame(0x4) + frame(0x1, 0x5, 1, GET))
    assert isinstance(server.session.failure, ValueError) and "a bug" in caplog.text


def test_a_closed_session_refuses_calls_instead_of_crashing():
    client, _ = pair()
    client.session.close()
    assert client.session.send() == b""
    with pytest.raises(CodecError):
        client.session.receive(b"x")
    with pytest.raises(CodecError):
        client.session.submit_request(REQUEST, body=False)
    client.session.reset(1, 8)
    client.session.consume(1, 10)
    client.session.resume(1)
    assert not client.session.wants_io() and nghttp2._sessions.get(client.session.key) is None


# --- the installed library's own limits, with nothing of ours in front (h2budget.py's are
# set to the same numbers and trip first in the proxy, which scans frames before nghttp2) ---

def _server():
    server = Recorder()
    server.session = Session(server, server=True, settings={}, connection_window=1 << 20)
    server.session.receive(PREFACE + frame(0x4))
    return server


def test_installed_nghttp2_limits_rapid_reset_itself():
    """Debian's 1.52.0-1+deb12u3 carries the stream reset rate limit (CVE-2023-44487): after
    the burst of 1,000 it sends GOAWAY, with INTERNAL_ERROR (ours: ENHANCE_YOUR_CALM). Its bucket
    refills at 33 resets a second, so a slow machine may get a few past the burst, never 1,000."""
    server = _server()
    sent = b""
    for n in range(2 * h2budget.RESET_BURST):
        server.session.receive(frame(0x1, 0x5, 2 * n + 1, GET) + frame(0x3, 0, 2 * n + 1, b"\0\0\0\x08"))
        while data := server.session.send():
            sent += data
        if not server.session.wants_io():
            break
    assert h2budget.RESET_BURST <= n < 2 * h2budget.RESET_BURST - 1
    assert [int.from_bytes(p[4:8], "big") for kind, _, p in frames(sent) if kind == 0x7] == [ErrorCodes.INTERNAL_ERROR]


def test_installed_nghttp2_limits_unsent_control_answers():
    server = _server()
    with pytest.raises(CodecError) as failed:
        for _ in range(h2budget.MAX_UNREAD_CONTROL + 5):
            server.session.receive(frame(0x6, 0, 0, b"12345678"))  # never sent: answers queue up
    assert failed.value.flood is Flood.UNREAD_CONTROL


def test_installed_nghttp2_limits_settings_entries_and_continuations():
    server = _server()
    server.session.receive(frame(0x4, 0, 0, b"\0\x04\0\0\xff\xff" * (h2budget.MAX_SETTINGS_ENTRIES + 1)))
    while server.session.send():
        pass
    assert ("error", ErrorCodes.ENHANCE_YOUR_CALM) in server.events
    server = _server()
    with pytest.raises(CodecError) as failed:
        server.session.receive(frame(0x1, 0, 1, GET[:2])
                               + b"".join(frame(0x9, 0, 1, b"\x84") for _ in range(nghttp2.MAX_CONTINUATIONS + 1)))
    assert failed.value.flood is Flood.HEADER_BLOCK


def test_the_structures_read_from_callbacks_have_nghttp2_h_s_layout():
    """x86-64 sizes and offsets of the nghttp2.h structures the binding reads (a mismatch would
    read the wrong bytes, not fail)."""
    import ctypes

    from nodeagent.proxy import nghttp2_abi as abi
    assert ctypes.sizeof(abi.FrameHd) == 16 and abi.FrameHd.type.offset == 12 and abi.FrameHd.flags.offset == 13
    assert ctypes.sizeof(abi.HeadersFrame) == 64 and abi.HeadersFrame.cat.offset == 56
    assert (abi.HeadersFrame.stream_id.offset, abi.HeadersFrame.type.offset, abi.HeadersFrame.flags.offset) == (8, 12, 13)
    assert abi.RstStreamFrame.error_code.offset == 16
    assert abi.GoawayFrame.last_stream_id.offset == 16 and abi.GoawayFrame.error_code.offset == 20
    assert ctypes.sizeof(abi.Nv) == 40 and ctypes.sizeof(abi.SettingsEntry) == 8
    assert ctypes.sizeof(abi.DataProvider) == 16
