"""The few libbpf calls we need, through ctypes (Debian's libbpf1).

bcc compiles and loads; everything after that (links, pins, map access)
goes through libbpf, so that long-lived processes never import bcc.
libbpf 1.x returns -errno from these calls.
"""

import ctypes
import ctypes.util
import os
from collections.abc import Iterator

_lib = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)

# enum bpf_prog_type (uapi/linux/bpf.h)
PROG_TYPE_SOCK_OPS = 13
PROG_TYPE_SK_SKB = 14
PROG_TYPE_SK_MSG = 16
PROG_TYPE_CGROUP_SOCK_ADDR = 18
PROG_TYPE_SK_LOOKUP = 30

# enum bpf_attach_type
ATTACH_CGROUP_SOCK_OPS = 3
ATTACH_SK_SKB_STREAM_VERDICT = 5
ATTACH_SK_MSG_VERDICT = 7
ATTACH_CGROUP_INET4_CONNECT = 10
ATTACH_CGROUP_INET6_CONNECT = 11
ATTACH_CGROUP_INET4_GETPEERNAME = 29
ATTACH_SK_LOOKUP = 36

# enum bpf_func_id
FUNC_MAP_LOOKUP_ELEM = 1
FUNC_GET_SOCKET_COOKIE = 46
FUNC_SOCK_OPS_CB_FLAGS_SET = 59
FUNC_SOCK_HASH_UPDATE = 70
FUNC_MSG_REDIRECT_HASH = 71
FUNC_SK_REDIRECT_HASH = 72
FUNC_SK_RELEASE = 86
FUNC_GET_NETNS_COOKIE = 122
FUNC_SK_ASSIGN = 124

BPF_ANY = 0
LINK_TYPE_CGROUP = 3  # enum bpf_link_type
LINK_TYPE_SOCKMAP = 14


class BpfError(OSError):
    pass


def _check(result: int, what: str) -> int:
    if result < 0:
        raise BpfError(-result, f"{what}: {os.strerror(-result)}")
    return result


def obj_get(path: str) -> int:
    return _check(_lib.bpf_obj_get(path.encode()), f"bpf_obj_get {path}")


def obj_pin(fd: int, path: str) -> None:
    _check(_lib.bpf_obj_pin(fd, path.encode()), f"bpf_obj_pin {path}")


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    return _check(_lib.bpf_link_create(prog_fd, target_fd, attach_type, None), "bpf_link_create")


def pin_new_link(prog_fd: int, target_fd: int, attach_type: int, path: str) -> None:
    """Attach by a new link and pin it, so the attachment outlives this process."""
    link = link_create(prog_fd, target_fd, attach_type)
    try:
        obj_pin(link, path)
    finally:
        os.close(link)


def link_update(link_fd: int, prog_fd: int) -> None:
    _check(_lib.bpf_link_update(link_fd, prog_fd, None), "bpf_link_update")


def link_detach(link_fd: int) -> None:
    _check(_lib.bpf_link_detach(link_fd), "bpf_link_detach")


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """IDs of the programs attached to a cgroup (or netns) for one hook."""
    ids = (ctypes.c_uint32 * 64)()
    count = ctypes.c_uint32(len(ids))
    flags = ctypes.c_uint32(0)
    _check(_lib.bpf_prog_query(target_fd, attach_type, 0, ctypes.byref(flags), ids, ctypes.byref(count)),
           "bpf_prog_query")
    return list(ids[: count.value])


def link_info(fd: int) -> tuple[int, int, int]:
    """(link id, program id, cgroup id) of a link; cgroup id 0 unless a cgroup link.

    struct bpf_link_info: type, id, prog_id (u32 each), then a union aligned
    to 8 whose cgroup member starts with the cgroup id (u64).
    """
    info = (ctypes.c_uint64 * 32)()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_lib.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)), "bpf_obj_get_info_by_fd")
    raw = bytes(info)
    link_type, link_id, prog_id = (int.from_bytes(raw[i:i + 4], "little") for i in (0, 4, 8))
    cgroup_id = int.from_bytes(raw[16:24], "little") if link_type == LINK_TYPE_CGROUP else 0
    return link_id, prog_id, cgroup_id


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    _check(_lib.bpf_map_update_elem(fd, key, value, ctypes.c_uint64(flags)), "bpf_map_update_elem")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    value = ctypes.create_string_buffer(value_size)
    result = _lib.bpf_map_lookup_elem(fd, key, value)
    if result == -2:  # ENOENT
        return None
    _check(result, "bpf_map_lookup_elem")
    return value.raw


def map_delete(fd: int, key: bytes) -> bool:
    result = _lib.bpf_map_delete_elem(fd, key)
    if result == -2:
        return False
    _check(result, "bpf_map_delete_elem")
    return True


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    key = None
    next_key = ctypes.create_string_buffer(key_size)
    while _lib.bpf_map_get_next_key(fd, key, next_key) == 0:
        key = next_key.raw
        yield key


def probe_prog_type(prog_type: int) -> bool:
    return _lib.libbpf_probe_bpf_prog_type(prog_type, None) == 1


def probe_helper(prog_type: int, func_id: int) -> bool:
    return _lib.libbpf_probe_bpf_helper(prog_type, func_id, None) == 1


MAP_TYPE_SOCKHASH = 18  # enum bpf_map_type


def probe_sockmap_link(prog_type: int, attach_type: int) -> bool:
    """Whether a program of this type can be attached to a sockhash by a bpf_link (6.10+):
    load a two-instruction program, make a one-slot sockhash, try, undo."""
    insns = (ctypes.c_uint64 * 2)(0x00000001000000b7, 0x0000000000000095)  # r0 = 1; exit
    prog = _lib.bpf_prog_load(prog_type, None, b"GPL", insns, 2, None)
    if prog < 0:
        return False
    sockhash = _lib.bpf_map_create(MAP_TYPE_SOCKHASH, None, 4, 4, 1, None)
    try:
        if sockhash < 0:
            return False
        link = _lib.bpf_link_create(prog, sockhash, attach_type, None)
        if link < 0:
            return False
        os.close(link)
        return True
    finally:
        if sockhash >= 0:
            os.close(sockhash)
        os.close(prog)


def possible_cpus() -> int:
    """Per-CPU map values hold one slot per possible CPU."""
    with open("/sys/devices/system/cpu/possible") as f:
        last = 0
        for part in f.read().strip().split(","):
            last = max(last, int(part.split("-")[-1]))
    return last + 1
