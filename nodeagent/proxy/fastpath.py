"""Kernel splices for opaque connections the proxy only forwards (sk_msg, bpf/datapath.c).

With the fast path on, every loopback connection in an enrolled pod (an app
and the proxy's listener, the proxy and the app it forwards to) is in the
`loopback_socks` sockhash from its handshake on, and the sk_msg program sees
each of its sends.

For an opaque connection whose bytes need no reading (no TLS on either side),
the proxy asks the kernel to send an app's bytes past the proxy, straight into
the send queue of the proxy's socket at the far side (toward the other app,
the remote peer or the remote client). A send queue, so TCP's backpressure
still holds. The proxy keeps relaying until the kernel switches, and tells it
how many of the app's bytes it has forwarded; the switch happens at the app's
next send once every earlier byte has been written on, so no byte overtakes
another. A sender that never lets the proxy catch up keeps going through the
proxy (an echo client, in the tests; a bulk upload to a fast reader still
got spliced in the benchmark). EOFs and
resets still pass through the proxy's ends, which stay open.
"""
import asyncio
import errno
import ipaddress
import os
import socket
from dataclasses import dataclass

from nodeagent.datapath import abi
from nodeagent.proxy.relay import Relay



def _ip(address: str) -> int:
    return int.from_bytes(ipaddress.IPv4Address(address).packed, "little")  # network order in memory


def own_key(sock: socket.socket, netns_cookie: int) -> abi.SockKey:
    """A socket as its own side sees it (the sockhash's key for it)."""
    local, remote = sock.getsockname(), sock.getpeername()
    return abi.SockKey(netns_cookie, _ip(remote[0]), local[1], remote[1])


def peer_key(sock: socket.socket, netns_cookie: int) -> abi.SockKey:
    """The other end of a loopback connection: ports swapped, same namespace (and one address)."""
    local, remote = sock.getsockname(), sock.getpeername()
    return abi.SockKey(netns_cookie, _ip(local[0]), remote[1], local[1])


def is_loopback(sock: socket.socket) -> bool:
    """Both ends in one namespace, routed over lo: 127.0.0.1, or the pod's IP (the proxy's leg to
    an app), as bpf/datapath.c join_loopback admits them."""
    return sock.getsockname()[0] == sock.getpeername()[0]


@dataclass
class Direction:
    """The app socket `source`, whose bytes the proxy reads through `relay`, is to send to `target`
    (the proxy's socket `target_socket`, which only `relay` otherwise writes to)."""

    source: abi.SockKey
    target: abi.SockKey
    target_socket: socket.socket  # a duplicate: its TCP counters outlive the transport's close
    target_start: int  # data_sent(target) when asked, before the proxy wrote to it
    relay: Relay | None = None


# struct tcp_info (uapi/linux/tcp.h), 4.19+: offsets of the fields data_sent reads.
TCP_INFO_NOTSENT_BYTES, TCP_INFO_BYTES_SENT, TCP_INFO_BYTES_RETRANS = 144, 200, 208


def data_sent(sock: socket.socket) -> int:
    """Data bytes handed to TCP on a connected socket so far: transmitted (less retransmissions;
    SYN and FIN carry no data) plus not yet transmitted. Survives the socket's close while
    something still holds it."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)

    def field(offset: int, size: int = 8) -> int:
        return int.from_bytes(info[offset:offset + size], "little")

    return field(TCP_INFO_BYTES_SENT) - field(TCP_INFO_BYTES_RETRANS) + field(TCP_INFO_NOTSENT_BYTES, 4)


class KernelSplice:
    """Splices requested before the proxy writes anything (so that an app that answers at once
    is spliced from its first byte), then fed the proxy's forwarded counts."""

    def __init__(self, datapath, client: Direction | None, upstream: Direction | None,
                 receive: "ReceiveSplice | None" = None):
        self.datapath = datapath
        self.client, self.upstream = client, upstream
        self.directions = [d for d in (client, upstream) if d is not None]
        self.receive = receive
        self._reporting: set[Relay] = set()  # relays with a report due this turn
        for d in self.directions:
            datapath.request_splice(d.source, d.target)

    def attach(self, pair: tuple[Relay, Relay]) -> "KernelSplice":
        """The relays are running (and have written what was read before): report, then follow."""
        if self.client is not None:
            self.client.relay = pair[0]
        if self.upstream is not None:
            self.upstream.relay = pair[1]
        for d in self.directions:
            d.relay.on_forwarded = self._forwarded
            self._forwarded(d.relay)
        if self.receive is not None:
            self.receive.start(pair[0] if self.receive.remote_is_client else pair[1])
        return self

    def _direction(self, relay: Relay) -> Direction:
        return self.client if self.client is not None and self.client.relay is relay else self.upstream

    def _forwarded(self, relay: Relay) -> None:
        """The relay wrote what it read: tell the kernel, once per turn of the event loop (not
        per read: two map syscalls each), and no more once the splice has started."""
        if relay not in self._reporting:
            self._reporting.add(relay)
            asyncio.get_running_loop().call_soon(self._report, relay)

    def _report(self, relay: Relay) -> None:
        self._reporting.discard(relay)
        if relay.on_forwarded is None or relay.peer.transport.get_write_buffer_size():
            return  # ended, or our bytes not all out yet: the drain reports again
        if not self.datapath.splice_forwarded(self._direction(relay).source, relay.bytes_in):
            relay.on_forwarded = None

    def moved(self) -> int:
        """Grows while the kernel carries bytes (for idle timeouts)."""
        moved = sum(self.datapath.splice_activity(d.source) for d in self.directions)
        return moved + (self.receive.redirected() if self.receive else 0)

    def end(self) -> dict[int, int]:
        """Forget the splices; bytes each carried, by id() of the relay that reads its source:
        what its target socket sent, less what the relay wrote to it."""
        carried = {}
        for d in self.directions:
            self.datapath.end_splice(d.source)
            try:
                if d.relay is not None:
                    d.relay.on_forwarded = None
                    sent = data_sent(d.target_socket) - d.target_start
                    carried[id(d.relay)] = max(0, sent - d.relay.bytes_in)
            except OSError:
                pass
            finally:
                d.target_socket.close()
        if self.receive is not None:
            carried.update(self.receive.end())
        return carried


SO_COOKIE = 57  # asm-generic/socket.h
EOF_WAIT_STEP_S, EOF_WAIT_MAX_S = 0.001, 10.0
DRAIN_ROUNDS, DRAIN_READ = 16, 256 * 1024


def socket_cookie(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


class ReceiveSplice:
    """sk_skb: what arrives from the remote peer on `remote` goes into the send queue of `local`
    (the proxy's socket toward the app) inside the kernel, through its psock worker.

    Arming: stop reading `remote`, wait until what we already read has left our buffers for
    `local`, ask for the splice, then let the verdict program take `remote` over and kick it
    once (SO_RCVLOWAT wakes it) so bytes already queued go the same way, in order. The relay
    keeps reading `remote` for its EOF; the EOF is passed on only once `local` has sent all
    the kernel took (its TCP counters say), as the worker sends asynchronously."""

    def __init__(self, datapath, remote: socket.socket, local: socket.socket, local_key: abi.SockKey,
                 remote_is_client: bool):
        self.datapath = datapath
        self.remote = socket.socket(fileno=os.dup(remote.fileno()))  # counters outlive the transports
        self.local = socket.socket(fileno=os.dup(local.fileno()))
        self.remote_cookie, self.local_key = socket_cookie(remote), local_key
        self.remote_is_client = remote_is_client
        self.relay: Relay | None = None
        self.armed = False
        self.local_start = self.read_at_arm = 0

    def start(self, relay: Relay) -> None:
        """`relay` reads `remote` and writes `local`."""
        self.relay = relay
        relay.transport.pause_reading()
        relay.eof_gate = self._gate_eof
        self._arm_when_drained()

    def _arm_when_drained(self) -> None:
        relay = self.relay
        if relay.transport.is_closing() or relay.peer.transport.is_closing():
            return
        drained = self._drain()
        if drained is None:  # the peer is done sending: nothing to splice, the relay sees the EOF
            relay.transport.resume_reading()
            return
        if not drained:
            asyncio.get_running_loop().call_later(EOF_WAIT_STEP_S, self._arm_when_drained)
            return
        try:
            self.local_start, self.read_at_arm = data_sent(self.local), relay.bytes_in
            self.datapath.request_skb_splice(self.remote_cookie, self.local_key)  # local: in loopback_socks
            self.datapath.add_skb_socket(self.remote_cookie, self.remote)  # the verdict takes over here
            self.armed = True
            self.remote.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)  # and sees what came meanwhile
        except OSError:
            self.datapath.end_skb_splice(self.remote_cookie)  # a side closed meanwhile: we relay
        relay.transport.resume_reading()

    def _drain(self) -> bool | None:
        """Whether `remote`'s receive queue is empty and our buffer toward `local` too (None: the
        peer has finished sending). The verdict would redirect a partly read skb whole, repeating
        what we read of it, so we read the queue to the end ourselves first (at most DRAIN_ROUNDS
        reads per try)."""
        if self.relay.peer.transport.get_write_buffer_size():
            return False
        for _ in range(DRAIN_ROUNDS):
            try:
                data = self.remote.recv(DRAIN_READ, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return True
            if not data:
                return None
            self.relay.data_received(data)
            if self.relay.peer.transport.get_write_buffer_size():
                return False
        return False

    def redirected(self) -> int:
        return self.datapath.skb_redirected(self.remote_cookie) if self.armed else 0

    def _expected_on_local(self) -> int:
        return self.redirected() + self.relay.bytes_in - self.read_at_arm

    def _gate_eof(self, pass_eof) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + EOF_WAIT_MAX_S

        def check() -> None:
            try:
                done = not self.armed or data_sent(self.local) - self.local_start >= self._expected_on_local()
            except OSError:
                done = True
            if done or loop.time() > deadline or self.relay.peer.transport.is_closing():
                pass_eof()
            else:
                loop.call_later(EOF_WAIT_STEP_S, check)

        check()

    def end(self) -> dict[int, int]:
        carried = {}
        try:
            if self.armed and self.relay is not None:
                proxy_wrote = self.relay.bytes_in - self.read_at_arm
                carried[id(self.relay)] = max(0, data_sent(self.local) - self.local_start - proxy_wrote)
        except OSError:
            pass
        finally:
            self.datapath.end_skb_splice(self.remote_cookie)
            self.remote.close()
            self.local.close()
        return carried


def _direction(datapath, source_side, source_cookie: int, target_side, target_cookie: int) -> Direction:
    """From the app behind `source_side` (a loopback leg) into the proxy's `target_side`: in the
    sockhash already if a loopback leg too (sockops put it there), else put there now."""
    target = own_key(target_side, target_cookie)
    if not is_loopback(target_side):
        datapath.add_socket(target, target_side)
    duplicate = socket.socket(fileno=os.dup(target_side.fileno()))
    return Direction(peer_key(source_side, source_cookie), target, duplicate, data_sent(duplicate))


def request(datapath, client: asyncio.Transport, client_cookie: int, upstream: asyncio.Transport,
            upstream_cookie: int, skb: bool = False) -> KernelSplice | None:
    """Ask for what this pair allows: each side that is a loopback leg (an app in an enrolled
    pod behind it) sends past the proxy, into the proxy's socket at the other side; with `skb`,
    a side toward a remote peer receives past the proxy too."""
    a = client.get_extra_info("socket")
    b = upstream.get_extra_info("socket")
    if a is None or b is None:
        return None
    made: list[Direction] = []
    receive = None
    try:
        a_loop, b_loop = is_loopback(a), is_loopback(b)
        from_client = _direction(datapath, a, client_cookie, b, upstream_cookie) if a_loop else None
        made += [from_client] if from_client else []
        from_upstream = _direction(datapath, b, upstream_cookie, a, client_cookie) if b_loop else None
        made += [from_upstream] if from_upstream else []
        if skb and a_loop != b_loop:
            receive = (ReceiveSplice(datapath, b, a, own_key(a, client_cookie), False) if a_loop
                       else ReceiveSplice(datapath, a, b, own_key(b, upstream_cookie), True))
        return KernelSplice(datapath, from_client, from_upstream, receive) if made or receive else None
    except OSError:
        for d in made:
            datapath.end_splice(d.source)
            d.target_socket.close()
        raise


class Splicer:
    """The proxy's handle on the kernel splices: `request` a pair's splice before the relays
    start (KernelSplice.attach follows them); None when the fast path is off or the kernel refused."""

    def __init__(self, datapath, fast_paths: int, problems):
        self.datapath, self.problems = datapath, problems
        self.on = bool(fast_paths & abi.FAST_SPLICE)  # sk_msg splices
        self.skb = bool(fast_paths & abi.FAST_SKB)  # sk_skb: bytes from remote peers

    def request(self, client: asyncio.Transport, client_cookie: int, upstream: asyncio.Transport,
                upstream_cookie: int) -> KernelSplice | None:
        if not self.on:
            return None
        try:
            return request(self.datapath, client, client_cookie, upstream, upstream_cookie, self.skb)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTCONN):  # a side half-closed or closed meanwhile
                self.problems.warning("splice", "kernel splice not used: %s", e)
            return None
