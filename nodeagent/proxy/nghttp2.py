"""libnghttp2 (C) through ctypes: one HTTP/2 session, bytes in and bytes out, no I/O.

Why ctypes: the library is Debian's libnghttp2-14 (curl already needs it), ctypes is in the
standard library, and nothing is compiled at install time. cffi's ABI mode would call a little
faster but is one more package; its API mode would need a compiler and libnghttp2-dev at
install. The codec's share of a request measured 19 us this way against h2's 120 us
(benchmarks/h2codec.py).

`Session` wraps nghttp2_session: `receive(bytes)` decodes and calls the `handler`'s methods,
`send()` returns what nghttp2 has to send (pulling bodies from `handler.read_body`, deferred
when there is nothing yet; `resume` wakes a stream). Flow control is manual
(no_auto_window_update): received DATA is acknowledged with `consume` once passed on. The
session's own flood limits are set to the same numbers as h2budget.py, so either trips first
with the same meaning. A Python exception in a callback is caught, logged, and fails the
session (NGHTTP2_ERR_CALLBACK_FAILURE): it never unwinds through C.
"""

import ctypes
import enum
import itertools
import logging
import struct

from nodeagent.proxy import h2budget
from nodeagent.proxy import nghttp2_abi as abi
from nodeagent.proxy.nghttp2_abi import (  # noqa: F401 (what users of sessions need)
    ERR_HTTP_HEADER, ERR_HTTP_MESSAGING, ERR_REFUSED_STREAM, HCAT_HEADERS, HCAT_REQUEST, HCAT_RESPONSE,
    MAX_CONTINUATIONS, SETTINGS_ENABLE_PUSH,
    SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_MAX_HEADER_LIST_SIZE)

log = logging.getLogger(__name__)

class ErrorCodes(enum.IntEnum):
    """HTTP/2 error codes (RFC 9113, section 7)."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class CodecError(Exception):
    """The session failed (the peer broke the protocol, or a call was refused); `flood`: it
    failed because the peer went over one of nghttp2's own flood limits."""

    def __init__(self, message: str, code: int = 0, flood: h2budget.Flood | None = None):
        super().__init__(message)
        self.code, self.flood = code, flood


# --- one set of C callbacks for every session; user_data is the session's key ---

_sessions: dict[int, "Session"] = {}
_keys = itertools.count(1)
_frame_at = abi.HeadersFrame.from_address  # a received frame's header (and a HEADERS' category)
_string_at = ctypes.string_at
_memmove = ctypes.memmove


# Each callback looks its session up and catches what it raises itself (no wrapper: these
# run a few dozen times per request): a callback must not raise into C; an exception fails
# the session, and is logged.

def _failed(session, error: Exception, callback: str) -> int:
    session.failure = error  # a bug of ours, on input a peer chose: fail the connection, not the process
    log.exception("HTTP/2 session callback %s failed", callback)
    return abi.ERR_CALLBACK_FAILURE


def _on_begin_headers(session_ptr, frame, key):
    # A header block is never interleaved with another (RFC 9113, 4.3): one list per session,
    # a new one at each block's start, handed over when its frame is received.
    session = _sessions.get(key or 0)
    if session is None:
        return abi.ERR_CALLBACK_FAILURE
    session._receiving = []
    session.block_size = 0
    return 0


def _on_header(session_ptr, frame, name, namelen, value, valuelen, flags, key):
    # The hottest callback (one per field). `name` and `value` are bytes already
    # (abi.HEADER_CB), cut at a NUL if there was one.
    session = _sessions.get(key or 0)
    if session is None:
        return abi.ERR_CALLBACK_FAILURE
    try:
        session.block_size += namelen + valuelen + 32
        if session.block_size > h2budget.MAX_HEADER_LIST:
            session.header_overflow = True
            return abi.ERR_CALLBACK_FAILURE  # a connection error: the peer ignored our SETTINGS
        if len(name) != namelen or len(value) != valuelen:
            # A NUL in a field: malformed (RFC 9113, 8.2.1), never passed on; the stream is
            # reset. (What clients send nghttp2 has refused before this; endpoints' is not checked.)
            return abi.ERR_TEMPORAL_CALLBACK_FAILURE
        session._receiving.append((name, value))
        return 0
    except Exception as e:
        return _failed(session, e, "on_header")


def _on_frame_recv(session_ptr, frame, key):
    session = _sessions.get(key or 0)
    if session is None:
        return abi.ERR_CALLBACK_FAILURE
    try:
        view = _frame_at(frame)
        kind = view.type
        if kind == abi.DATA:
            if view.flags & abi.FLAG_END_STREAM:
                session.handler.h2_end_stream(view.stream_id)
        elif kind == abi.HEADERS:
            headers, session._receiving = session._receiving, []
            session.handler.h2_headers(view.stream_id, headers, view.cat, bool(view.flags & abi.FLAG_END_STREAM))
        elif kind == abi.SETTINGS:
            session._remote_max_streams = None  # read again when next asked
        elif kind == abi.RST_STREAM:
            session.handler.h2_reset(view.stream_id, abi.RstStreamFrame.from_address(frame).error_code)
        elif kind == abi.GOAWAY:
            goaway = abi.GoawayFrame.from_address(frame)
            session.handler.h2_goaway(goaway.last_stream_id, goaway.error_code)
        return 0
    except Exception as e:
        return _failed(session, e, "on_frame_recv")


def _on_frame_send(session_ptr, frame, key):
    session = _sessions.get(key or 0)
    if session is None:
        return abi.ERR_CALLBACK_FAILURE
    try:
        if _frame_at(frame).type == abi.GOAWAY:
            code = abi.GoawayFrame.from_address(frame).error_code
            if code and code != session.terminated_with:
                session.handler.h2_connection_error(code)  # nghttp2 found the peer broke the protocol
        return 0
    except Exception as e:
        return _failed(session, e, "on_frame_send")


def _on_data_chunk(session_ptr, flags, stream_id, data, length, key):
    session = _sessions.get(key or 0)
    if session is None:
        return abi.ERR_CALLBACK_FAILURE
    try:
        session.handler.h2_data(stream_id, _string_at(data, length))
        return 0
    except Exception as e:
        return _failed(session, e, "on_data_chunk")


def _on_stream_close(session_ptr, stream_id, error_code, key):
    session = _sessions.get(key or 0)
    if session is None:
        return abi.ERR_CALLBACK_FAILURE
    try:
        session.handler.h2_closed(stream_id, error_code)
        return 0
    except Exception as e:
        return _failed(session, e, "on_stream_close")


def _on_invalid_frame(session_ptr, frame, lib_error_code, key):
    session = _sessions.get(key or 0)
    if session is None:
        return abi.ERR_CALLBACK_FAILURE
    try:
        session.handler.h2_invalid(_frame_at(frame).stream_id, lib_error_code)
        return 0
    except Exception as e:
        return _failed(session, e, "on_invalid_frame")


def _read_body(session_ptr, stream_id, buf, length, data_flags, source, key):
    session = _sessions.get(key or 0)
    if session is None:
        return abi.ERR_CALLBACK_FAILURE
    try:
        piece, eof, trailers = session.handler.read_body(stream_id, length)
        if piece is None:
            return abi.ERR_DEFERRED
        size = len(piece)
        if size:
            _memmove(buf, piece, size)
        if eof:
            if trailers:
                data_flags[0] |= abi.DATA_FLAG_EOF | abi.DATA_FLAG_NO_END_STREAM
                nva, count = _nv(trailers)
                if abi.submit_trailer(session.ptr, stream_id, nva, count) != 0:
                    return abi.ERR_TEMPORAL_CALLBACK_FAILURE
            else:
                data_flags[0] |= abi.DATA_FLAG_EOF
        return size
    except Exception as e:
        return _failed(session, e, "read_body")


_c_callbacks = [abi.FRAME_CB(_on_begin_headers), abi.HEADER_CB(_on_header), abi.FRAME_CB(_on_frame_recv),
                abi.FRAME_CB(_on_frame_send), abi.DATA_CB(_on_data_chunk), abi.CLOSE_CB(_on_stream_close),
                abi.INVALID_CB(_on_invalid_frame)]
_READ = abi.READ_CB(_read_body)
_PROVIDER = abi.DataProvider(None, _READ)
_PROVIDER_REF = ctypes.byref(_PROVIDER)


def _make_callbacks():
    callbacks = ctypes.c_void_p()
    if abi.callbacks_new(ctypes.byref(callbacks)) != 0:
        raise MemoryError("nghttp2_session_callbacks_new")
    setters = (abi.set_on_begin_headers, abi.set_on_header, abi.set_on_frame_recv, abi.set_on_frame_send,
               abi.set_on_data_chunk, abi.set_on_stream_close, abi.set_on_invalid_frame)
    for setter, callback in zip(setters, _c_callbacks):
        setter(callbacks, callback)
    return callbacks


_CALLBACKS = _make_callbacks()  # nghttp2 copies them into each session: one set for the process


# An nghttp2_nv array is packed in one struct.pack call, not built field by field as ctypes
# structures (a quarter of the cost): each entry points into its bytes objects, which the
# caller's header list keeps alive while nghttp2 copies them (every submit copies).
_BYTES_DATA = bytes.__basicsize__ - 1  # where a bytes object's data starts (CPython's PyBytesObject)
_NV_ENTRY = "PPNNB7x"  # name, value, namelen, valuelen, flags; padded as nghttp2_nv
_nv_packers: dict[int, struct.Struct] = {}


def _nv(headers: list):
    """An nghttp2_nv array of (name, value) bytes pairs, as a bytes buffer."""
    count = len(headers)
    packer = _nv_packers.get(count)
    if packer is None:
        if count > 4096:  # larger lists are rare: no packer kept for them
            return _nv_slow(headers)
        packer = _nv_packers[count] = struct.Struct(_NV_ENTRY * count)
    fields = []
    for name, value in headers:
        if type(name) is not bytes or type(value) is not bytes:
            return _nv_slow(headers)
        fields += (id(name) + _BYTES_DATA, id(value) + _BYTES_DATA, len(name), len(value), 0)
    return packer.pack(*fields), count


def _nv_slow(headers: list):
    """The same array as ctypes structures, for any bytes-like names and values."""
    count = len(headers)
    return (abi.Nv * count)(*[(bytes(name), bytes(value), len(name), len(value), 0)
                              for name, value in headers]), count


def _check_layout() -> None:
    """The packed array must be what nghttp2 reads: checked once, at import."""
    name, value = b"x-check", b"packed"
    if struct.calcsize(_NV_ENTRY) != ctypes.sizeof(abi.Nv) or \
            ctypes.string_at(id(name) + _BYTES_DATA, len(name)) != name:
        raise ImportError("nghttp2.py: the nv layout does not match this Python")
    packed, _ = _nv([(name, value)])
    entry = abi.Nv.from_buffer_copy(packed)
    if (entry.name, entry.value, entry.namelen, entry.valuelen) != (name, value, len(name), len(value)):
        raise ImportError("nghttp2.py: the packed nv array does not read back")


_check_layout()


class Session:
    """One nghttp2_session. `server`: the side that answers requests. `validate`: nghttp2's
    HTTP messaging checks on what arrives (pseudo-headers, content-length, field syntax)."""

    def __init__(self, handler, server: bool, settings: dict[int, int], connection_window: int,
                 validate: bool = True):
        self.handler = handler
        self.key = next(_keys)
        self.failure: Exception | None = None
        self.header_overflow = False
        self.terminated_with = 0  # the error code of a GOAWAY we asked for ourselves
        self._receiving: list = []  # the header block being received (on_header adds to it)
        self._remote_max_streams: int | None = None
        self.block_size = 0  # RFC 9113's size of the header block being (or last) received
        self._out = ctypes.c_void_p()
        option = ctypes.c_void_p()
        if abi.option_new(ctypes.byref(option)) != 0:
            raise MemoryError("nghttp2_option_new")
        try:
            abi.options["no_auto_window_update"](option, 1)
            abi.options["no_closed_streams"](option, 1)
            abi.options["no_http_messaging"](option, 0 if validate else 1)
            abi.options["max_outbound_ack"](option, h2budget.MAX_UNREAD_CONTROL)
            abi.options["max_settings"](option, h2budget.MAX_SETTINGS_ENTRIES)
            abi.options["max_continuations"](option, abi.MAX_CONTINUATIONS)
            abi.options["stream_reset_rate_limit"](option, h2budget.RESET_BURST, int(h2budget.RESET_RATE))
            if not server:
                abi.options["max_reserved_remote_streams"](option, 0)  # no server push
            ptr = ctypes.c_void_p()
            new = abi.session_server_new if server else abi.session_client_new
            if new(ctypes.byref(ptr), _CALLBACKS, ctypes.c_void_p(self.key), option) != 0:
                raise MemoryError("nghttp2_session_new")
        finally:
            abi.option_del(option)
        self.ptr = ptr
        _sessions[self.key] = self
        entries = (abi.SettingsEntry * len(settings))(*settings.items())
        self._check(abi.submit_settings(ptr, 0, entries, len(settings)), "settings")
        self._check(abi.set_local_window_size(ptr, 0, 0, connection_window), "window")

    def _check(self, result: int, what: str) -> int:
        if result < 0:
            raise CodecError(f"nghttp2 {what}: {abi.strerror(result).decode()}", result)
        return result

    def close(self) -> None:
        """Free the C session (never from inside one of its callbacks)."""
        if self.ptr:
            _sessions.pop(self.key, None)
            abi.session_del(self.ptr)
            self.ptr = None

    # --- bytes in, bytes out ---

    def receive(self, data: bytes) -> None:
        if not self.ptr:
            raise CodecError("session closed")
        result = abi.mem_recv(self.ptr, data, len(data))
        if result < 0:
            if self.header_overflow:
                raise CodecError("header list over the limit", ErrorCodes.PROTOCOL_ERROR)
            if result == abi.ERR_FLOODED:  # more control answers queued than max_outbound_ack
                raise CodecError("flooded", ErrorCodes.ENHANCE_YOUR_CALM, h2budget.Flood.UNREAD_CONTROL)
            if result == abi.ERR_TOO_MANY_CONTINUATIONS:
                raise CodecError("too many CONTINUATIONs", ErrorCodes.ENHANCE_YOUR_CALM, h2budget.Flood.HEADER_BLOCK)
            raise CodecError(f"nghttp2 receive: {abi.strerror(result).decode()}", ErrorCodes.PROTOCOL_ERROR)

    def send(self) -> bytes:
        """The next frames to send (b"" when there is nothing): one call of nghttp2_session_mem_send."""
        if not self.ptr:
            return b""
        size = abi.mem_send(self.ptr, ctypes.byref(self._out))
        if size < 0:
            raise CodecError(f"nghttp2 send: {abi.strerror(size).decode()}", ErrorCodes.INTERNAL_ERROR)
        return ctypes.string_at(self._out, size) if size else b""

    def wants_io(self) -> bool:
        return bool(self.ptr) and bool(abi.want_read(self.ptr) or abi.want_write(self.ptr))

    # --- what we send ---

    def submit_request(self, headers: list, body: bool) -> int:
        if not self.ptr:
            raise CodecError("session closed")
        nva, count = _nv(headers)
        return self._check(abi.submit_request(self.ptr, None, nva, count, _PROVIDER_REF if body else None, None),
                           "request")

    def submit_response(self, stream_id: int, headers: list, body: bool) -> bool:
        if not self.ptr:
            return False
        nva, count = _nv(headers)
        return abi.submit_response(self.ptr, stream_id, nva, count, _PROVIDER_REF if body else None) == 0

    def submit_informational(self, stream_id: int, headers: list) -> bool:
        if not self.ptr:
            return False
        nva, count = _nv(headers)
        return abi.submit_headers(self.ptr, 0, stream_id, None, nva, count, None) >= 0

    def resume(self, stream_id: int) -> None:
        if self.ptr:
            abi.resume_data(self.ptr, stream_id)  # an error means nothing was deferred there: nothing to do

    def reset(self, stream_id: int, code: int) -> None:
        if self.ptr:
            abi.submit_rst_stream(self.ptr, 0, stream_id, code)

    def consume(self, stream_id: int, size: int) -> None:
        if self.ptr and abi.consume(self.ptr, stream_id, size) != 0:
            abi.consume_connection(self.ptr, size)  # the stream is gone: the connection's window still counts

    def terminate(self, code: int) -> None:
        """GOAWAY with `code` (the last stream id is the last one nghttp2 processed). With an
        error, nothing is sent after it; without, what was submitted before still goes."""
        self.terminated_with = code
        if not self.ptr:
            return
        if code:
            abi.terminate(self.ptr, code)
        else:
            abi.submit_goaway(self.ptr, 0, abi.last_proc_stream_id(self.ptr), 0, None, 0)

    def shutdown_notice(self) -> None:
        """A server's first GOAWAY of a graceful shutdown (last stream id 2^31-1): open no new stream."""
        if self.ptr:
            abi.submit_shutdown_notice(self.ptr)

    def remote_max_concurrent_streams(self) -> int:
        """The peer's SETTINGS_MAX_CONCURRENT_STREAMS (asked of nghttp2 once per SETTINGS received)."""
        if not self.ptr:
            return 0
        if self._remote_max_streams is None:
            self._remote_max_streams = abi.remote_settings(self.ptr, abi.SETTINGS_MAX_CONCURRENT_STREAMS)
        return self._remote_max_streams
