"""`nodeagent lab upgrade`: a node's agent handed over to a new one, as a DaemonSet with
`maxSurge: 1, maxUnavailable: 0` does it.

The new agent starts beside the old (same cgroup, same pins; the admin port is a reuseport group
of both while they overlap), adopts the pinned data path and opens its listeners in every pod:
it joins each listener's reuseport group and takes sk_lookup's entry, so from then on the kernel
gives it new connections too. Once it is ready the old agent gets SIGTERM and drains (its
queued connections move to the new listeners as it closes its own: tcp_migrate_req). Nothing
is refused or reset on the way (tests/test_upgrade_lab.py).
"""

import json
import os
import signal
import time
import urllib.request
from dataclasses import asdict, dataclass

from nodeagent import cgroups
from nodeagent.lab import lab as lab_ops
from nodeagent.lab import lock
from nodeagent.lab.plan import NodePlan

READY_TIMEOUT_S = 120.0  # the new agent compiles the data path first
POLL_S = 0.05


class UpgradeError(lab_ops.LabError):
    pass


@dataclass(frozen=True)
class Upgraded:
    node: str
    old_pid: int
    new_pid: int
    ready_s: float  # from the new agent's start to its readiness (the overlap's start)
    sigterm_at: float  # time.monotonic() when the old agent was told to drain
    drain_s: float | None  # from SIGTERM to the old agent's exit; None if not waited for


def agent_pids(lab, name: str) -> list[int]:
    """The main processes of the agents in `name`'s cgroup (workers are their children)."""
    pids = cgroups.pids_in(lab_ops.agent_cgroup(lab, name))
    return [pid for pid in pids if _parent(pid) not in pids]


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def ready_as(admin_port: int, pid: int) -> bool:
    """The agent `pid` answered ready (the admin port is shared while two agents overlap)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats", timeout=2) as response:
            stats = json.load(response)
    except OSError:
        return False
    return stats["workers"][0] == pid and stats["ready"]


def upgrade(lab, node: NodePlan, wait_s: float | None = None) -> Upgraded:
    """Hand `node`'s agent over to a new one; wait up to `wait_s` for the old one to drain
    (None: its own deadline, --drain-timeout)."""
    lock.hold()
    (old,) = agent_pids(lab, node.name) or [None]
    if old is None:
        raise UpgradeError(f"no agent runs on {node.name}")
    started = time.monotonic()
    new = lab_ops.start_agent(lab, node).pid
    while not ready_as(node.admin_port, new):
        if _gone(new):
            raise UpgradeError(f"the new agent of {node.name} exited (log: {lab_ops.STATE_DIR / 'logs'})")
        if time.monotonic() - started > READY_TIMEOUT_S:
            os.kill(new, signal.SIGKILL)
            raise UpgradeError(f"the new agent of {node.name} was not ready after {READY_TIMEOUT_S:.0f} s; "
                               f"the old one keeps serving")
        time.sleep(POLL_S)
    ready_s = time.monotonic() - started
    os.kill(old, signal.SIGTERM)
    stopping = time.monotonic()
    while not _gone(old):
        if wait_s is not None and time.monotonic() - stopping > wait_s:
            return Upgraded(node.name, old, new, round(ready_s, 2), stopping, None)
        time.sleep(POLL_S)
    return Upgraded(node.name, old, new, round(ready_s, 2), stopping, round(time.monotonic() - stopping, 2))


def upgrade_all(lab, names: list[str] | None = None, wait_s: float | None = None) -> list[dict]:
    """One node after the other, each old agent drained before the next node's upgrade."""
    if lab.mesh != "node":
        raise UpgradeError(f"the lab runs mesh {lab.mesh!r}: only node agents are upgraded")
    nodes = [n for n in lab.plan.nodes if names is None or n.name in names]
    return [asdict(upgrade(lab, node, wait_s)) for node in nodes]
