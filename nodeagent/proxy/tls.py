"""The TLS handshake over an asyncio transport, its steps off the event loop.

`handshake` runs ssl.SSLObject over memory BIOs on a connected transport, each step (public-key
cryptography) on a handshake thread below the loop's CPU priority, then hands the connection to a
TlsTransport (tls_transport.py: half-close). A client offers an earlier session to resume
(tls_sessions.py); a resumed session whose peer certificate has expired is refused on both sides.
"""

import asyncio
import logging
import os
import ssl
import time

from nodeagent.proxy.tls_sessions import Session, SessionExpired, peer_not_after, resume
from nodeagent.proxy.tls_transport import TlsTransport, take_over

log = logging.getLogger("nodeagent.tls")


class _Handshake(asyncio.Protocol):
    """The handshake's steps, each run where `run_step` says (a thread, by default: a step is
    public-key cryptography, a millisecond of CPU that must not stall every other pod's traffic
    on the event loop). OpenSSL's memory BIOs are not thread-safe, so bytes that arrive while a
    step runs wait in `arrived` and are fed between steps, on the loop."""

    def __init__(self, sslobj, incoming, outgoing, raw, run_step, charge=None):
        self.sslobj, self.incoming, self.outgoing, self.raw = sslobj, incoming, outgoing, raw
        self.run_step = run_step
        self.charge = charge  # told each step's CPU seconds (contention.py: whose handshakes load the loop)
        self.step_cpu_s = 0.0
        self.done = asyncio.get_running_loop().create_future()
        self.arrived = bytearray()
        self.running = False
        self.wanted = False  # a step is due once the running one ends
        self.eof = False  # the peer's EOF came after the last step: the TLS transport hears of it

    def _do_handshake(self) -> BaseException | None:
        """One step; None when the handshake is complete, SSLWantReadError for more bytes."""
        started = time.thread_time()  # this thread's CPU: a CPU shared with other work does not inflate it
        try:
            self.sslobj.do_handshake()
        except (ssl.SSLError, OSError) as e:
            return e
        finally:
            self.step_cpu_s = time.thread_time() - started
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
        if self.charge is not None:
            self.charge(self.step_cpu_s)
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
                    session: "Session | ssl.SSLSession | None" = None, run_step=None, charge=None) -> TlsTransport:
    """Run the handshake over `raw`; then `protocol` receives the decrypted stream.
    `initial`: bytes already read from `raw` (a ClientHello that arrived early);
    `session`: a client's earlier session with the same server, to resume;
    `run_step(work, then)`: where each step runs (default: this process's handshake threads);
    `charge(cpu_s)`: told the CPU seconds of each step (contention.charger).
    A resumed session whose peer certificate has expired is refused: SessionExpired."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = context.wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=server_hostname)
    if session is not None and not server_side:
        resume(sslobj, context, session)  # SSL_set_session takes its own reference
    shaking = _Handshake(sslobj, incoming, outgoing, raw, run_step or handshake_threads(), charge)
    raw.set_protocol(shaking)
    if initial:
        shaking.arrived += initial
    if initial or not server_side:
        shaking.step()  # the ClientHello, or the answer to one that already came
    raw.resume_reading()
    try:
        await asyncio.wait_for(asyncio.shield(shaking.done), timeout_s)
    except BaseException:
        # Cancelled first: the abort's connection_lost would set an exception on it that nobody
        # reads, and asyncio logs each such one at ERROR, unthrottled (a hostile peer's stalls).
        shaking.done.cancel()
        raw.abort()
        raise
    if sslobj.session_reused:
        not_after = peer_not_after(sslobj)
        if not_after is None or not_after <= time.time():
            raw.abort()
            raise SessionExpired("a resumed session whose peer certificate has expired")
    return take_over(raw, sslobj, incoming, outgoing, protocol, bytes(shaking.arrived), shaking.eof)
