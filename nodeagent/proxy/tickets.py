"""Session-ticket keys shared by every proxy process of one agent.

The kernel spreads a pod's mesh connections over the agent's processes (SO_REUSEPORT), so
a client's next connection lands on another process most of the time. With OpenSSL's
default, each SSL_CTX has random ticket keys of its own, and a ticket issued by one process
is a full handshake on the next. Here the agent draws one secret (os.urandom) and hands it
to its workers over their channel (agent/workers.py): never on disk, never logged, never in
/stats. Each process derives from it, per server identity and trust-anchor bundle, the
same 80 bytes (OpenSSL 3: a 16-byte key name, a 32-byte HMAC secret, a 32-byte AES key) and
installs them on every server SSL_CTX it builds (identity/workload.py), TLS 1.3 stateless
tickets included. The derivation keeps what separate contexts gave before: a ticket of one
identity never resumes at another's server, nor under another trust-anchor bundle.

Rotation: the agent draws a new secret every ROTATE_EVERY_S and each process installs the
keys derived from it on its live contexts. OpenSSL's manual keys (SSL_CTX_set_tlsext_ticket_keys)
hold one key only: the tickets issued before a rotation no longer decrypt, and each client
makes one full handshake per server after it. Keeping the previous key for decryption would
need OpenSSL's ticket-key callback (SSL_CTX_set_tlsext_ticket_key_evp_cb) called into Python
from the handshake threads: not worth it for one handshake per client per ROTATE_EVERY_S.
"""

import ctypes
import hashlib
import logging
import os
import ssl
import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from nodeagent.proxy.openssl import libssl, ssl_ctx

log = logging.getLogger("nodeagent.tls")

SECRET_BYTES = 32
KEY_NAME_BYTES, HMAC_KEY_BYTES, AES_KEY_BYTES = 16, 32, 32
TICKET_KEYS_BYTES = KEY_NAME_BYTES + HMAC_KEY_BYTES + AES_KEY_BYTES  # 80: OpenSSL 3's layout
SSL_CTRL_GET_TLSEXT_TICKET_KEYS = 58  # openssl/ssl.h (3.0)
SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
# A key lives at most this long (plus the tickets' own lifetime, 2 h at most): less than a
# context lived with its own random keys before (a certificate's renewal, 70% of a day).
ROTATE_EVERY_S = 6 * 3600


class TicketSecret:
    """The agent's current secret. Its repr never shows it (logs, tracebacks, /debug)."""

    __slots__ = ("value",)

    def __init__(self, value: bytes):
        if len(value) != SECRET_BYTES:
            raise ValueError(f"a ticket secret is {SECRET_BYTES} bytes, not {len(value)}")
        self.value = value

    @classmethod
    def new(cls) -> "TicketSecret":
        return cls(os.urandom(SECRET_BYTES))

    def __repr__(self) -> str:
        return "TicketSecret(<hidden>)"


def ticket_keys(secret: TicketSecret, identity_uri: str, anchors_pem: bytes) -> bytes:
    """The 80 bytes one server identity's contexts use under `anchors_pem`: HKDF-Expand
    (RFC 5869, SHA-256) of the secret, so every process of the agent derives the same."""
    info = b"nodeagent ticket keys\0" + hashlib.sha256(anchors_pem).digest() + identity_uri.encode()
    return HKDFExpand(hashes.SHA256(), TICKET_KEYS_BYTES, info).derive(secret.value)


def install(context: ssl.SSLContext, keys: bytes) -> bool:
    """SSL_CTX_set_tlsext_ticket_keys on a server context; False where this Python's SSL_CTX
    cannot be reached or this OpenSSL's keys are not 80 bytes (it keeps its own random keys:
    resumption within one process only). Set on a live context too (a rotation): a handshake
    running meanwhile may issue or read a ticket under half-copied keys, which then does not
    decrypt, a full handshake the next time, nothing worse (fixed-size buffers)."""
    pointer = ssl_ctx(context)
    if pointer is None or len(keys) != TICKET_KEYS_BYTES:
        return False
    lib = libssl()
    lib.SSL_CTX_ctrl.restype, lib.SSL_CTX_ctrl.argtypes = ctypes.c_long, [ctypes.c_void_p, ctypes.c_int,
                                                                          ctypes.c_long, ctypes.c_void_p]
    # With no buffer, OpenSSL answers the length it expects: its layout, checked, not assumed.
    if lib.SSL_CTX_ctrl(pointer, SSL_CTRL_GET_TLSEXT_TICKET_KEYS, 0, None) != TICKET_KEYS_BYTES:
        return False
    buffer = ctypes.create_string_buffer(keys, TICKET_KEYS_BYTES)
    try:
        return lib.SSL_CTX_ctrl(pointer, SSL_CTRL_SET_TLSEXT_TICKET_KEYS, TICKET_KEYS_BYTES, buffer) == 1
    finally:
        ctypes.memset(buffer, 0, TICKET_KEYS_BYTES)


class Rotation:
    """The agent's secret and when it is replaced (`due`, from the agent's loop)."""

    def __init__(self, every_s: float = ROTATE_EVERY_S, clock=time.monotonic):
        self.every_s, self.clock = every_s, clock
        self.secret = TicketSecret.new()
        self.since = clock()

    def due(self) -> TicketSecret | None:
        """A new secret once the current one is `every_s` old (None before)."""
        if self.clock() - self.since < self.every_s:
            return None
        self.secret, self.since = TicketSecret.new(), self.clock()
        return self.secret
