"""Messages between the agent and its worker processes over a Unix stream socket.

Each message is a header (body length, number of file descriptors), sent with
the descriptors attached (SCM_RIGHTS), then the pickled body. Both ends are
processes of one agent, so pickle is fine. Blocking calls: each end sends
from one thread and receives in another.
"""

import pickle
import socket
import struct

HEADER = struct.Struct("!II")
MAX_FDS = 4


class ChannelClosed(ConnectionError):
    pass


def send(sock: socket.socket, message, fds: tuple[int, ...] = ()) -> None:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    header = HEADER.pack(len(body), len(fds))
    if fds:
        socket.send_fds(sock, [header], list(fds))
    else:
        sock.sendall(header)
    sock.sendall(body)


def _exactly(sock: socket.socket, size: int, start: bytes = b"") -> bytes:
    data = bytearray(start)
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ChannelClosed("the other end closed the channel")
        data += chunk
    return bytes(data)


def receive(sock: socket.socket) -> tuple[object, list[int]]:
    """(message, file descriptors that came with it)."""
    header, fds, _, _ = socket.recv_fds(sock, HEADER.size, MAX_FDS)
    if not header:
        raise ChannelClosed("the other end closed the channel")
    length, count = HEADER.unpack(_exactly(sock, HEADER.size, header))
    if len(fds) != count:
        for fd in fds:
            socket.close(fd)
        raise ChannelClosed(f"expected {count} descriptors, got {len(fds)}")
    return pickle.loads(_exactly(sock, length)), fds


class Endpoint:
    """One end of a channel: a reader thread hands each message to `on_message` (from that
    thread); `post` queues a message for a sender thread, so an event loop never blocks on
    the socket. File descriptors are duplicated when queued: the caller may close its own."""

    def __init__(self, sock: socket.socket, on_message, on_closed=None, name: str = "channel"):
        import queue
        import threading

        self.sock = sock
        self._outbox: "queue.Queue" = queue.Queue()
        self._on_message, self._on_closed = on_message, on_closed
        self.closed = False
        threading.Thread(target=self._read, name=f"{name}-reader", daemon=True).start()
        threading.Thread(target=self._write, name=f"{name}-writer", daemon=True).start()

    def post(self, message, fds: tuple[int, ...] = ()) -> None:
        import os

        if not self.closed:
            self._outbox.put((message, tuple(os.dup(fd) for fd in fds)))

    def close(self) -> None:
        """After what was posted has been sent."""
        self.closed = True
        self._outbox.put(None)

    def _write(self) -> None:
        import os

        while (item := self._outbox.get()) is not None:
            message, fds = item
            try:
                send(self.sock, message, fds)
            except OSError:
                self.closed = True
            finally:
                for fd in fds:
                    os.close(fd)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes our reader, tells the other end
        except OSError:
            pass
        self.sock.close()

    def _read(self) -> None:
        try:
            while True:
                message, fds = receive(self.sock)
                self._on_message(message, fds)
        except (ChannelClosed, OSError):
            pass
        finally:
            self.closed = True
            if self._on_closed:
                self._on_closed()
