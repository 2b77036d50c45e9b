"""ctypes mirrors of bpf/nodeagent.h: the structs that cross the kernel boundary."""

import ctypes

MAX_PODS = 1024  # NA_MAX_PODS
LAYOUT_VERSION = 3  # NA_LAYOUT_VERSION
POD_ENROLLED = 1  # NA_POD_ENROLLED
FAST_SPLICE, FAST_LOOPBACK, FAST_SKB = 1, 2, 4  # NA_FAST_*
MSG_UNDECIDED, MSG_TCP, MSG_PEER, MSG_SPLICED = 0, 1, 2, 3  # NA_MSG_*
SOCK_PROXY = 1  # NA_SOCK_PROXY


class Pod(ctypes.Structure):
    """struct na_pod"""

    _fields_ = [
        ("pod_ip", ctypes.c_uint32),  # network order
        ("slot", ctypes.c_uint32),
        ("identity", ctypes.c_uint32),
        ("outbound_port", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
    ]


class OrigDst(ctypes.Structure):
    """struct na_orig_dst"""

    _fields_ = [("ip", ctypes.c_uint32), ("port", ctypes.c_uint16), ("family", ctypes.c_uint16)]


class OrigKey(ctypes.Structure):
    """struct na_orig_key"""

    _fields_ = [("netns_cookie", ctypes.c_uint64), ("client_port", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class PolicyKey(ctypes.Structure):
    """struct na_policy_key"""

    _fields_ = [("src_identity", ctypes.c_uint32), ("dst_identity", ctypes.c_uint32), ("dst_port", ctypes.c_uint32)]


class Config(ctypes.Structure):
    """struct na_config"""

    _fields_ = [("mesh_port", ctypes.c_uint32), ("inbound_port", ctypes.c_uint32), ("fast_paths", ctypes.c_uint32),
                ("pad", ctypes.c_uint32)]


class Pins(ctypes.Structure):
    """struct na_pins"""

    _fields_ = [("layout_version", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("programs_digest", ctypes.c_uint64)]


class SockKey(ctypes.Structure):
    """struct na_sock_key"""

    _fields_ = [("netns_cookie", ctypes.c_uint64), ("remote_ip4", ctypes.c_uint32), ("local_port", ctypes.c_uint16),
                ("remote_port", ctypes.c_uint16)]


class MsgState(ctypes.Structure):
    """struct na_msg_state"""

    _fields_ = [("mode", ctypes.c_uint32), ("slot", ctypes.c_uint32), ("sent", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class Splice(ctypes.Structure):
    """struct na_splice"""

    _fields_ = [("target", SockKey), ("forwarded", ctypes.c_uint64), ("offered", ctypes.c_uint64)]


class SkbSplice(ctypes.Structure):
    """struct na_skb_splice"""

    _fields_ = [("target", SockKey), ("redirected", ctypes.c_uint64)]


class Counters(ctypes.Structure):
    """struct na_counters"""

    _fields_ = [
        ("redirected", ctypes.c_uint64),
        ("opened", ctypes.c_uint64),
        ("failed", ctypes.c_uint64),
        ("denied", ctypes.c_uint64),
        ("inbound_steered", ctypes.c_uint64),
        ("inbound_refused", ctypes.c_uint64),
        ("fast_path_bytes", ctypes.c_uint64),
        ("proxy_port_refused", ctypes.c_uint64),
        ("over_limit", ctypes.c_uint64),
    ]

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name, _ in self._fields_}


# sizeof() of each struct as the C compiler lays it out; tests compare.
C_SIZES = {Pod: 16, OrigDst: 8, OrigKey: 16, PolicyKey: 12, Config: 16, Pins: 16, Counters: 72, SockKey: 16,
           MsgState: 24, Splice: 32, SkbSplice: 24}


def u32(value: int) -> bytes:
    return ctypes.c_uint32(value).value.to_bytes(4, "little")


def u64(value: int) -> bytes:
    return value.to_bytes(8, "little")
