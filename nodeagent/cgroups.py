"""cgroup v2: find the unified hierarchy, place processes, remove subtrees.

Real nodes mount cgroup2 at /sys/fs/cgroup; hybrid hosts at
/sys/fs/cgroup/unified. Read the mount table rather than assume either.
"""

import errno
import os
import signal
import time
from pathlib import Path


class CgroupError(RuntimeError):
    pass


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    return field.encode().decode("unicode_escape")


def find_cgroup2_mount(mountinfo: str) -> str | None:
    """The mount point of the cgroup2 hierarchy's root, from mountinfo text."""
    candidates = []
    for line in mountinfo.splitlines():
        fields, sep, fs = line.partition(" - ")
        if not sep or fs.split(" ", 1)[0] != "cgroup2":
            continue
        parts = fields.split(" ")
        root, mount_point = parts[3], _unescape(parts[4])
        if root == "/":
            candidates.append(mount_point)
    if "/sys/fs/cgroup" in candidates:
        return "/sys/fs/cgroup"
    return candidates[0] if candidates else None


def cgroup2_root() -> Path:
    with open("/proc/self/mountinfo") as f:
        mount = find_cgroup2_mount(f.read())
    if mount is None:
        raise CgroupError("no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo)")
    return Path(mount)


def own_cgroup(pid: str = "self") -> Path:
    """The cgroup v2 directory a process is in ("0::<path>" in /proc/<pid>/cgroup)."""
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return cgroup2_root() / line[3:].strip().lstrip("/")
    raise CgroupError(f"process {pid} is in no cgroup v2 group")


def join(cgroup_dir: Path, pid: int = 0) -> None:
    """Move `pid` (0: the caller) into `cgroup_dir`."""
    (cgroup_dir / "cgroup.procs").write_text(f"{pid}\n")


def pids_in(cgroup_dir: Path) -> list[int]:
    pids = []
    for path in [cgroup_dir, *sorted(p for p in cgroup_dir.rglob("*") if p.is_dir())]:
        try:
            pids += [int(line) for line in (path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            continue
    return pids


def kill_all(cgroup_dir: Path, deadline_s: float = 5.0) -> None:
    """SIGKILL every process in the subtree and wait until it is empty."""
    kill_file = cgroup_dir / "cgroup.kill"
    end = time.monotonic() + deadline_s
    while True:
        pids = pids_in(cgroup_dir)
        if not pids:
            return
        if kill_file.exists():
            kill_file.write_text("1\n")
        else:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if time.monotonic() > end:
            raise CgroupError(f"processes {pids} in {cgroup_dir} did not die")
        time.sleep(0.02)


def remove_tree(cgroup_dir: Path) -> None:
    """Kill what runs in the subtree, then remove its directories bottom-up."""
    if not cgroup_dir.exists():
        return
    kill_all(cgroup_dir)
    dirs = sorted((p for p in cgroup_dir.rglob("*") if p.is_dir()), key=lambda p: len(p.parts))
    for path in [*reversed(dirs), cgroup_dir]:
        for _ in range(50):
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as e:
                # A killed process leaves its cgroup a moment after it dies.
                if e.errno != errno.EBUSY:
                    raise
                time.sleep(0.02)
        else:
            raise CgroupError(f"cannot remove {path}: still busy")
