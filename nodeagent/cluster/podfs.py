"""Find a pod's cgroup and network namespace on the node from its UID.

kubelet names a pod's cgroup after its UID: cgroupfs driver `pod<uid>`,
systemd driver `kubepods-<qos>-pod<uid with _ for ->.slice` (containerd and
CRI-O alike). A process of the pod (any container's, or the pause one) whose
namespace holds the pod's IP gives the namespace: /proc/<pid>/ns/net (`addresses`
says what a namespace holds).
"""

import ipaddress
import os
import socket
import struct
from pathlib import Path

from nodeagent import cgroups, netns


def pod_cgroup_names(uid: str) -> tuple[str, ...]:
    underscored = uid.replace("-", "_")
    return (f"pod{uid}", f"kubepods-pod{underscored}.slice", f"kubepods-besteffort-pod{underscored}.slice",
            f"kubepods-burstable-pod{underscored}.slice")


def find_pod_cgroup(root: Path, uid: str, max_depth: int = 6) -> Path | None:
    """Breadth-first under `root` for the pod's cgroup directory."""
    names = set(pod_cgroup_names(uid))
    if root.name in names:
        return root  # a sidecar's agent is given the pod's own cgroup
    level = [root]
    for _ in range(max_depth):
        following = []
        for directory in level:
            try:
                children = [e for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            for child in children:
                if child.name in names:
                    return Path(child.path)
                following.append(Path(child.path))
        level = following
    return None


def open_pod_netns(pod_cgroup: Path, pod_ip: str) -> int | None:
    """An fd on the pod's network namespace (kept alive while the fd is open), or None.

    Not any process's: the pod's cgroup can hold one in another namespace (CRI-O's conmon
    sits in the host's, and may come first), so the namespace must hold the pod's IP."""
    wanted, seen = ipaddress.ip_address(pod_ip), set()
    for pid in cgroups.pids_in(pod_cgroup):
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        except OSError:
            continue  # exited meanwhile: try the next process
        inode = os.fstat(fd).st_ino
        try:
            if inode not in seen and wanted in addresses(f"/proc/self/fd/{fd}"):
                return fd
        except OSError:
            pass
        seen.add(inode)
        os.close(fd)
    return None


# Netlink (linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h): one RTM_GETADDR dump.
RTM_NEWADDR, RTM_GETADDR = 20, 22
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFA_ADDRESS, IFA_LOCAL = 1, 2
NLMSG_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
IFADDRMSG = struct.Struct("=BBBBI")  # struct ifaddrmsg
RTATTR = struct.Struct("=HH")  # struct rtattr
DUMP_READ = 1 << 16


def _align(n: int) -> int:
    return (n + 3) & ~3


def addresses(netns_path: str) -> frozenset:
    """Every IPv4 and IPv6 address the network namespace at `netns_path` holds (lo's too)."""
    with netns.entered(netns_path):  # a netlink socket answers for the namespace it was made in
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    found = set()
    with sock:
        request = IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        sock.send(NLMSG_HEADER.pack(NLMSG_HEADER.size + len(request), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
                  + request)
        while True:
            data = sock.recv(DUMP_READ)
            offset = 0
            while offset + NLMSG_HEADER.size <= len(data):
                length, kind, _, _, _ = NLMSG_HEADER.unpack_from(data, offset)
                if kind == NLMSG_DONE:
                    return frozenset(found)
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, offset + NLMSG_HEADER.size)[0]
                    raise OSError(code, f"RTM_GETADDR in {netns_path}: {os.strerror(code)}")
                if kind == RTM_NEWADDR:
                    found |= _message_addresses(data[offset + NLMSG_HEADER.size:offset + length])
                offset += _align(length)


def _message_addresses(message: bytes) -> set:
    """IFA_LOCAL (the address itself on a point-to-point link) or else IFA_ADDRESS."""
    family = message[0]
    attributes, offset = {}, _align(IFADDRMSG.size)
    while offset + RTATTR.size <= len(message):
        length, kind = RTATTR.unpack_from(message, offset)
        if length < RTATTR.size:
            break
        attributes[kind] = message[offset + RTATTR.size:offset + length]
        offset += _align(length)
    raw = attributes.get(IFA_LOCAL) or attributes.get(IFA_ADDRESS)
    if raw is None or family not in (socket.AF_INET, socket.AF_INET6):
        return set()
    return {ipaddress.ip_address(raw)}
