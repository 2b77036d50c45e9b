"""Remove a node's data path: detach every link, unpin every object."""

import ctypes
import os
import shutil
from pathlib import Path

from nodeagent.datapath import abi, libbpf
from nodeagent.datapath.pins import PinLayout
from nodeagent.datapath.programs import LOOPBACK_MAP, SKB_MAP


def detach_link(path: Path) -> None:
    fd = libbpf.obj_get(str(path))
    try:
        libbpf.link_detach(fd)
    except libbpf.BpfError:
        pass  # defunct already: its cgroup or network namespace is gone
    finally:
        os.close(fd)
    path.unlink()


def empty_sockhash(path: Path, key_size: int) -> None:
    """Sockets in a sockhash hold its programs (their psocks do) and the programs hold the map:
    nothing would be freed while a socket stays in. Emptying it ends that, and the sockets go
    on as plain TCP."""
    if not path.exists():
        return
    fd = libbpf.obj_get(str(path))
    try:
        for key in list(libbpf.map_keys(fd, key_size)):
            libbpf.map_delete(fd, key)
    finally:
        os.close(fd)


def remove_node(layout: PinLayout) -> list[str]:
    """Links first (that is what detaches), then programs and maps; returns what was removed."""
    removed = []
    if layout.links.exists():
        for path in sorted(p for p in layout.links.rglob("*") if p.is_file()):
            detach_link(path)
            removed.append(str(path))
    empty_sockhash(layout.map(LOOPBACK_MAP), ctypes.sizeof(abi.SockKey))
    empty_sockhash(layout.map(SKB_MAP), 8)  # keyed by socket cookie
    if layout.node_dir.exists():
        removed += [str(p) for p in layout.node_dir.rglob("*") if not p.is_dir()]
        shutil.rmtree(layout.node_dir)  # unlinking a pin drops its reference
    return removed


def remove_all(root: Path) -> list[str]:
    removed = []
    if root.exists():
        for node_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            removed += remove_node(PinLayout(root, node_dir.name))
        shutil.rmtree(root, ignore_errors=True)
    return removed
