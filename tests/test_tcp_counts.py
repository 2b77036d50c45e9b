"""Counting a socket's sent data from its TCP counters (fastpath.data_sent): the kernel
splice's byte count relies on it, on both ends of a connection, before and after FINs."""

import socket
import time

from nodeagent.proxy.fastpath import data_sent


def test_data_sent_counts_what_was_handed_to_tcp_on_either_side():
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    try:
        assert data_sent(client) == data_sent(server) == 0
        server.sendall(b"y" * 1000)
        client.recv(1000)
        client.sendall(b"x" * 300_000)
        received = 0
        while received < 100_000:  # part of it read: the rest is still queued on the way
            received += len(server.recv(65536))
        assert data_sent(client) == 300_000
        for sock in (client, server):
            sock.shutdown(socket.SHUT_WR)
        while server.recv(65536):
            pass
        while client.recv(65536):
            pass
        time.sleep(0.05)  # the FINs acknowledged: both sockets are closed at the TCP level
        assert (data_sent(client), data_sent(server)) == (300_000, 1000)
    finally:
        for s in (client, server, listener):
            s.close()
