"""The programs of bpf/datapath.c and where each one attaches."""

from dataclasses import dataclass

from nodeagent.datapath import libbpf


@dataclass(frozen=True)
class Program:
    name: str  # the C function, and its pin name
    prog_type: int
    attach_type: int
    hook: str  # "cgroup": the node's pod cgroup subtree; "proxy-cgroup": the proxy's own cgroup;
    #            "netns": each pod's network namespace; "sockhash": the loopback_socks map


CONNECT4 = Program("na_connect4", libbpf.PROG_TYPE_CGROUP_SOCK_ADDR, libbpf.ATTACH_CGROUP_INET4_CONNECT, "cgroup")
CONNECT6 = Program("na_connect6", libbpf.PROG_TYPE_CGROUP_SOCK_ADDR, libbpf.ATTACH_CGROUP_INET6_CONNECT, "cgroup")
GETPEERNAME4 = Program("na_getpeername4", libbpf.PROG_TYPE_CGROUP_SOCK_ADDR,
                       libbpf.ATTACH_CGROUP_INET4_GETPEERNAME, "cgroup")
SOCKOPS = Program("na_sockops", libbpf.PROG_TYPE_SOCK_OPS, libbpf.ATTACH_CGROUP_SOCK_OPS, "cgroup")
SK_LOOKUP = Program("na_sk_lookup", libbpf.PROG_TYPE_SK_LOOKUP, libbpf.ATTACH_SK_LOOKUP, "netns")
SOCKOPS_PROXY = Program("na_sockops_proxy", libbpf.PROG_TYPE_SOCK_OPS, libbpf.ATTACH_CGROUP_SOCK_OPS, "proxy-cgroup")
MSG = Program("na_msg", libbpf.PROG_TYPE_SK_MSG, libbpf.ATTACH_SK_MSG_VERDICT, "sockhash")
SKB = Program("na_skb_verdict", libbpf.PROG_TYPE_SK_SKB, libbpf.ATTACH_SK_SKB_STREAM_VERDICT, "sockhash")
LOOPBACK_MAP = "loopback_socks"  # where MSG attaches
SKB_MAP = "skb_socks"  # where SKB attaches
SOCKHASH_OF = {MSG.name: LOOPBACK_MAP, SKB.name: SKB_MAP}
SOCKHASH_PROGRAMS = (MSG, SKB)

PROGRAMS = (CONNECT4, CONNECT6, GETPEERNAME4, SOCKOPS, SK_LOOKUP, SOCKOPS_PROXY, MSG, SKB)
CGROUP_PROGRAMS = tuple(p for p in PROGRAMS if p.hook == "cgroup")
