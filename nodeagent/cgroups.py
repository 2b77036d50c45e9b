"""cgroup v2: find the unified hierarchy, place processes, remove subtrees.

Real nodes mount cgroup2 at /sys/fs/cgroup; hybrid hosts at
/sys/fs/cgroup/unified. Read the mount table rather than assume either. In a
container with a private cgroup namespace, the node's hierarchy (a hostPath
mount) sits above the namespace's root: own_cgroup() finds where we are in it.
"""

import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path


class CgroupError(RuntimeError):
    pass


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    return field.encode().decode("unicode_escape")


@dataclass(frozen=True)
class Cgroup2Mount:
    point: str  # where it is mounted
    root: str  # the mounted directory, relative to the reader's cgroup namespace root

    @property
    def levels_above_namespace(self) -> int:
        """In a private cgroup namespace (containerd, CRI-O on cgroup v2), a hostPath mount of the
        node's hierarchy shows its root as `/../../..`: that many levels above our namespace's root."""
        return sum(1 for part in self.root.split("/") if part == "..")


def find_cgroup2(mountinfo: str) -> Cgroup2Mount | None:
    """The visible cgroup2 mount of the hierarchy's top, from mountinfo text.

    A later mount on the same point hides the earlier one (a container's own /sys/fs/cgroup under
    the node's, bound over it). Of the visible ones, the one reaching highest wins: `/..`
    components (a private cgroup namespace looking at the node's root) over `/`, and a plain
    path (a bind of some sub-group) never."""
    visible: dict[str, str] = {}
    for line in mountinfo.splitlines():
        fields, sep, fs = line.partition(" - ")
        parts = fields.split(" ")
        if not sep or len(parts) < 5:
            continue
        mount_point = _unescape(parts[4])
        if fs.split(" ", 1)[0] == "cgroup2":
            visible[mount_point] = _unescape(parts[3])
        else:
            visible.pop(mount_point, None)  # something else mounted over it
    candidates = [Cgroup2Mount(point, root) for point, root in visible.items()
                  if root == "/" or all(part == ".." for part in root.strip("/").split("/"))]
    if not candidates:
        return None
    highest = max(c.levels_above_namespace for c in candidates)
    candidates = [c for c in candidates if c.levels_above_namespace == highest]
    return next((c for c in candidates if c.point == "/sys/fs/cgroup"), candidates[0])


def find_cgroup2_mount(mountinfo: str) -> str | None:
    """The mount point of the cgroup2 hierarchy's root, from mountinfo text."""
    found = find_cgroup2(mountinfo)
    return found.point if found else None


def _mount() -> Cgroup2Mount:
    with open("/proc/self/mountinfo") as f:
        found = find_cgroup2(f.read())
    if found is None:
        raise CgroupError("no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo)")
    return found


def cgroup2_root() -> Path:
    return Path(_mount().point)


def own_cgroup(pid: str = "self") -> Path:
    """The cgroup v2 directory a process is in, as a path under the mounted hierarchy.

    /proc/<pid>/cgroup ("0::<path>") is relative to the reader's cgroup namespace; in a private
    one it reads `0::/` while the process sits deep in the node's tree. Then the namespace root
    is found by looking, at the depth the mount's root says, for the group that holds the pid."""
    with open(f"/proc/{pid}/cgroup") as f:
        relative = next((line[3:].strip() for line in f if line.startswith("0::")), None)
    if relative is None:
        raise CgroupError(f"process {pid} is in no cgroup v2 group")
    mount = _mount()
    return locate_in_namespace(Path(mount.point), mount.levels_above_namespace, relative,
                               os.getpid() if pid == "self" else int(pid))


def locate_in_namespace(mount_point: Path, levels: int, relative: str, pid: int) -> Path:
    """`relative` (a /proc/<pid>/cgroup path) under the mount, when the namespace root is
    `levels` below the mount's root (0: the same)."""
    relative = relative.lstrip("/")
    if levels == 0:
        return mount_point / relative
    found = []
    for directory in _directories_at(mount_point, levels):
        candidate = directory / relative if relative else directory
        if pid in _procs(candidate):
            found.append(candidate)
    if len(found) != 1:
        raise CgroupError(f"cannot place process {pid} in {mount_point}: its cgroup namespace root is "
                          f"{levels} levels down, and {len(found)} groups there hold it")
    return found[0]


def _directories_at(root: Path, depth: int) -> list[Path]:
    level = [root]
    for _ in range(depth):
        following = []
        for directory in level:
            try:
                following += [Path(e.path) for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
        level = following
    return level


def _procs(cgroup_dir: Path) -> set[int]:
    try:
        return {int(line) for line in (cgroup_dir / "cgroup.procs").read_text().split()}
    except OSError:
        return set()


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
