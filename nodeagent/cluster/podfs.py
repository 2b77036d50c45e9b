"""Find a pod's cgroup and network namespace on the node from its UID.

kubelet names a pod's cgroup after its UID: cgroupfs driver `pod<uid>`,
systemd driver `kubepods-<qos>-pod<uid with _ for ->.slice` (containerd and
CRI-O alike). A process of the pod (any container's, or the pause one) gives
the namespace: /proc/<pid>/ns/net.
"""

import os
from pathlib import Path

from nodeagent import cgroups


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


def open_pod_netns(pod_cgroup: Path) -> int | None:
    """An fd on the pod's network namespace (kept alive while the fd is open), or None."""
    for pid in cgroups.pids_in(pod_cgroup):
        try:
            return os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        except OSError:
            continue  # exited meanwhile: try the next process
    return None
