from pathlib import Path

import pytest

from nodeagent.cgroups import (CgroupError, Cgroup2Mount, find_cgroup2, find_cgroup2_mount,
                               locate_in_namespace)

HYBRID = """\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 33 0:30 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,name=systemd
"""
UNIFIED = """\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
"""
# A container sees its own cgroup as a non-root bind: not the hierarchy's root.
CONTAINER_AND_HOST = """\
40 33 0:29 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw
41 33 0:29 / /host/sys/fs/cgroup rw - cgroup2 cgroup2 rw
"""
ESCAPED = "50 33 0:29 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n"


@pytest.mark.parametrize("text,expected", [
    (HYBRID, "/sys/fs/cgroup/unified"),
    (UNIFIED, "/sys/fs/cgroup"),
    (CONTAINER_AND_HOST, "/host/sys/fs/cgroup"),
    (ESCAPED, "/mnt/my cgroups"),
    ("25 30 0:23 / /sys rw - sysfs sysfs rw\n", None),
    ("", None),
])
def test_find_cgroup2_mount(text, expected):
    assert find_cgroup2_mount(text) == expected


# containerd on cgroup v2: the container's own cgroup2 mount (its namespace root, "/"), and the
# DaemonSet's hostPath of the node's /sys/fs/cgroup bound over it, three levels above.
PRIVATE_NAMESPACE = """\
700 650 0:29 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw
710 700 0:29 /../../.. /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw,nsdelegate
"""
# Something else mounted over a cgroup2 mount hides it.
HIDDEN = """\
34 33 0:29 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
35 34 0:30 / /sys/fs/cgroup rw - tmpfs tmpfs rw
36 35 0:29 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
"""


def test_a_private_cgroup_namespace_is_read_through_the_nodes_hierarchy():
    found = find_cgroup2(PRIVATE_NAMESPACE)
    assert found == Cgroup2Mount("/sys/fs/cgroup", "/../../..")
    assert found.levels_above_namespace == 3
    assert find_cgroup2_mount(HIDDEN) == "/sys/fs/cgroup/unified"


def _tree(root: Path, path: str, pids: list[int]) -> Path:
    directory = root / path
    directory.mkdir(parents=True)
    (directory / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))
    return directory


def test_own_cgroup_is_found_below_the_namespace_root(tmp_path):
    mine = _tree(tmp_path, "kubepods/burstable/pod1/ctr-a", [4242])
    _tree(tmp_path, "kubepods/burstable/pod2/ctr-b", [99])
    _tree(tmp_path, "kubepods/besteffort/pod3/ctr-c", [])
    # `0::/`: the process is at its namespace's root, four levels below the node's.
    assert locate_in_namespace(tmp_path, 4, "/", 4242) == mine
    # A child group the process moved into, below the namespace root.
    child = _tree(tmp_path, "kubepods/burstable/pod1/ctr-a/proxy", [4343])
    assert locate_in_namespace(tmp_path, 4, "/proxy", 4343) == child
    # No private namespace: the path is the path.
    assert locate_in_namespace(tmp_path, 0, "/kubepods/x", 1) == tmp_path / "kubepods/x"
    with pytest.raises(CgroupError, match="0 groups"):
        locate_in_namespace(tmp_path, 4, "/", 5555)


def test_no_cgroup2_mount_is_a_clear_cli_error_not_a_traceback(monkeypatch):
    import click

    from nodeagent import cgroups, cli

    def nothing_mounted():
        raise CgroupError("no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo)")

    monkeypatch.setattr(cgroups, "cgroup2_root", nothing_mounted)
    with pytest.raises(click.ClickException, match="no cgroup v2 hierarchy.*pass --cgroup"):
        cli._default_pods_cgroup()
