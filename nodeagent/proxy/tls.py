"""TLS over an asyncio transport, with half-close.

asyncio's and uvloop's TLS transports cannot write an EOF, so a client that
half-closes (sends everything, shuts down its sending side, then reads the
answer) would hang on a mesh hop. Here TLS 1.3 runs on ssl.SSLObject over
memory BIOs: `write_eof()` sends close_notify and keeps reading, as TLS 1.3
allows; a close_notify from the peer is an EOF to the protocol. OpenSSL does
every byte's work; Python handles each TLS record, not each byte.

Session lifetimes: OpenSSL never looks at certificates again when a session is
resumed, so `handshake` refuses a resumed session whose peer certificate (kept
in the session) has expired, on both sides; `limit_session_lifetime` bounds
the tickets a server context issues (SSL_CTX_set_timeout, which Python's ssl
does not expose).
"""

import asyncio
import ctypes
import functools
import logging
import os
import ssl
import time

log = logging.getLogger("nodeagent.tls")
READ_CHUNK = 256 * 1024


class SessionExpired(ssl.SSLError):
    """A resumed session whose peer certificate is no longer valid."""


def peer_not_after(sslobj: ssl.SSLObject) -> float | None:
    """When the peer's verified certificate (from the handshake or the resumed session) expires."""
    certificate = sslobj.getpeercert()
    return ssl.cert_time_to_seconds(certificate["notAfter"]) if certificate else None


@functools.cache
def _libssl() -> ctypes.CDLL:
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


TLS1_3_VERSION = 0x0304


def _ssl_of(sslobj: ssl.SSLObject, context: ssl.SSLContext) -> int | None:
    """The SSL* under an SSLObject (PySSLSocket: the header, a weakref, then the SSL*), if OpenSSL
    confirms it: a client connection of `context`'s SSL_CTX."""
    pointer = ctypes.c_void_p.from_address(id(sslobj._sslobj) + object.__basicsize__ + 8).value
    ctx = _ssl_ctx(context)
    if pointer and ctx and _libssl().SSL_get_SSL_CTX(pointer) == ctx and _libssl().SSL_is_server(pointer) == 0:
        return pointer
    return None


def _session_of(session: ssl.SSLSession) -> int | None:
    """The SSL_SESSION* of an SSLSession (PySSLSession: right after the header), if OpenSSL confirms
    it: a TLS 1.3 session created when the Python object says it was."""
    pointer = ctypes.c_void_p.from_address(id(session) + object.__basicsize__).value
    lib = _libssl()
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
        lib = _libssl()
        self.pointer = pointer
        self.time = lib.SSL_SESSION_get_time(pointer)
        self.timeout = lib.SSL_SESSION_get_timeout(pointer)
        self.ticket_lifetime_hint = lib.SSL_SESSION_get_ticket_lifetime_hint(pointer)
        self.has_ticket = lib.SSL_SESSION_has_ticket(pointer) == 1

    def __del__(self):
        _libssl().SSL_SESSION_free(self.pointer)


def session_of(sslobj: ssl.SSLObject, context: ssl.SSLContext) -> Session | None:
    """A client connection's current TLS 1.3 session, without CPython's leaking copy; None where
    the connection's SSL* cannot be confirmed (then it is never resumed either)."""
    pointer = _ssl_of(sslobj, context)
    if pointer is None:
        return None
    lib = _libssl()
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
    return _libssl().SSL_set_session(pointer, session_pointer) == 1


def _ssl_ctx(context: ssl.SSLContext) -> int | None:
    """The context's SSL_CTX*: CPython keeps it right after the object header (PySSLContext in
    Modules/_ssl.c). Used only if OpenSSL, asked through it, reports the context's own options."""
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if pointer and _libssl().SSL_CTX_get_options(pointer) == int(context.options):
        return pointer
    return None


def session_lifetime(context: ssl.SSLContext) -> int | None:
    """SSL_CTX_get_timeout: how long the sessions (and tickets) the context issues live, in seconds."""
    pointer = _ssl_ctx(context)
    return _libssl().SSL_CTX_get_timeout(pointer) if pointer else None


def limit_session_lifetime(context: ssl.SSLContext, seconds: int) -> None:
    """Sessions and tickets issued by this server context live `seconds` at most. Below one
    second, or where the context's SSL_CTX cannot be reached, it issues no tickets at all."""
    pointer = _ssl_ctx(context) if seconds >= 1 else None
    if pointer is None:
        if seconds >= 1:
            log.warning("cannot set the TLS session lifetime in this Python: session resumption is off")
        context.num_tickets = 0  # no resumption rather than resumption for too long
        return
    _libssl().SSL_CTX_set_timeout(pointer, seconds)


class TlsTransport(asyncio.Transport):
    def __init__(self, raw: asyncio.Transport, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO):
        super().__init__()
        self._raw, self._ssl, self._in, self._out = raw, sslobj, incoming, outgoing
        self._protocol: asyncio.Protocol | None = None
        self.on_session = None  # called once with the resumable session, when the peer's tickets are in
        self._eof_sent = False
        self._eof_received = False
        self._closed = False

    # -- sending --

    def _flush(self) -> None:
        pending = self._out.read()
        if pending and not self._raw.is_closing():
            self._raw.write(pending)

    def write(self, data) -> None:
        if self._eof_sent or self._closed or not data:
            return
        self._ssl.write(data)
        self._flush()

    def writelines(self, chunks) -> None:
        self.write(b"".join(chunks))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._eof_sent:
            return
        self._eof_sent = True
        try:
            self._ssl.unwrap()  # sends close_notify; the peer's arrives (or not) later
        except (ssl.SSLWantReadError, ssl.SSLError):
            pass
        self._flush()
        if self._eof_received:
            self._raw.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._eof_sent:
            self.write_eof()
        self._raw.close()

    def abort(self) -> None:
        self._closed = True
        self._raw.abort()

    def is_closing(self) -> bool:
        return self._closed or self._raw.is_closing()

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self._raw.set_write_buffer_limits(high, low)

    # -- receiving --

    def pause_reading(self) -> None:
        self._raw.pause_reading()

    def resume_reading(self) -> None:
        self._raw.resume_reading()

    def is_reading(self) -> bool:
        return self._raw.is_reading()

    def set_protocol(self, protocol) -> None:
        self._protocol = protocol

    def get_protocol(self):
        return self._protocol

    def get_extra_info(self, name, default=None):
        if name == "ssl_object":
            return self._ssl
        if name == "peercert":
            return self._ssl.getpeercert()
        return self._raw.get_extra_info(name, default)

    def _decrypt(self) -> None:
        """Hand every complete record to the protocol; a close_notify is an EOF."""
        while not self._eof_received:
            try:
                data = self._ssl.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._offer_session()
                self._peer_eof()
                break
            except ssl.SSLError:
                self.abort()  # a corrupt or forged record: nothing after it can be trusted
                return
            if not data:
                self._offer_session()
                self._peer_eof()
                break
            self._offer_session()
            self._protocol.data_received(data)
            if not self._in.pending and not self._ssl.pending():
                break  # all read: no SSLWantReadError raised (and caught) per record
        self._flush()  # post-handshake messages (session tickets, key updates)

    def _offer_session(self) -> None:
        """TLS 1.3 tickets come right after the handshake, before the first data (or the peer's
        close): once one is in, the resumable session goes to `on_session`, once."""
        if self.on_session is None:
            return
        session = session_of(self._ssl, self._ssl.context)
        if session is not None and session.has_ticket:
            callback, self.on_session = self.on_session, None
            callback(session)

    def _peer_eof(self) -> None:
        self._eof_received = True
        keep_open = self._protocol.eof_received()
        if self._eof_sent or not keep_open:
            self.close()


class _RawSide(asyncio.Protocol):
    """The protocol of the TCP transport under an established TLS transport."""

    def __init__(self, tls: TlsTransport):
        self.tls = tls

    def data_received(self, data):
        self.tls._in.write(data)
        self.tls._decrypt()

    def eof_received(self):
        # TCP ended without close_notify: the peer went away; say so as an EOF.
        if not self.tls._eof_received:
            self.tls._eof_received = True
            self.tls._protocol.eof_received()
        return False

    def connection_lost(self, exc):
        self.tls._closed = True
        self.tls._protocol.connection_lost(exc)

    def pause_writing(self):
        self.tls._protocol.pause_writing()

    def resume_writing(self):
        self.tls._protocol.resume_writing()


class _Handshake(asyncio.Protocol):
    """The handshake's steps, each run where `run_step` says (a thread, by default: a step is
    public-key cryptography, a millisecond of CPU that must not stall every other pod's traffic
    on the event loop). OpenSSL's memory BIOs are not thread-safe, so bytes that arrive while a
    step runs wait in `arrived` and are fed between steps, on the loop."""

    def __init__(self, sslobj, incoming, outgoing, raw, run_step):
        self.sslobj, self.incoming, self.outgoing, self.raw = sslobj, incoming, outgoing, raw
        self.run_step = run_step
        self.done = asyncio.get_running_loop().create_future()
        self.arrived = bytearray()
        self.running = False
        self.wanted = False  # a step is due once the running one ends
        self.eof = False  # the peer's EOF came after the last step: the TLS transport hears of it

    def _do_handshake(self) -> BaseException | None:
        """One step; None when the handshake is complete, SSLWantReadError for more bytes."""
        try:
            self.sslobj.do_handshake()
        except (ssl.SSLError, OSError) as e:
            return e
        return None

    def step(self):
        if self.done.done():
            return
        if self.running:
            self.wanted = True
            return
        if self.arrived:
            self.incoming.write(bytes(self.arrived))
            self.arrived.clear()
        self.running, self.wanted = True, False
        self.run_step(self._do_handshake, self._stepped)

    def _stepped(self, error: BaseException | None) -> None:
        self.running = False
        self._flush()  # our flight, or the alert that tells the peer why
        if self.done.done():
            return
        if error is None:
            self.done.set_result(None)
        elif not isinstance(error, ssl.SSLWantReadError):
            self.done.set_exception(error)
        elif self.arrived or self.wanted:
            self.step()

    def _flush(self):
        pending = self.outgoing.read()
        if pending and not self.raw.is_closing():
            self.raw.write(pending)

    def data_received(self, data):
        self.arrived += data
        if not self.done.done():
            self.step()

    def eof_received(self):
        if not self.done.done():
            self.done.set_exception(ConnectionResetError("the peer closed during the TLS handshake"))
            return False
        self.eof = True  # it sent everything and half-closed right after its last flight
        return True

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_exception(exc or ConnectionResetError("connection lost during the TLS handshake"))


def run_inline(work, then) -> None:
    """Run a handshake step on the event loop itself (tests, and callers with no thread to spare)."""
    then(work())


HANDSHAKE_NICENESS = 10  # added to the process's: below the event loop's thread, not starved


def _yield_to_the_loop() -> None:
    """A handshake thread's CPU priority, below the event loop's (Linux: a thread's nice value is
    its own). A handshake costs milliseconds of CPU, a request a fraction of one: when the CPU is
    short, the loop that serves every pod's requests runs first, and new connections wait."""
    import threading

    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + HANDSHAKE_NICENESS))
    except OSError as e:
        log.warning("TLS handshake threads run at the event loop's CPU priority: %s", e)


class HandshakeThreads:
    """Handshake steps on a few threads, off the event loop: OpenSSL releases the GIL while it
    computes, so the loop keeps serving every other connection meanwhile, and the threads run at
    a lower CPU priority than the loop. How many steps may be queued is bounded by the pods'
    `handshakes` limits and their `handshake-rate` (pacing.py), not here."""

    def __init__(self, threads: int = 2):
        import concurrent.futures

        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="tls-handshake",
                                                          initializer=_yield_to_the_loop)

    def __call__(self, work, then) -> None:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.pool, work)
        future.add_done_callback(lambda f: then(f.exception() if f.exception() else f.result()))


_threads: HandshakeThreads | None = None


def handshake_threads() -> HandshakeThreads:
    """This process's handshake threads (made on first use)."""
    global _threads
    if _threads is None:
        _threads = HandshakeThreads()
    return _threads


async def handshake(raw: asyncio.Transport, protocol: asyncio.Protocol, context: ssl.SSLContext, server_side: bool,
                    timeout_s: float, server_hostname: str | None = None, initial: bytes = b"",
                    session: "Session | ssl.SSLSession | None" = None, run_step=None) -> TlsTransport:
    """Run the handshake over `raw`; then `protocol` receives the decrypted stream.
    `initial`: bytes already read from `raw` (a ClientHello that arrived early);
    `session`: a client's earlier session with the same server, to resume;
    `run_step(work, then)`: where each step runs (default: this process's handshake threads).
    A resumed session whose peer certificate has expired is refused: SessionExpired."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = context.wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=server_hostname)
    if session is not None and not server_side:
        resume(sslobj, context, session)  # SSL_set_session takes its own reference
    shaking = _Handshake(sslobj, incoming, outgoing, raw, run_step or handshake_threads())
    raw.set_protocol(shaking)
    if initial:
        shaking.arrived += initial
    if initial or not server_side:
        shaking.step()  # the ClientHello, or the answer to one that already came
    raw.resume_reading()
    try:
        await asyncio.wait_for(asyncio.shield(shaking.done), timeout_s)
    except BaseException:
        raw.abort()
        raise
    if sslobj.session_reused:
        not_after = peer_not_after(sslobj)
        if not_after is None or not_after <= time.time():
            raw.abort()
            raise SessionExpired("a resumed session whose peer certificate has expired")
    tls = TlsTransport(raw, sslobj, incoming, outgoing)
    tls.set_protocol(protocol)
    if shaking.arrived:  # bytes that came during the last step: before any that come next
        incoming.write(bytes(shaking.arrived))
        shaking.arrived.clear()
    raw_side = _RawSide(tls)
    raw.set_protocol(raw_side)

    def deliver() -> None:
        """What came with or after the last flight, once the caller holds the transport."""
        if not tls.is_closing():
            tls._decrypt()
        if shaking.eof:
            raw_side.eof_received()

    asyncio.get_running_loop().call_soon(deliver)
    return tls
