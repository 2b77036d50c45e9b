"""Draining, in parts that need no privileges: the connection table's drain and deadline, and
listeners closed only once their accept queues are empty (real sockets on loopback)."""

import asyncio
import socket

from nodeagent.proxy.connection import ConnectionTable, Direction, Drain, Phase
from nodeagent.proxy.listeners import accept_queue, close_when_drained
from test_shared_state import Pod


class Transport:
    """What a connection holds of a transport when it is cut."""

    def __init__(self):
        self.aborted = False

    def abort(self):
        self.aborted = True


def test_drain_asks_every_connection_that_can_end_well_and_later_ones_at_once():
    table = ConnectionTable(100, lambda *a: None)
    asked = []
    http = table.admit(Pod("a"), Direction.OUTBOUND, Phase.HTTP1)
    http.drains_with(lambda: asked.append("http"))
    table.admit(Pod("a"), Direction.OUTBOUND, Phase.OPAQUE)  # nothing to ask: it runs to its end
    detecting = table.admit(Pod("b"), Direction.OUTBOUND, Phase.DETECTING)
    assert table.drain_state is Drain.SERVING and asked == []
    table.drain()
    assert table.drain_state is Drain.DRAINING and asked == ["http"]
    detecting.enter(Phase.HTTP2)
    detecting.drains_with(lambda: asked.append("detected later"))
    assert asked == ["http", "detected later"]
    assert table.admit(Pod("c"), Direction.INBOUND, Phase.OPAQUE) is not None  # queued ones are still served


def test_the_deadline_cuts_every_connection_left():
    cuts = []
    table = ConnectionTable(100, lambda *a: None, lambda connection, reason: cuts.append(reason))
    transports = [Transport() for _ in range(3)]
    for transport in transports:
        table.admit(Pod("a"), Direction.OUTBOUND, Phase.OPAQUE).hold(transport)
    table.drain()
    assert table.cut_all("drain deadline") == 3
    assert cuts == ["drain deadline"] * 3 and all(t.aborted for t in transports)


def test_accept_queue_counts_the_connections_waiting_on_a_listener():
    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
    try:
        assert accept_queue(listener) == 3
        listener.accept()[0].close()
        assert accept_queue(listener) == 2
    finally:
        for client in clients:
            client.close()
        listener.close()


def test_a_listener_closes_once_what_was_queued_is_accepted_and_nothing_is_reset():
    async def main():
        accepted = []
        server = await asyncio.start_server(lambda r, w: accepted.append(w), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        # Queued in the kernel before the loop runs: the drain must accept them, not reset them.
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        forced = await close_when_drained([server], bound_s=5)
        assert forced == 0 and len(accepted) == 20 and not server.is_serving()
        for client, writer in zip(clients, accepted):
            client.sendall(b"x")  # every one is a live connection: none was reset
            writer.write(b"y")
            await writer.drain()
        for client in clients:
            assert client.recv(1) == b"y"
            client.close()
        refused = socket.socket()
        assert refused.connect_ex(("127.0.0.1", port)) != 0  # closed: nothing listens any more
        refused.close()

    asyncio.run(main())


def test_a_listener_still_fed_is_closed_at_the_bound_and_says_so():
    async def main():
        listening = socket.create_server(("127.0.0.1", 0), backlog=16)
        server = await asyncio.start_server(lambda r, w: None, sock=listening, start_serving=False)
        client = socket.create_connection(listening.getsockname())  # never accepted: the server is not serving
        forced = await close_when_drained([server], bound_s=0.2)
        client.close()
        return forced

    assert asyncio.run(main()) == 1


def test_not_ready_while_draining_or_when_the_data_path_is_gone(tmp_path):
    from nodeagent.agent.agent import Agent, Lifecycle
    from nodeagent.datapath.pins import PinLayout
    from nodeagent.datapath.programs import CONNECT4
    from nodeagent.settings import DEFAULT

    agent = Agent(DEFAULT, source=None)
    agent.layout = PinLayout(tmp_path, "node0")
    for pin in (agent.layout.map("pods_by_netns"), agent.layout.link(CONNECT4.name)):
        pin.parent.mkdir(parents=True, exist_ok=True)
        pin.touch()
    agent._check_datapath()
    assert not agent.ready  # no view served yet
    agent.lifecycle = Lifecycle.SERVING
    assert agent.ready
    agent.layout.link(CONNECT4.name).unlink()  # `nodeagent cleanup` ran
    agent._check_datapath()
    assert not agent.ready and "na_connect4" in agent._datapath_problem
    agent.layout.link(CONNECT4.name).touch()
    agent._check_datapath()
    assert agent.ready
    agent.lifecycle = Lifecycle.DRAINING
    assert not agent.ready


def test_the_daemonset_surges_a_new_agent_and_waits_for_the_old_ones_drain():
    from nodeagent.deploy.render import Values, daemonset
    from nodeagent.settings import DEFAULT, replace

    spec = daemonset(Values(settings=replace(DEFAULT, drain_timeout=90.0)))["spec"]
    assert spec["updateStrategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] == 120
    assert not spec["template"]["spec"].get("hostNetwork")  # two agents of a node never share ports


def test_an_http2_client_that_follows_goaway_loses_no_request_to_a_drain():
    """Two drains of the proxy's HTTP/2 connections under load: every request answered, on a
    new connection after each GOAWAY (benchmarks/upgrade_load.py's client, as in the lab)."""
    import sys
    import threading
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.upgrade_load import h2_client
    from test_http2 import LoopThread, start_app, start_proxy

    lt = LoopThread()
    try:
        port, _, accepted = start_proxy(lt, [start_app(lt)])

        def drain_twice():
            for _ in range(2):
                time.sleep(1.0)
                lt.loop.call_soon_threadsafe(lambda: [server.drain() for server in list(accepted)])

        threading.Thread(target=drain_twice, daemon=True).start()
        counts = h2_client("127.0.0.1", port, 3.0)
    finally:
        lt.stop()
    assert counts["failed"] == 0 and counts["resets"] == 0, counts
    assert counts["requests"] > 100 and counts["connections"] == len(accepted) >= 3


def test_a_departed_pods_descriptor_is_released_after_its_last_connection_not_before():
    """remove_pod retires the pod's context: its HTTP connections are asked to end, and what they
    use of it (the netns descriptor) is released only once none is left. The same pod joining
    again is a new context, whose connections keep nothing of the old one alive."""
    table = ConnectionTable(100, lambda *a: None)
    released, asked = [], []
    old = Pod("a")
    http = table.admit(old, Direction.INBOUND, Phase.HTTP1)
    http.drains_with(lambda: asked.append("http"))
    opaque = table.admit(old, Direction.OUTBOUND, Phase.OPAQUE)
    table.retire(old, lambda: released.append("old"))
    assert asked == ["http"] and released == [] and table.retired() == 1
    again = Pod("a")  # joined again: the same key, a new context
    table.admit(again, Direction.INBOUND, Phase.HTTP1)
    http.close()
    assert released == []  # the opaque connection still uses it
    opaque.close()
    assert released == ["old"] and table.retired() == 0
    assert table.count("shop/a") == 1  # the new context's connection is untouched


def test_a_departed_pod_without_connections_is_released_at_once():
    table = ConnectionTable(100, lambda *a: None)
    released = []
    other = table.admit(Pod("b"), Direction.INBOUND, Phase.OPAQUE)
    table.retire(Pod("a"), lambda: released.append("a"))
    assert released == ["a"] and table.retired() == 0
    other.close()


def test_a_connection_that_becomes_http_after_its_pod_left_is_asked_to_end_at_once():
    """Still authorizing (or detecting) when its pod retired: nothing could ask it then, so it is
    asked as soon as it can end well, or it would keep the departed pod's context alive."""
    table = ConnectionTable(100, lambda *a: None)
    released, asked = [], []
    pod = Pod("a")
    late = table.admit(pod, Direction.INBOUND, Phase.AUTHORIZING)
    table.retire(pod, lambda: released.append("a"))
    late.enter(Phase.HTTP1)
    late.drains_with(lambda: asked.append("late"))
    assert asked == ["late"] and released == []
    late.close()
    assert released == ["a"] and table.retired() == 0
