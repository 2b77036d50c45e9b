"""The sockhash keys the proxy computes must be the ones the kernel computes (bpf/datapath.c
sock_key_of and na_msg): a socket's own key, and its loopback peer's with the ports swapped."""

import ipaddress

from nodeagent.datapath import abi
from nodeagent.proxy.fastpath import is_loopback, own_key, peer_key


class Sock:
    def __init__(self, local, remote):
        self.local, self.remote = local, remote

    def getsockname(self):
        return self.local

    def getpeername(self):
        return self.remote


def network_order(ip: str) -> int:
    """As the kernel's remote_ip4: the address bytes in memory order, read as a little-endian u32."""
    return int.from_bytes(ipaddress.IPv4Address(ip).packed, "little")


def test_the_proxys_accepted_end_names_the_apps_socket_as_its_peer():
    accepted = Sock(("127.0.0.1", 15001), ("127.0.0.1", 40000))  # the proxy's end in the app's pod
    mine, apps = own_key(accepted, 7), peer_key(accepted, 7)
    assert (mine.netns_cookie, mine.local_port, mine.remote_port) == (7, 15001, 40000)
    assert (apps.netns_cookie, apps.local_port, apps.remote_port) == (7, 40000, 15001)
    assert mine.remote_ip4 == apps.remote_ip4 == network_order("127.0.0.1")
    assert is_loopback(accepted)


def test_a_remote_socket_keeps_its_peers_address_and_is_not_a_loopback_leg():
    upstream = Sock(("10.244.0.13", 51000), ("10.244.1.12", 9000))
    key = own_key(upstream, 9)
    assert bytes(key)[8:12] == ipaddress.IPv4Address("10.244.1.12").packed  # network order, as in the map
    assert (key.local_port, key.remote_port) == (51000, 9000) and not is_loopback(upstream)
    assert len(bytes(key)) == abi.C_SIZES[abi.SockKey]
