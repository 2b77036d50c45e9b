"""One lab per machine: its namespaces, cgroups and pins have fixed names. Whoever brings a lab
up or down holds this lock first, and a test session holds it for its whole run, so a second
session (or a `nodeagent lab down` typed meanwhile) waits instead of tearing the first one's
lab away. Held by the process until it exits."""

import fcntl
import os
import sys

LOCK_PATH = os.environ.get("NODEAGENT_LAB_LOCK", "/run/nodeagent-lab.lock")
_fd: int | None = None


HELD_BY_PARENT = "NODEAGENT_LAB_LOCK_HELD"  # set for children: their parent holds the lock for them


def hold() -> None:
    """Take the machine's lab lock for this process (once; waits for another holder to finish).
    A child of a holder (a test running `nodeagent lab up`) works under its parent's lock."""
    global _fd
    if _fd is not None or os.environ.get(HELD_BY_PARENT):
        return
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"waiting for {LOCK_PATH}: another lab user (a test session?) is running", file=sys.stderr)
        fcntl.flock(fd, fcntl.LOCK_EX)
    _fd = fd
    os.environ[HELD_BY_PARENT] = str(os.getpid())


def held() -> bool:
    """Whether this process took the lock itself (not through a parent)."""
    return _fd is not None
