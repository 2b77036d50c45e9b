"""The proxy-to-proxy hop: mutual TLS 1.3 to the destination pod's mesh port,
then an 8-byte header naming the original destination port.

    magic "NAGT" | version (1) | protocol hint (1) | port (2, big-endian)

The hint is what the source detected (hop.Hint: 0 opaque, 1 HTTP/1, 2 HTTP/2, 3 not yet:
the connection was opened before the client spoke). The destination serves HTTP/1 and
HTTP/2 per request, forwards opaque as it comes, and detects for itself on 3 (or a hint
it does not know); agents of earlier versions ignore the hint. The
source checks that the server proved the identity it expected for the
destination pod; the destination checks the client's chain (ssl does) and
authorizes its identity.
"""

import asyncio
import ssl
import struct
import time
import weakref
from collections.abc import Callable

from nodeagent.identity import naming
from nodeagent.proxy.tls import handshake
from nodeagent.proxy.tls_sessions import Session, SessionExpired, peer_not_after

MAGIC = b"NAGT"
VERSION = 1
HEADER = struct.Struct("!4sBBH")


class TunnelError(ConnectionError):
    """A hop that must not carry traffic. `reason` is short and from a fixed set (for
    metrics); the message has the details (for logs)."""

    def __init__(self, message: str, reason: str = "tunnel error"):
        super().__init__(message)
        self.reason = reason


def encode_header(port: int, hint: int) -> bytes:
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return HEADER.pack(MAGIC, VERSION, hint, port)


def decode_header(data: bytes) -> tuple[int, int]:
    """(port, hint) from the first HEADER.size bytes."""
    magic, version, hint, port = HEADER.unpack(data[:HEADER.size])
    if magic != MAGIC or version != VERSION or port == 0:
        raise TunnelError(f"not a nodeagent tunnel header: {data[:HEADER.size]!r}", "bad tunnel header")
    return port, hint


def peer_identity(transport: asyncio.Transport) -> str | None:
    """The SPIFFE URI in the peer's verified certificate, if exactly one."""
    ssl_object = transport.get_extra_info("ssl_object")
    certificate = ssl_object.getpeercert() if ssl_object else None
    if not certificate:
        return None
    uris = [value for kind, value in certificate.get("subjectAltName", ()) if kind == "URI"]
    return uris[0] if len(uris) == 1 else None


def handshake_failure_reason(error: BaseException) -> str:
    """A short, stable reason for metrics and logs."""
    if isinstance(error, SessionExpired):
        return "resumed session of an expired certificate"
    if isinstance(error, ssl.SSLCertVerificationError):
        return error.verify_message or "certificate verification failed"
    text = str(error).lower()
    if "peer did not return a certificate" in text or "certificate required" in text:
        return "no client certificate"
    if "unknown ca" in text or "unknown_ca" in text:
        return "certificate from another trust anchor"
    if "certificate expired" in text:
        return "certificate has expired"
    if isinstance(error, ssl.SSLError):
        return error.reason or "tls error"
    return type(error).__name__


class SessionCache:
    """Resumable TLS sessions per (client context, server): a resumed handshake skips the
    certificate signatures and chain checks (the identities proven the first time stay in the
    session), which is most of a handshake's cost. A session is offered only while its ticket
    lives and the server certificate it proved is valid; the sessions of a client certificate go
    when it is renewed or its identity dropped (`retire`, from WorkloadIdentities.on_retire).
    At most `size` sessions, the oldest out first.

    Keyed by the context object, not its id: a cached session does not keep its context alive
    (tls_sessions.Session holds OpenSSL's pointer only), and a freed context's id can be reused
    by another identity's context, which must never be offered the first one's session."""

    def __init__(self, size: int = 1024, clock=time.time):
        self.size, self.clock = size, clock
        self._sessions: dict[tuple[ssl.SSLContext, str], tuple[Session, float]] = {}  # -> (session, expiry)
        # A session can arrive after its client certificate was retired (the server's first
        # bytes come late on an idle tunnel): it must not be cached then.
        self._retired: "weakref.WeakSet[ssl.SSLContext]" = weakref.WeakSet()

    def get(self, context: ssl.SSLContext, server: str) -> "Session | None":
        key = (context, server)
        session, expires = self._sessions.get(key, (None, 0.0))
        if session is not None and self.clock() >= expires:
            del self._sessions[key]
            return None
        return session

    def put(self, context: ssl.SSLContext, server: str, session: "Session | None",
            server_not_after: float | None) -> None:
        if session is None or not session.has_ticket or server_not_after is None or context in self._retired:
            return
        if len(self._sessions) >= self.size:
            self._sessions.pop(next(iter(self._sessions)))
        # The server's ticket lifetime (not the client's own session timeout), and its certificate.
        ticket_end = session.time + min(session.timeout, session.ticket_lifetime_hint)
        self._sessions[(context, server)] = (session, min(ticket_end, server_not_after))

    def forget(self, context: ssl.SSLContext, server: str) -> None:
        self._sessions.pop((context, server), None)

    def retire(self, context: ssl.SSLContext) -> None:
        """The client certificate behind `context` is renewed or its identity dropped."""
        self._retired.add(context)
        for key in [key for key in self._sessions if key[0] is context]:
            del self._sessions[key]

    def __len__(self) -> int:
        return len(self._sessions)


async def client_handshake(transport: asyncio.Transport, protocol: asyncio.Protocol, context: ssl.SSLContext,
                           expected: naming.Identity, port: int, hint: int, timeout_s: float,
                           sessions: SessionCache | None = None, server: str = "",
                           on_done: Callable[[bool], None] | None = None,
                           charge: Callable[[float], None] | None = None) -> asyncio.Transport:
    """TLS over a connected transport, identity checked, header sent: the tunnel's transport.
    `on_done(resumed)` once the identity is proven (tls_handshakes_total); `charge`: tls.handshake's."""
    try:
        tls = await handshake(transport, protocol, context, False, timeout_s, expected.server_name,
                              session=sessions.get(context, server) if sessions else None, charge=charge)
    except (ssl.SSLError, OSError, asyncio.TimeoutError) as e:
        transport.abort()
        if sessions is not None:
            sessions.forget(context, server)  # never offer again a session that failed
        reason = handshake_failure_reason(e)
        raise TunnelError(f"handshake with {expected} failed: {reason}", reason) from e
    proven = peer_identity(tls)
    if proven != expected.uri:
        tls.abort()
        raise TunnelError(f"wrong identity: expected {expected.uri}, the server proved {proven}", "wrong identity")
    ssl_object = tls.get_extra_info("ssl_object")
    if on_done is not None:
        on_done(ssl_object.session_reused)
    if sessions is not None and not ssl_object.session_reused:
        # Only a full handshake's session is kept, and then offered again and again while it is
        # valid (TLS 1.3 tickets resume more than once here; no early data, so no replay). It is
        # taken from OpenSSL (tls_sessions.session_of), never through CPython 3.11's SSLObject.session,
        # which leaks a copy per read (gh-116810).
        not_after = peer_not_after(ssl_object)
        tls.on_session = lambda session: sessions.put(context, server, session, not_after)
    tls.write(encode_header(port, hint))
    return tls
