"""What one HTTP/2 request costs the proxy's codec, with nothing else in the way.

Per request the proxy plays both roles once: server on the client's connection (decode
the request's headers, encode the response's) and client on the endpoint's connection
(encode the request's headers, decode the response's). This runs that pair in memory, a
client session and a server session handing each other bytes, for:

- `h2`, the Python HTTP/2 stack the proxy uses (with the proxy's settings: header encoding
  off, the server validating what arrives, the client not);
- libnghttp2 (C; Debian's libnghttp2-14, which curl already pulls in) through ctypes, with
  the callbacks a proxy would need (headers, data, frame ends, stream close).

    python -m benchmarks.h2codec [--requests N]

It measures the codec's share only: no sockets, no event loop, no TLS.
"""

import argparse
import ctypes
import time

import h2.config
import h2.connection
import h2.events

REQUEST = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"svc.default"),
           (b"user-agent", b"h2load nghttp2/1.52.0"), (b"accept", b"*/*")]
RESPONSE = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"x-pod", b"http-n0-0")]
BODY = b"ok\n"


def h2_per_request(requests: int) -> float:
    server = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=False, header_encoding=None, validate_outbound_headers=False,
        normalize_outbound_headers=False))
    client = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_inbound_headers=False,
        normalize_inbound_headers=False, validate_outbound_headers=False, normalize_outbound_headers=False))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    got = 0
    started = time.perf_counter()
    for _ in range(requests):
        stream_id = client.get_next_available_stream_id()
        client.send_headers(stream_id, REQUEST, end_stream=True)
        for event in server.receive_data(client.data_to_send()):
            if isinstance(event, h2.events.RequestReceived):
                server.send_headers(event.stream_id, RESPONSE)
                server.send_data(event.stream_id, BODY, end_stream=True)
        for event in client.receive_data(server.data_to_send()):
            if isinstance(event, h2.events.DataReceived):
                client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                got += 1
        server.receive_data(client.data_to_send())  # window updates
    elapsed = time.perf_counter() - started
    assert got == requests
    return elapsed / requests


# --- libnghttp2 through ctypes ---

class FrameHd(ctypes.Structure):
    """nghttp2_frame_hd: the first member of every nghttp2_frame."""
    _fields_ = [("length", ctypes.c_size_t), ("stream_id", ctypes.c_int32), ("type", ctypes.c_uint8),
                ("flags", ctypes.c_uint8), ("reserved", ctypes.c_uint8)]


class Nv(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p), ("namelen", ctypes.c_size_t),
                ("valuelen", ctypes.c_size_t), ("flags", ctypes.c_uint8)]


READ_CB = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_uint8),
                           ctypes.c_size_t, ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p, ctypes.c_void_p)


class DataProvider(ctypes.Structure):
    _fields_ = [("source", ctypes.c_void_p), ("read_callback", READ_CB)]


HEADER_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(FrameHd), ctypes.POINTER(ctypes.c_char),
                             ctypes.c_size_t, ctypes.POINTER(ctypes.c_char), ctypes.c_size_t, ctypes.c_uint8,
                             ctypes.c_void_p)
FRAME_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(FrameHd), ctypes.c_void_p)
DATA_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint8, ctypes.c_int32,
                           ctypes.POINTER(ctypes.c_char), ctypes.c_size_t, ctypes.c_void_p)
CLOSE_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int32, ctypes.c_uint32, ctypes.c_void_p)
DATA, HEADERS, END_STREAM, DATA_FLAG_EOF = 0x00, 0x01, 0x01, 0x01


def _nv_array(pairs):
    array = (Nv * len(pairs))()
    for nv, (name, value) in zip(array, pairs):
        nv.name, nv.value, nv.namelen, nv.valuelen, nv.flags = name, value, len(name), len(value), 0
    return array


def nghttp2_per_request(requests: int) -> float:
    lib = ctypes.CDLL("libnghttp2.so.14")
    lib.nghttp2_session_mem_send.restype = ctypes.c_ssize_t
    lib.nghttp2_session_mem_send.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.nghttp2_session_mem_recv.restype = ctypes.c_ssize_t
    lib.nghttp2_session_mem_recv.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.nghttp2_submit_request.restype = ctypes.c_int32
    lib.nghttp2_submit_request.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                           ctypes.c_void_p, ctypes.c_void_p]
    lib.nghttp2_submit_response.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_size_t,
                                            ctypes.c_void_p]
    lib.nghttp2_submit_settings.argtypes = [ctypes.c_void_p, ctypes.c_uint8, ctypes.c_void_p, ctypes.c_size_t]
    for name in ("nghttp2_session_callbacks_set_on_header_callback",
                 "nghttp2_session_callbacks_set_on_frame_recv_callback",
                 "nghttp2_session_callbacks_set_on_data_chunk_recv_callback",
                 "nghttp2_session_callbacks_set_on_stream_close_callback"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p]

    state = {"requests": [], "headers": {}, "done": 0}
    request_nv, response_nv = _nv_array(REQUEST), _nv_array(RESPONSE)

    def on_header(session, frame, name, namelen, value, valuelen, flags, user_data):
        state["headers"].setdefault(frame.contents.stream_id, []).append(
            (ctypes.string_at(name, namelen), ctypes.string_at(value, valuelen)))
        return 0

    def on_server_frame(session, frame, user_data):
        hd = frame.contents
        if hd.type == HEADERS and hd.flags & END_STREAM:
            state["requests"].append(hd.stream_id)
        return 0

    def on_client_frame(session, frame, user_data):
        hd = frame.contents
        if hd.type in (DATA, HEADERS) and hd.flags & END_STREAM:  # (0x01 is also SETTINGS' ACK)
            state["done"] += 1
        return 0

    def on_data(session, flags, stream_id, data, length, user_data):
        ctypes.string_at(data, length)  # a proxy would pass these bytes on
        return 0

    def on_close(session, stream_id, error_code, user_data):
        state["headers"].pop(stream_id, None)
        return 0

    def read_body(session, stream_id, buf, length, data_flags, source, user_data):
        ctypes.memmove(buf, BODY, len(BODY))
        data_flags[0] |= DATA_FLAG_EOF
        return len(BODY)

    keep = [HEADER_CB(on_header), FRAME_CB(on_server_frame), FRAME_CB(on_client_frame), DATA_CB(on_data),
            CLOSE_CB(on_close), READ_CB(read_body)]
    header_cb, server_frame_cb, client_frame_cb, data_cb, close_cb, read_cb = keep
    provider = DataProvider(None, read_cb)

    def session(new, frame_cb):
        callbacks = ctypes.c_void_p()
        lib.nghttp2_session_callbacks_new(ctypes.byref(callbacks))
        lib.nghttp2_session_callbacks_set_on_header_callback(callbacks, header_cb)
        lib.nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks, frame_cb)
        lib.nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks, data_cb)
        lib.nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, close_cb)
        made = ctypes.c_void_p()
        new.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        if new(ctypes.byref(made), callbacks, None) != 0:
            raise RuntimeError("nghttp2 session")
        lib.nghttp2_session_callbacks_del(callbacks)
        lib.nghttp2_submit_settings(made, 0, None, 0)
        return made

    server = session(lib.nghttp2_session_server_new, server_frame_cb)
    client = session(lib.nghttp2_session_client_new, client_frame_cb)
    out = ctypes.c_void_p()

    def pump(sender, receiver):
        while (n := lib.nghttp2_session_mem_send(sender, ctypes.byref(out))) > 0:
            if lib.nghttp2_session_mem_recv(receiver, ctypes.string_at(out, n), n) < 0:
                raise RuntimeError("nghttp2 mem_recv")

    pump(client, server)
    pump(server, client)
    started = time.perf_counter()
    for _ in range(requests):
        lib.nghttp2_submit_request(client, None, request_nv, len(REQUEST), None, None)
        pump(client, server)
        while state["requests"]:
            lib.nghttp2_submit_response(server, state["requests"].pop(), response_nv, len(RESPONSE),
                                        ctypes.byref(provider))
        pump(server, client)
        pump(client, server)
    elapsed = time.perf_counter() - started
    lib.nghttp2_session_del(server)
    lib.nghttp2_session_del(client)
    assert state["done"] == requests, state["done"]
    return elapsed / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    for name, measure in (("h2 (Python)", h2_per_request), ("libnghttp2 via ctypes", nghttp2_per_request)):
        best = min(measure(args.requests) for _ in range(3))
        print(f"{name:24} {best * 1e6:7.1f} us per request (both roles, best of 3 x {args.requests})")


if __name__ == "__main__":
    main()
