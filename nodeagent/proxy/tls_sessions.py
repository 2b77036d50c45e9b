"""A client's TLS 1.3 sessions, taken from and given to OpenSSL directly (CPython 3.11 leaks a
copy of each session read or offered through its own API, gh-116810), and the check that a
resumed session's peer certificate is still valid: OpenSSL never looks at certificates again
when a session is resumed, so the handshake (tls.py) refuses, on both sides, a resumed session
whose peer certificate (kept in the session) has expired."""

import ctypes
import ssl

from nodeagent.proxy.openssl import libssl, ssl_ctx

TLS1_3_VERSION = 0x0304


class SessionExpired(ssl.SSLError):
    """A resumed session whose peer certificate is no longer valid."""


def peer_not_after(sslobj: ssl.SSLObject) -> float | None:
    """When the peer's verified certificate (from the handshake or the resumed session) expires."""
    certificate = sslobj.getpeercert()
    return ssl.cert_time_to_seconds(certificate["notAfter"]) if certificate else None


def peer_not_after(sslobj: ssl.SSLObject) -> float | None:
    """When the peer's verified certificate (from the handshake or the resumed session) expires."""
    certificate = sslobj.getpeercert()
    return ssl.cert_time_to_seconds(certificate["notAfter"]) if certificate else None


def _ssl_of(sslobj: ssl.SSLObject, context: ssl.SSLContext) -> int | None:
    """The SSL* under an SSLObject (PySSLSocket: the header, a weakref, then the SSL*), if OpenSSL
    confirms it: a client connection of `context`'s SSL_CTX."""
    pointer = ctypes.c_void_p.from_address(id(sslobj._sslobj) + object.__basicsize__ + 8).value
    ctx = ssl_ctx(context)
    if pointer and ctx and libssl().SSL_get_SSL_CTX(pointer) == ctx and libssl().SSL_is_server(pointer) == 0:
        return pointer
    return None


def _session_of(session: ssl.SSLSession) -> int | None:
    """The SSL_SESSION* of an SSLSession (PySSLSession: right after the header), if OpenSSL confirms
    it: a TLS 1.3 session created when the Python object says it was."""
    pointer = ctypes.c_void_p.from_address(id(session) + object.__basicsize__).value
    lib = libssl()
    if (pointer and lib.SSL_SESSION_get_protocol_version(pointer) == TLS1_3_VERSION
            and lib.SSL_SESSION_get_time(pointer) == session.time):
        return pointer
    return None


class Session:
    """A client's resumable TLS 1.3 session, taken from OpenSSL itself (SSL_get1_session), with
    the fields of ssl.SSLSession that the session cache reads. Not `SSLObject.session`: CPython
    3.11 copies the session there and never frees the copy (gh-116810), about 6 KB per read
    (the peer's chain); a client read it after each full handshake, and behind a node whose
    processes each have their own ticket keys about half of the resumptions are full handshakes.
    This object holds one reference of its own, given back when it goes."""

    __slots__ = ("pointer", "time", "timeout", "ticket_lifetime_hint", "has_ticket")

    def __init__(self, pointer: int):
        lib = libssl()
        self.pointer = pointer
        self.time = lib.SSL_SESSION_get_time(pointer)
        self.timeout = lib.SSL_SESSION_get_timeout(pointer)
        self.ticket_lifetime_hint = lib.SSL_SESSION_get_ticket_lifetime_hint(pointer)
        self.has_ticket = lib.SSL_SESSION_has_ticket(pointer) == 1

    def __del__(self):
        libssl().SSL_SESSION_free(self.pointer)


def session_of(sslobj: ssl.SSLObject, context: ssl.SSLContext) -> Session | None:
    """A client connection's current TLS 1.3 session, without CPython's leaking copy; None where
    the connection's SSL* cannot be confirmed (then it is never resumed either)."""
    pointer = _ssl_of(sslobj, context)
    if pointer is None:
        return None
    lib = libssl()
    session = lib.SSL_get1_session(pointer)
    if not session:
        return None
    if lib.SSL_SESSION_get_protocol_version(session) != TLS1_3_VERSION:
        lib.SSL_SESSION_free(session)
        return None
    return Session(session)


def resume(sslobj: ssl.SSLObject, context: ssl.SSLContext, session: "Session | ssl.SSLSession") -> bool:
    """Offer `session` for resumption on a client SSLObject that has not started its handshake.

    Not through `wrap_bio(session=...)`: CPython before 3.12.5 and 3.13 (gh-116810) copies the
    session there and never frees the copy, about 12 KB (the peer's chain) per resumed handshake:
    the proxy grew by 6.5 KB per mesh connection and 120 MiB per 20,000. OpenSSL 3 needs no copy,
    so the session goes to SSL_set_session directly, once both pointers are confirmed; where they
    are not, the handshake is a full one (False)."""
    pointer = _ssl_of(sslobj, context)
    session_pointer = session.pointer if isinstance(session, Session) else _session_of(session)
    if pointer is None or session_pointer is None:
        return False
    return libssl().SSL_set_session(pointer, session_pointer) == 1

