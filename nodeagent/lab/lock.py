"""One lab per machine: its namespaces, cgroups and pins have fixed names. Whoever brings a lab
up or down holds this lock first, and a test session holds it for its whole run, so a second
session (or a `nodeagent lab down` typed meanwhile) waits instead of tearing the first one's
lab away. Held by the process until it exits; a process whose ancestor holds it (a test that
runs `nodeagent lab up`, or `flock /run/nodeagent-lab.lock make bench`) works under that one."""

import fcntl
import os
import sys

LOCK_PATH = os.environ.get("NODEAGENT_LAB_LOCK", "/run/nodeagent-lab.lock")
_fd: int | None = None


def _holders(path: str) -> set[int]:
    """PIDs holding (not waiting for) a flock on `path`, from /proc/locks."""
    try:
        inode = os.stat(path).st_ino
        with open("/proc/locks") as locks:
            lines = locks.read().splitlines()
    except OSError:
        return set()
    holders = set()
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
            holders.add(int(fields[4]))
    return holders


def _ancestors() -> set[int]:
    pids, pid = set(), os.getppid()
    while pid > 1:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as stat:
                pid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
    return pids


def _inherited() -> int | None:
    """An fd on the lock that this process inherited already locked (`flock LOCK cmd` passes its
    locked fd to cmd): the lock is this process's too."""
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for name in fds:
        try:
            if os.readlink(f"/proc/self/fd/{name}") != os.path.realpath(LOCK_PATH):
                continue
            fcntl.flock(int(name), fcntl.LOCK_EX | fcntl.LOCK_NB)  # succeeds only on the holding description
            return int(name)
        except OSError:
            continue
    return None


def hold() -> None:
    """Take the machine's lab lock for this process (once; waits for another holder to finish)."""
    global _fd
    if _fd is not None:
        return
    inherited = _inherited()
    if inherited is not None:
        _fd = inherited
        return
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if _holders(LOCK_PATH) & _ancestors():
            os.close(fd)
            return  # an ancestor holds it for us
        print(f"waiting for {LOCK_PATH}: another lab user (a test session?) is running", file=sys.stderr)
        fcntl.flock(fd, fcntl.LOCK_EX)
    _fd = fd


def held() -> bool:
    """Whether this process took the lock itself (not through an ancestor)."""
    return _fd is not None
