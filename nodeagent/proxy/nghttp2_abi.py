"""libnghttp2's ABI as this project uses it, declared once (nghttp2.h of 1.52, Debian's
libnghttp2-14): constants, the structures read from callbacks, the callback types and the
functions with their argument types. nghttp2.py builds sessions on it.
"""

import ctypes

lib = ctypes.CDLL("libnghttp2.so.14")

# nghttp2_error (nghttp2.h)
ERR_INVALID_ARGUMENT = -501
ERR_DEFERRED = -508
ERR_STREAM_CLOSED = -510
ERR_TEMPORAL_CALLBACK_FAILURE = -521
ERR_HTTP_HEADER = -531  # a request or response that breaks HTTP's rules (RFC 9113, 8.2)
ERR_HTTP_MESSAGING = -532
ERR_REFUSED_STREAM = -533
ERR_CALLBACK_FAILURE = -902
ERR_FLOODED = -904
ERR_TOO_MANY_CONTINUATIONS = -905
# frame types, flags, header categories
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
FLAG_END_STREAM = 0x01
DATA_FLAG_EOF, DATA_FLAG_NO_END_STREAM = 0x01, 0x02
HCAT_REQUEST, HCAT_RESPONSE, HCAT_PUSH_RESPONSE, HCAT_HEADERS = range(4)
# nghttp2_settings_id
SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_INITIAL_WINDOW_SIZE = 0x2, 0x3, 0x4
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6


# --- the C structures read from callbacks ---

class FrameHd(ctypes.Structure):
    _fields_ = [("length", ctypes.c_size_t), ("stream_id", ctypes.c_int32), ("type", ctypes.c_uint8),
                ("flags", ctypes.c_uint8), ("reserved", ctypes.c_uint8)]


class PrioritySpec(ctypes.Structure):
    _fields_ = [("stream_id", ctypes.c_int32), ("weight", ctypes.c_int32), ("exclusive", ctypes.c_uint8)]


class HeadersFrame(ctypes.Structure):
    """nghttp2_headers with its frame header flattened (the same layout as FrameHd first): one
    view of a received frame gives its header and, for HEADERS, its category."""

    _fields_ = [("length", ctypes.c_size_t), ("stream_id", ctypes.c_int32), ("type", ctypes.c_uint8),
                ("flags", ctypes.c_uint8), ("reserved", ctypes.c_uint8), ("padlen", ctypes.c_size_t),
                ("pri_spec", PrioritySpec), ("nva", ctypes.c_void_p), ("nvlen", ctypes.c_size_t),
                ("cat", ctypes.c_int)]


class RstStreamFrame(ctypes.Structure):
    _fields_ = [("hd", FrameHd), ("error_code", ctypes.c_uint32)]


class GoawayFrame(ctypes.Structure):
    _fields_ = [("hd", FrameHd), ("last_stream_id", ctypes.c_int32), ("error_code", ctypes.c_uint32),
                ("opaque_data", ctypes.c_void_p), ("opaque_data_len", ctypes.c_size_t), ("reserved", ctypes.c_uint8)]


class Nv(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p), ("namelen", ctypes.c_size_t),
                ("valuelen", ctypes.c_size_t), ("flags", ctypes.c_uint8)]


class SettingsEntry(ctypes.Structure):
    _fields_ = [("settings_id", ctypes.c_int32), ("value", ctypes.c_uint32)]


READ_CB = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_size_t,
                           ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p, ctypes.c_void_p)


class DataProvider(ctypes.Structure):
    _fields_ = [("source", ctypes.c_void_p), ("read_callback", READ_CB)]


FRAME_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
# A field's name and value arrive as bytes (c_char_p: ctypes copies up to the first NUL, with no
# call of ours per field); the lengths tell whether a NUL cut one short.
HEADER_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                             ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint8, ctypes.c_void_p)
DATA_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint8, ctypes.c_int32, ctypes.c_void_p,
                           ctypes.c_size_t, ctypes.c_void_p)
CLOSE_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int32, ctypes.c_uint32, ctypes.c_void_p)
INVALID_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)

_vp, _int, _sz, _i32, _u32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_int32, ctypes.c_uint32


def _declare(name: str, restype, *argtypes):
    function = getattr(lib, name)
    function.restype, function.argtypes = restype, list(argtypes)
    return function


callbacks_new = _declare("nghttp2_session_callbacks_new", _int, _vp)
callbacks_del = _declare("nghttp2_session_callbacks_del", None, _vp)
set_on_begin_headers = _declare("nghttp2_session_callbacks_set_on_begin_headers_callback", None, _vp, FRAME_CB)
set_on_header = _declare("nghttp2_session_callbacks_set_on_header_callback", None, _vp, HEADER_CB)
set_on_frame_recv = _declare("nghttp2_session_callbacks_set_on_frame_recv_callback", None, _vp, FRAME_CB)
set_on_frame_send = _declare("nghttp2_session_callbacks_set_on_frame_send_callback", None, _vp, FRAME_CB)
set_on_data_chunk = _declare("nghttp2_session_callbacks_set_on_data_chunk_recv_callback", None, _vp, DATA_CB)
set_on_stream_close = _declare("nghttp2_session_callbacks_set_on_stream_close_callback", None, _vp, CLOSE_CB)
set_on_invalid_frame = _declare("nghttp2_session_callbacks_set_on_invalid_frame_recv_callback", None, _vp,
                                 INVALID_CB)
option_new = _declare("nghttp2_option_new", _int, _vp)
option_del = _declare("nghttp2_option_del", None, _vp)
session_server_new = _declare("nghttp2_session_server_new2", _int, _vp, _vp, _vp, _vp)
session_client_new = _declare("nghttp2_session_client_new2", _int, _vp, _vp, _vp, _vp)
session_del = _declare("nghttp2_session_del", None, _vp)
mem_recv = _declare("nghttp2_session_mem_recv", ctypes.c_ssize_t, _vp, ctypes.c_char_p, _sz)
mem_send = _declare("nghttp2_session_mem_send", ctypes.c_ssize_t, _vp, ctypes.POINTER(ctypes.c_void_p))
submit_settings = _declare("nghttp2_submit_settings", _int, _vp, ctypes.c_uint8, _vp, _sz)
set_local_window_size = _declare("nghttp2_session_set_local_window_size", _int, _vp, ctypes.c_uint8, _i32, _i32)
submit_request = _declare("nghttp2_submit_request", _i32, _vp, _vp, _vp, _sz, _vp, _vp)
submit_response = _declare("nghttp2_submit_response", _int, _vp, _i32, _vp, _sz, _vp)
submit_headers = _declare("nghttp2_submit_headers", _i32, _vp, ctypes.c_uint8, _i32, _vp, _vp, _sz, _vp)
submit_trailer = _declare("nghttp2_submit_trailer", _int, _vp, _i32, _vp, _sz)
submit_rst_stream = _declare("nghttp2_submit_rst_stream", _int, _vp, ctypes.c_uint8, _i32, _u32)
resume_data = _declare("nghttp2_session_resume_data", _int, _vp, _i32)
consume = _declare("nghttp2_session_consume", _int, _vp, _i32, _sz)
consume_connection = _declare("nghttp2_session_consume_connection", _int, _vp, _sz)
submit_goaway = _declare("nghttp2_submit_goaway", _int, _vp, ctypes.c_uint8, _i32, _u32, _vp, _sz)
submit_shutdown_notice = _declare("nghttp2_submit_shutdown_notice", _int, _vp)
last_proc_stream_id = _declare("nghttp2_session_get_last_proc_stream_id", _i32, _vp)
terminate = _declare("nghttp2_session_terminate_session", _int, _vp, _u32)
want_read = _declare("nghttp2_session_want_read", _int, _vp)
want_write = _declare("nghttp2_session_want_write", _int, _vp)
remote_settings = _declare("nghttp2_session_get_remote_settings", _u32, _vp, _int)
strerror = _declare("nghttp2_strerror", ctypes.c_char_p, _int)
options = {name: _declare(f"nghttp2_option_set_{name}", None, _vp, *args) for name, args in {
    "no_auto_window_update": (_int,), "no_http_messaging": (_int,), "no_closed_streams": (_int,),
    "max_outbound_ack": (_sz,), "max_settings": (_sz,), "max_continuations": (_sz,),
    "max_reserved_remote_streams": (_u32,), "stream_reset_rate_limit": (ctypes.c_uint64, ctypes.c_uint64),
}.items()}

MAX_CONTINUATIONS = 8  # nghttp2's default: a 64 KiB header list fits in 5 frames of 16 KiB
