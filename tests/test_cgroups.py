import pytest

from nodeagent.cgroups import find_cgroup2_mount

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
