"""Network namespaces: enter one for a block and always switch back.

setns(2) changes the namespace of the calling thread only; sockets created
inside keep that namespace for life, which is what an agent serving many pods
from one process needs (istio/ztunnel src/inpod/netns.rs does the same).
"""

import contextlib
import ctypes
import os
import socket
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def named_path(name: str) -> str:
    """Where `ip netns` (and pyroute2) keep the handle of a named namespace."""
    return os.path.join(NETNS_RUN_DIR, name)


@contextlib.contextmanager
def entered(path: str) -> Iterator[None]:
    """Run the block in the network namespace at `path` (this thread only)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path, os.O_RDONLY)
        try:
            setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            setns(own)
    finally:
        os.close(own)


def enter_for_good(path: str) -> None:
    """Move this thread into a namespace with no way back (before an exec)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        setns(fd)
    finally:
        os.close(fd)


SO_NETNS_COOKIE = 71  # Linux 5.14+


def socket_cookie_of_netns(sock) -> int:
    """The netns cookie of the namespace a socket lives in (what BPF's bpf_get_netns_cookie sees)."""
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def cookie(path: str) -> int:
    """The netns cookie of the namespace at `path`."""
    with entered(path):
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with probe:
        return socket_cookie_of_netns(probe)
