"""The agent's handle on a node's pinned data path: enrolment, inbound
steering, original destinations, policy and counters. No bcc here.
"""

import ctypes
import ipaddress
import os
import socket
from dataclasses import dataclass

from nodeagent.datapath import abi, libbpf
from nodeagent.datapath.pins import PinLayout
from nodeagent.datapath.programs import SK_LOOKUP

MAPS = ("pods_by_netns", "pods_by_ip", "orig_by_port", "counters", "policy", "ip_identity",
        "outbound_skip_ports", "inbound_skip_ports", "inbound_listeners", "loopback_socks", "msg_state", "splices",
        "skb_socks", "skb_splices", "proxy_socks", "unmeshed_refused", "refusing")
SO_COOKIE = 57  # asm-generic/socket.h


@dataclass(frozen=True)
class PodEntry:
    netns_cookie: int
    ip: str
    slot: int
    outbound_port: int
    identity: int = 0
    enrolled: bool = True

    def __post_init__(self):
        if not 0 <= self.slot < abi.MAX_PODS:
            raise ValueError(f"pod slot {self.slot} outside 0..{abi.MAX_PODS - 1}")
        if not 0 < self.outbound_port < 65536:
            raise ValueError(f"outbound port {self.outbound_port} is not a TCP port")


def _ip_key(ip: str) -> bytes:
    return ipaddress.IPv4Address(ip).packed  # network order, as the kernel's user_ip4


def _addr_key(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """struct na_addr: IPv6, or IPv4 mapped (::ffff:a.b.c.d), in network order."""
    if address.version == 4:
        address = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)
    return address.packed


def _addr_of(key: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.IPv6Address(key)
    return address.ipv4_mapped or address


class Datapath:
    def __init__(self, layout: PinLayout):
        self.layout = layout
        self._fds: dict[str, int] = {}
        try:
            for name in MAPS:
                self._fds[name] = libbpf.obj_get(str(layout.map(name)))
        except libbpf.BpfError:
            self.close()
            raise
        self._cpus = libbpf.possible_cpus()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # Enrolment: one map entry per pod, by netns cookie (outbound) and by IP (inbound).

    def enrol(self, pod: PodEntry) -> None:
        value = bytes(abi.Pod(int.from_bytes(_ip_key(pod.ip), "little"), pod.slot, pod.identity, pod.outbound_port,
                              abi.POD_ENROLLED if pod.enrolled else 0))
        libbpf.map_update(self._fds["pods_by_netns"], abi.u64(pod.netns_cookie), value)
        libbpf.map_update(self._fds["pods_by_ip"], _ip_key(pod.ip), value)

    def forget(self, netns_cookie: int, ip: str) -> None:
        """Out of the mesh: sk_lookup first (attached, it refuses what it does not steer), then the entries."""
        self.detach_inbound(netns_cookie)
        libbpf.map_delete(self._fds["pods_by_netns"], abi.u64(netns_cookie))
        libbpf.map_delete(self._fds["pods_by_ip"], _ip_key(ip))
        libbpf.map_delete(self._fds["refusing"], abi.u64(netns_cookie))

    def forget_cookie(self, netns_cookie: int) -> None:
        """Remove a pod known only by its cookie (left by an earlier agent)."""
        self.detach_inbound(netns_cookie)
        raw = libbpf.map_lookup(self._fds["pods_by_netns"], abi.u64(netns_cookie), ctypes.sizeof(abi.Pod))
        if raw is not None:
            ip = abi.Pod.from_buffer_copy(raw).pod_ip.to_bytes(4, "little")
            libbpf.map_delete(self._fds["pods_by_ip"], ip)
        libbpf.map_delete(self._fds["pods_by_netns"], abi.u64(netns_cookie))
        libbpf.map_delete(self._fds["refusing"], abi.u64(netns_cookie))

    def enrolled_slots(self) -> dict[int, int]:
        """Netns cookie -> counter slot, of every pod entry (a predecessor's included)."""
        slots = {}
        for key in libbpf.map_keys(self._fds["pods_by_netns"], 8):
            raw = libbpf.map_lookup(self._fds["pods_by_netns"], key, ctypes.sizeof(abi.Pod))
            if raw is not None:
                slots[int.from_bytes(key, "little")] = abi.Pod.from_buffer_copy(raw).slot
        return slots

    def enrolled_cookies(self) -> list[int]:
        return [int.from_bytes(k, "little") for k in libbpf.map_keys(self._fds["pods_by_netns"], 8)]

    def inbound_cookies(self) -> list[int]:
        """Namespaces with an sk_lookup link pinned (by their cookies)."""
        links = self.layout.sk_lookup_links
        return [int(p.name) for p in links.iterdir() if p.name.isdigit()] if links.exists() else []

    # Inbound: sk_lookup attached to the pod's namespace, steering onto the listener in its slot.
    # Attached to enrolled pods' namespaces only: there, it refuses what it does not steer.

    def attach_inbound(self, netns_path: str, netns_cookie: int) -> bool:
        """Attach sk_lookup to a pod's namespace once (after `enrol`); False if it already was."""
        path = self.layout.sk_lookup_link(netns_cookie)
        if path.exists():
            return False
        prog = libbpf.obj_get(str(self.layout.prog(SK_LOOKUP.name)))
        ns = os.open(netns_path, os.O_RDONLY)
        try:
            libbpf.pin_new_link(prog, ns, SK_LOOKUP.attach_type, str(path))
        finally:
            os.close(ns)
            os.close(prog)
        return True

    def detach_inbound(self, netns_cookie: int) -> None:
        from nodeagent.datapath.cleanup import detach_link

        path = self.layout.sk_lookup_link(netns_cookie)
        if path.exists():
            detach_link(path)

    def register_inbound_listener(self, slot: int, listener: socket.socket) -> None:
        libbpf.map_update(self._fds["inbound_listeners"], abi.u32(slot), abi.u32(listener.fileno()))

    # Pods over a limit: their captured connects refused in the kernel for a while (proxy/refusal.py).

    def refuse_connects(self, netns_cookie: int, until_ns: int) -> None:
        """Until `until_ns` (CLOCK_MONOTONIC, as bpf_ktime_get_ns), the pod's captured connects fail with EPERM."""
        libbpf.map_update(self._fds["refusing"], abi.u64(netns_cookie), abi.u64(until_ns))

    def sweep_refusals(self) -> int:
        """Remove the windows of pods no entry names (a worker's late write after a pod left, or
        an agent's before a crash): netns cookies are never reused, so such an entry would stay
        until the map is full. How many went."""
        enrolled = set(self.enrolled_cookies())
        stale = [key for key in libbpf.map_keys(self._fds["refusing"], 8)
                 if int.from_bytes(key, "little") not in enrolled]
        for key in stale:
            libbpf.map_delete(self._fds["refusing"], key)
        return len(stale)

    # The proxy's own sockets in pods: never captured, whatever mark they carry.

    def register_proxy_socket(self, sock: socket.socket) -> None:
        """Before `sock` connects from inside a pod: the data path leaves it alone (two
        syscalls: its cookie, one map update; the kernel drops the entry once connected)."""
        cookie = sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)
        libbpf.map_update(self._fds["proxy_socks"], cookie, abi.u32(1))

    # Original destinations of redirected connections.

    def original_destination(self, netns_cookie: int, client_port: int) -> tuple[str, int] | None:
        """Where the client in that pod, on that local port, was connecting; consumed on read."""
        key = bytes(abi.OrigKey(netns_cookie, client_port, 0))
        raw = libbpf.map_lookup(self._fds["orig_by_port"], key, ctypes.sizeof(abi.OrigDst))
        if raw is None:
            return None
        libbpf.map_delete(self._fds["orig_by_port"], key)
        orig = abi.OrigDst.from_buffer_copy(raw)
        return str(ipaddress.IPv4Address(orig.ip.to_bytes(4, "little"))), socket.ntohs(orig.port)

    # Kernel fast path (sk_msg): splices the proxy asks for; see proxy/fastpath.py.

    def add_socket(self, key: abi.SockKey, sock: socket.socket) -> None:
        """Put one of the proxy's sockets in loopback_socks, as a splice target."""
        libbpf.map_update(self._fds["loopback_socks"], bytes(key), abi.u32(sock.fileno()))

    def request_splice(self, source: abi.SockKey, target: abi.SockKey) -> None:
        """From the source's next send once the proxy has forwarded all it sent (see splice_forwarded)."""
        value = abi.Splice(target, 0, 0)
        libbpf.map_update(self._fds["splices"], bytes(source), bytes(value))

    def _splice(self, source: abi.SockKey) -> abi.Splice | None:
        raw = libbpf.map_lookup(self._fds["splices"], bytes(source), ctypes.sizeof(abi.Splice))
        return None if raw is None else abi.Splice.from_buffer_copy(raw)

    def splice_forwarded(self, source: abi.SockKey, forwarded: int) -> bool:
        """The proxy forwarded more of the source's bytes; False once the splice has started
        (from then on only the kernel writes the entry, and nothing more needs reporting)."""
        splice = self._splice(source)
        if splice is None or splice.offered:
            return False
        splice.forwarded = forwarded
        libbpf.map_update(self._fds["splices"], bytes(source), bytes(splice))
        return True

    def splice_activity(self, source: abi.SockKey) -> int:
        """Grows while the kernel sends the source's bytes past the proxy (not a byte count)."""
        splice = self._splice(source)
        return 0 if splice is None else splice.offered

    def end_splice(self, source: abi.SockKey) -> None:
        libbpf.map_delete(self._fds["splices"], bytes(source))

    # sk_skb splices: by socket cookie.

    def add_skb_socket(self, cookie: int, sock: socket.socket) -> None:
        libbpf.map_update(self._fds["skb_socks"], abi.u64(cookie), abi.u32(sock.fileno()))

    def request_skb_splice(self, source_cookie: int, target: abi.SockKey) -> None:
        """What arrives on the source goes to `target`, once the source is in skb_socks."""
        libbpf.map_update(self._fds["skb_splices"], abi.u64(source_cookie), bytes(abi.SkbSplice(target, 0)))

    def skb_redirected(self, source_cookie: int) -> int:
        raw = libbpf.map_lookup(self._fds["skb_splices"], abi.u64(source_cookie), ctypes.sizeof(abi.SkbSplice))
        return 0 if raw is None else abi.SkbSplice.from_buffer_copy(raw).redirected

    def end_skb_splice(self, source_cookie: int) -> None:
        libbpf.map_delete(self._fds["skb_splices"], abi.u64(source_cookie))

    # L4 policy and exemptions.

    def deny(self, src_identity: int, dst_identity: int, dst_port: int) -> None:
        libbpf.map_update(self._fds["policy"], bytes(abi.PolicyKey(src_identity, dst_identity, dst_port)),
                          abi.u32(1))

    def undeny(self, src_identity: int, dst_identity: int, dst_port: int) -> None:
        libbpf.map_delete(self._fds["policy"], bytes(abi.PolicyKey(src_identity, dst_identity, dst_port)))

    def set_ip_identity(self, ip: str, identity: int) -> None:
        libbpf.map_update(self._fds["ip_identity"], _ip_key(ip), abi.u32(identity))

    def skip_port(self, direction: str, port: int, skip: bool = True) -> None:
        fd = self._fds[f"{direction}_skip_ports"]
        if skip:
            libbpf.map_update(fd, abi.u32(port), abi.u32(1))
        else:
            libbpf.map_delete(fd, abi.u32(port))

    # Counters: per pod slot, per CPU.

    def counters(self, slot: int) -> dict[str, int]:
        size = ctypes.sizeof(abi.Counters)  # a multiple of 8, as per-CPU values are laid out
        raw = libbpf.map_lookup(self._fds["counters"], abi.u32(slot), size * self._cpus)
        total = dict.fromkeys(abi.Counters().as_dict(), 0)
        for cpu in range(self._cpus):
            for name, value in abi.Counters.from_buffer_copy(raw, cpu * size).as_dict().items():
                total[name] += value
        return total

    def reset_counters(self, slot: int, addresses=()) -> None:
        """Before a slot serves a new pod (with `addresses`, those its namespace holds)."""
        size = ctypes.sizeof(abi.Counters)
        libbpf.map_update(self._fds["counters"], abi.u32(slot), bytes(size * self._cpus))
        for address in addresses:
            libbpf.map_delete(self._fds["unmeshed_refused"], _addr_key(address))

    def unmeshed_refusals(self) -> dict:
        """Inbound connections refused at an address of an enrolled pod that the mesh does not
        serve (IPv6, another IPv4 than the pod's), by that address (at most 4,096: an LRU)."""
        fd = self._fds["unmeshed_refused"]
        counts = {}
        for key in list(libbpf.map_keys(fd, 16)):
            raw = libbpf.map_lookup(fd, key, 8)
            if raw is not None:
                counts[_addr_of(key)] = int.from_bytes(raw, "little")
        return counts
