"""Whether the first bytes of a mesh connection hold a whole ClientHello: pure, no I/O.

The mesh port gives a client `client_hello_s` for its whole ClientHello before it takes a
handshake turn (inbound.py): a client that sends a few bytes and stalls would otherwise hold one
of the pod's `inbound-handshakes` until the handshake's own deadline. TLS may split the
ClientHello message over several handshake records (RFC 8446 5.1); its length is in its own
header, in the first record. Anything that is not a TLS handshake record answers NOT_HELLO at
once: the handshake refuses it (with an alert) without waiting.

This runs on the event loop each time bytes arrive, before the pod's handshake turn, for anyone
who can reach a pod: its work is bounded. A mesh client (our proxy, OpenSSL) sends its
ClientHello in one record of a few hundred bytes; one longer than MAX_HELLO or split over more
than MAX_RECORDS records is not one of ours (NOT_HELLO). Without these bounds, 1-byte records
made each call re-parse up to 256 KiB record by record in Python: 139 ms of the loop per call
(reviewer's measure through the real proxy).
"""

import enum

RECORD_HEADER = 5  # content type, legacy version (2), length (2)
HANDSHAKE_RECORD = 0x16
CLIENT_HELLO = 0x01
MESSAGE_HEADER = 4  # handshake type, length (3)
MAX_HELLO = 16 * 1024  # a ClientHello message longer than this is refused (ours: well under 2 KiB)
MAX_RECORDS = 4  # a ClientHello in more records than this is refused (ours: one)


class Hello(enum.Enum):
    WHOLE = "whole"  # the ClientHello message is all here
    PARTIAL = "partial"  # a ClientHello so far: more bytes are due
    NOT_HELLO = "not a ClientHello"  # not TLS, or not a ClientHello first


def received(prefix: bytes) -> Hello:
    """How much of a ClientHello `prefix` (a connection's first bytes) holds."""
    message = bytearray()  # the handshake message's bytes, out of their records
    at = records = 0
    while at < len(prefix):
        records += 1
        if records > MAX_RECORDS:
            return Hello.NOT_HELLO
        header = prefix[at:at + RECORD_HEADER]
        if header[0] != HANDSHAKE_RECORD or (len(header) >= 2 and header[1] != 0x03):
            return Hello.NOT_HELLO
        if len(header) < RECORD_HEADER:
            return Hello.PARTIAL
        length = int.from_bytes(header[3:5], "big")
        if length == 0:
            return Hello.NOT_HELLO  # RFC 8446 5.1: no zero-length handshake fragments
        message += prefix[at + RECORD_HEADER:at + RECORD_HEADER + length]
        at += RECORD_HEADER + length
        if message and message[0] != CLIENT_HELLO:
            return Hello.NOT_HELLO
        if len(message) >= MESSAGE_HEADER and int.from_bytes(message[1:4], "big") > MAX_HELLO:
            return Hello.NOT_HELLO
        if len(message) >= MESSAGE_HEADER and len(message) >= MESSAGE_HEADER + int.from_bytes(message[1:4], "big"):
            return Hello.WHOLE
    return Hello.PARTIAL
