"""TLS over an asyncio transport, with half-close, once the handshake (tls.py) is done.

asyncio's and uvloop's TLS transports cannot write an EOF, so a client that half-closes (sends
everything, shuts down its sending side, then reads the answer) would hang on a mesh hop. Here
TLS 1.3 runs on ssl.SSLObject over memory BIOs: `write_eof()` sends close_notify and keeps
reading, as TLS 1.3 allows; a close_notify from the peer is an EOF to the protocol. OpenSSL does
every byte's work; Python handles each TLS record, not each byte."""

import asyncio
import ssl

from nodeagent.proxy.tls_sessions import session_of

READ_CHUNK = 256 * 1024
# Records are decrypted into this one buffer, then copied out at their size: SSLObject.read(n)
# allocates n bytes and shrinks them to what was read, and once glibc's mmap threshold has risen
# above 256 KiB (it follows the largest block freed) each of those came from the heap and left its
# tail there, between longer-lived blocks (ARCHITECTURE.md "Memory of a process"). One event loop
# per process, and `data_received` gets a copy: nothing refers to the buffer between two reads.
_DECRYPTED = bytearray(READ_CHUNK)
_DECRYPTED_VIEW = memoryview(_DECRYPTED)


def read_records(sslobj: ssl.SSLObject) -> bytes:
    """What the records decrypted so far hold, up to READ_CHUNK (SSLObject.read's exceptions)."""
    return bytes(_DECRYPTED_VIEW[:sslobj.read(READ_CHUNK, _DECRYPTED)])


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
                data = read_records(self._ssl)
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



def take_over(raw: asyncio.Transport, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
              protocol: asyncio.Protocol, arrived: bytes, eof: bool) -> TlsTransport:
    """The TLS transport over `raw` once its handshake is done, `protocol` receiving the stream.
    `arrived`: bytes that came during the handshake's last step (before any that come next);
    `eof`: the peer half-closed right after its last flight."""
    tls = TlsTransport(raw, sslobj, incoming, outgoing)
    tls.set_protocol(protocol)
    if arrived:
        incoming.write(arrived)
    raw_side = _RawSide(tls)
    raw.set_protocol(raw_side)

    def deliver() -> None:
        """What came with or after the last flight, once the caller holds the transport."""
        if not tls.is_closing():
            tls._decrypt()
        if eof:
            raw_side.eof_received()

    asyncio.get_running_loop().call_soon(deliver)
    return tls
