"""OpenSSL itself, through ctypes, where Python's ssl module stops: the libssl that Python is
linked with, a context's SSL_CTX*, and the session lifetime a server context gives its tickets
(SSL_CTX_set_timeout, which Python's ssl does not expose). Every pointer read from a CPython
object is used only once OpenSSL, asked through it, confirms it."""

import ctypes
import functools
import logging
import ssl

log = logging.getLogger("nodeagent.tls")


@functools.cache
def libssl() -> ctypes.CDLL:
    """The libssl that Python's own _ssl module is linked with (dlsym searches its dependencies)."""
    import _ssl

    lib = ctypes.CDLL(getattr(_ssl, "__file__", None))
    lib.SSL_CTX_get_options.restype, lib.SSL_CTX_get_options.argtypes = ctypes.c_uint64, [ctypes.c_void_p]
    lib.SSL_CTX_set_timeout.restype, lib.SSL_CTX_set_timeout.argtypes = ctypes.c_long, [ctypes.c_void_p, ctypes.c_long]
    lib.SSL_CTX_get_timeout.restype, lib.SSL_CTX_get_timeout.argtypes = ctypes.c_long, [ctypes.c_void_p]
    lib.SSL_get_SSL_CTX.restype, lib.SSL_get_SSL_CTX.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    lib.SSL_is_server.restype, lib.SSL_is_server.argtypes = ctypes.c_int, [ctypes.c_void_p]
    lib.SSL_set_session.restype, lib.SSL_set_session.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p]
    lib.SSL_SESSION_get_time.restype, lib.SSL_SESSION_get_time.argtypes = ctypes.c_long, [ctypes.c_void_p]
    lib.SSL_SESSION_get_protocol_version.restype = ctypes.c_int
    lib.SSL_SESSION_get_protocol_version.argtypes = [ctypes.c_void_p]
    lib.SSL_get1_session.restype, lib.SSL_get1_session.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    lib.SSL_SESSION_free.restype, lib.SSL_SESSION_free.argtypes = None, [ctypes.c_void_p]
    lib.SSL_SESSION_get_timeout.restype, lib.SSL_SESSION_get_timeout.argtypes = ctypes.c_long, [ctypes.c_void_p]
    lib.SSL_SESSION_get_ticket_lifetime_hint.restype = ctypes.c_ulong
    lib.SSL_SESSION_get_ticket_lifetime_hint.argtypes = [ctypes.c_void_p]
    lib.SSL_SESSION_has_ticket.restype, lib.SSL_SESSION_has_ticket.argtypes = ctypes.c_int, [ctypes.c_void_p]
    return lib



def ssl_ctx(context: ssl.SSLContext) -> int | None:
    """The context's SSL_CTX*: CPython keeps it right after the object header (PySSLContext in
    Modules/_ssl.c). Used only if OpenSSL, asked through it, reports the context's own options."""
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if pointer and libssl().SSL_CTX_get_options(pointer) == int(context.options):
        return pointer
    return None


def session_lifetime(context: ssl.SSLContext) -> int | None:
    """SSL_CTX_get_timeout: how long the sessions (and tickets) the context issues live, in seconds."""
    pointer = ssl_ctx(context)
    return libssl().SSL_CTX_get_timeout(pointer) if pointer else None


def limit_session_lifetime(context: ssl.SSLContext, seconds: int) -> None:
    """Sessions and tickets issued by this server context live `seconds` at most. Below one
    second, or where the context's SSL_CTX cannot be reached, it issues no tickets at all."""
    pointer = ssl_ctx(context) if seconds >= 1 else None
    if pointer is None:
        if seconds >= 1:
            log.warning("cannot set the TLS session lifetime in this Python: session resumption is off")
        context.num_tickets = 0  # no resumption rather than resumption for too long
        return
    libssl().SSL_CTX_set_timeout(pointer, seconds)

