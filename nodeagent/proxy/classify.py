"""Whether a response counts as a failure of the endpoint that sent it: pure.

What failure accrual (ejection) and the balancer's bookkeeping see. HTTP: no response at
all, or a 5xx. gRPC answers errors with HTTP 200 and a `grpc-status` (in the trailers, or
in the headers of a trailers-only response); the codes that mean the server failed, as
5xx do, count as failures: UNKNOWN, INTERNAL, UNAVAILABLE, DATA_LOSS. The others (NOT_FOUND,
INVALID_ARGUMENT, DEADLINE_EXCEEDED set by the caller, ...) are the caller's business.
"""

GRPC_SERVER_ERRORS = frozenset({2, 13, 14, 15})


def failed(status: int | None, grpc_status: int | None = None) -> bool:
    if status is None or status >= 500:
        return True
    return grpc_status in GRPC_SERVER_ERRORS


def grpc_status(headers) -> int | None:
    """The `grpc-status` among (name, value) byte pairs, if any and well-formed."""
    for name, value in headers or ():
        if name == b"grpc-status":
            return int(value) if value.isdigit() else None
    return None
