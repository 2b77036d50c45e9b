"""Protocol detection on the first bytes of a connection: pure, no I/O.

`detect(prefix)` answers NEED_MORE until the bytes decide, then one
Detection. Like linkerd2-proxy's detect, it never consumes bytes: the caller
buffers them and forwards them unchanged. Tradeoffs:
- HTTP/1 is recognized by a known method and a request line ending in
  " HTTP/1.x" within MAX_PREFIX bytes; anything else that looks like text is opaque.
- HTTP/2 needs the whole 24-byte prior-knowledge preface (h2c, gRPC).
- TLS needs the whole ClientHello record to read the SNI; a ClientHello
  split over several records is treated as TLS without SNI.
- A peer that sends nothing is not detected here at all: the caller decides
  (server-speaks-first protocols; see the proxy's outbound stage).
"""

from dataclasses import dataclass
from enum import Enum

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
METHODS = (b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE")
MAX_PREFIX = 16 * 1024 + 5  # a full TLS record, the longest thing we wait for


class Protocol(Enum):
    HTTP1 = "http/1"
    H2 = "h2"
    TLS = "tls"
    OPAQUE = "opaque"


@dataclass(frozen=True)
class Detection:
    protocol: Protocol
    sni: str | None = None


NEED_MORE = None


def _http1(prefix: bytes) -> bool | None:
    """True/False when decided, None when more bytes could still make it HTTP/1."""
    space = prefix.find(b" ")
    token = prefix if space < 0 else prefix[:space]
    if not any(m.startswith(token) for m in METHODS) or (space >= 0 and token not in METHODS):
        return False
    end = prefix.find(b"\r\n")
    if end < 0:
        return None if len(prefix) < MAX_PREFIX else False
    line = prefix[:end]
    return line.endswith(b" HTTP/1.1") or line.endswith(b" HTTP/1.0")


def _tls(prefix: bytes) -> Detection | bool | None:
    """A Detection for a ClientHello, False if not TLS, None if undecided."""
    if prefix[:1] != b"\x16":
        return False
    if len(prefix) >= 2 and prefix[1] != 0x03:
        return False
    if len(prefix) >= 6 and prefix[5] != 0x01:  # handshake type: ClientHello
        return False
    if len(prefix) < 5:
        return None
    record_len = int.from_bytes(prefix[3:5], "big")
    if len(prefix) < 5 + record_len:
        return None
    return Detection(Protocol.TLS, client_hello_sni(prefix[5:5 + record_len]))


def client_hello_sni(handshake: bytes) -> str | None:
    """The server_name of a ClientHello handshake message, or None."""
    try:
        body = handshake[4:4 + int.from_bytes(handshake[1:4], "big")]
        at = 2 + 32  # legacy_version, random
        at += 1 + body[at]  # session id
        at += 2 + int.from_bytes(body[at:at + 2], "big")  # cipher suites
        at += 1 + body[at]  # compression methods
        extensions_end = at + 2 + int.from_bytes(body[at:at + 2], "big")
        at += 2
        while at + 4 <= extensions_end:
            kind, size = int.from_bytes(body[at:at + 2], "big"), int.from_bytes(body[at + 2:at + 4], "big")
            data = body[at + 4:at + 4 + size]
            if kind == 0 and len(data) >= 5 and data[2] == 0:  # server_name list, host_name entry
                name_len = int.from_bytes(data[3:5], "big")
                return data[5:5 + name_len].decode("ascii")
            at += 4 + size
    except (IndexError, UnicodeDecodeError):
        return None
    return None


def detect(prefix: bytes) -> Detection | None:
    if not prefix:
        return NEED_MORE
    if H2_PREFACE.startswith(prefix[:len(H2_PREFACE)]):
        if len(prefix) >= len(H2_PREFACE):
            return Detection(Protocol.H2)
        # "PRI" is also a valid HTTP/1 method token prefix of nothing we accept: wait.
        return NEED_MORE
    tls = _tls(prefix)
    if isinstance(tls, Detection):
        return tls
    if tls is None:
        return NEED_MORE
    http1 = _http1(prefix)
    if http1 is None:
        return NEED_MORE
    return Detection(Protocol.HTTP1 if http1 else Protocol.OPAQUE)
