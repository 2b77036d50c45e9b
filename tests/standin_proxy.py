"""A stand-in for the node proxy, for data-path tests: it opens the listeners
the eBPF programs steer to, inside each pod's namespace, and forwards bytes
with threads. It is test scaffolding, not the proxy (that is nodeagent.proxy).

Run as a process: python tests/standin_proxy.py PIN_ROOT NODE POD_NETNS:POD_IP:SLOT ...
"""

import socket
from pathlib import Path
import sys
import threading

from nodeagent import netns
from nodeagent.datapath.control import Datapath, PodEntry
from nodeagent.datapath.pins import PinLayout
from nodeagent.ports import PROXY_PORTS

OUTBOUND_PORT = 15001
INBOUND_PORT = 15006


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _splice(a: socket.socket, b: socket.socket) -> None:
    t = threading.Thread(target=_pipe, args=(b, a), daemon=True)
    t.start()
    _pipe(a, b)
    t.join()
    a.close()
    b.close()


class StandinProxy:
    def __init__(self, pin_root, node: str):
        self.datapath = Datapath(PinLayout(Path(pin_root), node))
        self.listeners: list[socket.socket] = []
        self.accepted = {"outbound": 0, "inbound": 0}
        self.originals: list[tuple[str, int]] = []

    def serve_pod(self, netns_name: str, pod_ip: str, slot: int, enrol: bool = True) -> int:
        path = netns.named_path(netns_name)
        with netns.entered(path):
            outbound = socket.create_server(("127.0.0.1", OUTBOUND_PORT), backlog=4096)
            inbound = socket.create_server(("127.0.0.1", INBOUND_PORT), backlog=4096)
        cookie = netns.socket_cookie_of_netns(outbound)
        self.datapath.reset_counters(slot)
        self.datapath.register_inbound_listener(slot, inbound)
        if enrol:  # in the order the proxy enrols (proxy/server.py add_pod)
            self.datapath.enrol(PodEntry(cookie, pod_ip, slot, OUTBOUND_PORT))
            self.datapath.attach_inbound(path, cookie)
        self.listeners += [outbound, inbound]
        for listener, handler in ((outbound, self._outbound), (inbound, self._inbound)):
            threading.Thread(target=self._accept_loop, args=(listener, handler, path, cookie, pod_ip),
                             daemon=True).start()
        return cookie

    def _accept_loop(self, listener, handler, path, cookie, pod_ip):
        while True:
            try:
                conn, peer = listener.accept()
            except OSError:
                return
            threading.Thread(target=handler, args=(conn, peer, path, cookie, pod_ip), daemon=True).start()

    def _connect_in(self, path: str, address: tuple[str, int]) -> socket.socket:
        with netns.entered(path):
            upstream = socket.socket()
        self.datapath.register_proxy_socket(upstream)  # as the proxy does (needed below the pods' cgroup)
        upstream.connect(address)
        return upstream

    def _outbound(self, conn, peer, path, cookie, pod_ip):
        self.accepted["outbound"] += 1
        original = self.datapath.original_destination(cookie, peer[1])
        if original is None:
            conn.close()
            return
        self.originals.append(original)
        try:
            upstream = self._connect_in(path, original)
        except OSError:
            conn.close()
            return
        _splice(conn, upstream)

    def _inbound(self, conn, peer, path, cookie, pod_ip):
        self.accepted["inbound"] += 1
        port = conn.getsockname()[1]  # sk_lookup keeps the original destination
        if port in PROXY_PORTS:  # as the proxy: never its own listener (a loop), whatever the kernel does
            conn.close()
            return
        try:
            app = self._connect_in(path, (pod_ip, port))  # as the proxy does: over lo, never steered
        except OSError:
            conn.close()
            return
        _splice(conn, app)

    def close(self):
        for listener in self.listeners:
            listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            listener.close()
        self.datapath.close()


if __name__ == "__main__":
    proxy = StandinProxy(sys.argv[1], sys.argv[2])
    for spec in sys.argv[3:]:
        name, ip, slot = spec.split(":")
        proxy.serve_pod(name, ip, int(slot))
    print("ready", flush=True)
    threading.Event().wait()
