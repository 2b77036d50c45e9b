"""Responses the proxy itself writes, and the reason header that explains them."""

REASON_HEADER = "nodeagent-proxy-error"

_PHRASES = {400: "Bad Request", 403: "Forbidden", 408: "Request Timeout", 431: "Request Header Fields Too Large",
            502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


def error_response(status: int, reason: str, close: bool = True) -> bytes:
    body = f"{reason}\n".encode()
    head = (f"HTTP/1.1 {status} {_PHRASES[status]}\r\n"
            f"{REASON_HEADER}: {reason}\r\n"
            "content-type: text/plain\r\n"
            f"content-length: {len(body)}\r\n"
            + ("connection: close\r\n" if close else "")
            + "\r\n")
    return head.encode() + body
