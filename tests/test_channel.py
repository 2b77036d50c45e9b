"""The agent <-> worker channel: framed pickles, with file descriptors passed along."""

import os
import socket
import threading

import pytest

from nodeagent.agent import channel


def test_messages_arrive_whole_in_order_and_carry_their_descriptors():
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    read_end, write_end = os.pipe()
    big = {"view": "x" * (3 << 20)}  # larger than any socket buffer: split on the wire
    try:
        sender = threading.Thread(target=lambda: [channel.send(left, ("first", 1)),
                                                  channel.send(left, ("with-fd",), (read_end,)),
                                                  channel.send(left, big)])
        sender.start()
        assert channel.receive(right) == (("first", 1), [])
        message, fds = channel.receive(right)
        assert message == ("with-fd",) and len(fds) == 1
        os.write(write_end, b"through the passed fd")
        assert os.read(fds[0], 100) == b"through the passed fd"
        os.close(fds[0])
        assert channel.receive(right) == (big, [])
        sender.join()
        left.close()
        with pytest.raises(channel.ChannelClosed):
            channel.receive(right)
    finally:
        for fd in (read_end, write_end):
            os.close(fd)
        right.close()


def test_an_endpoint_sends_from_its_own_thread_and_reports_the_other_end_closing():
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    got, closed = [], threading.Event()
    endpoint = channel.Endpoint(right, lambda message, fds: got.append(message), closed.set)
    other = channel.Endpoint(left, lambda message, fds: None)
    other.post(("hello",))
    other.post(("again",))
    other.close()
    assert closed.wait(5)
    assert got == [("hello",), ("again",)]
    endpoint.close()
