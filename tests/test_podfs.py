"""Finding a pod's cgroup and network namespace from its UID, in trees laid out as real nodes lay them out."""

import ipaddress
import os
from pathlib import Path

import pytest

from nodeagent import cgroups
from nodeagent.cluster import podfs

UID = "7f3c1c2e-1b2a-4c5d-8e9f-0a1b2c3d4e5f"
UNDERSCORED = UID.replace("-", "_")
CONTAINER = "3b1f9c" + "0" * 58

LAYOUTS = {
    "containerd, systemd driver": (
        f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UNDERSCORED}.slice",
        f"cri-containerd-{CONTAINER}.scope"),
    "containerd, systemd driver, guaranteed": (
        f"kubepods.slice/kubepods-pod{UNDERSCORED}.slice", f"cri-containerd-{CONTAINER}.scope"),
    "CRI-O, systemd driver, burstable": (
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UNDERSCORED}.slice",
        f"crio-{CONTAINER}.scope"),
    "containerd or CRI-O, cgroupfs driver": (f"kubepods/besteffort/pod{UID}", CONTAINER),
    "cgroupfs driver, guaranteed": (f"kubepods/pod{UID}", CONTAINER),
}


def make_pod(root: Path, pod_dir: str, container: str, pid: int) -> Path:
    pod = root / pod_dir
    (pod / container).mkdir(parents=True)
    (pod / "cgroup.procs").write_text("")
    (pod / container / "cgroup.procs").write_text(f"{pid}\n")
    # Another pod beside it, so that the search has to tell them apart.
    other = root / pod_dir.replace(UID, "00000000-0000-0000-0000-000000000000").replace(
        UNDERSCORED, "00000000_0000_0000_0000_000000000000")
    other.mkdir(parents=True, exist_ok=True)
    return pod


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_the_pod_cgroup_is_found_by_uid(tmp_path, layout):
    pod_dir, container = LAYOUTS[layout]
    pod = make_pod(tmp_path, pod_dir, container, os.getpid())
    assert podfs.find_pod_cgroup(tmp_path, UID) == pod
    assert cgroups.pids_in(pod) == [os.getpid()]


def test_the_netns_is_opened_from_a_live_process_of_the_pod(tmp_path):
    pod_dir, container = LAYOUTS["containerd, systemd driver"]
    pod = make_pod(tmp_path, pod_dir, container, os.getpid())
    fd = podfs.open_pod_netns(pod, "127.0.0.1")  # an address this process's namespace holds
    try:
        assert os.fstat(fd).st_ino == os.stat("/proc/self/ns/net").st_ino
    finally:
        os.close(fd)


def test_a_namespace_without_the_pods_ip_is_never_the_pods(tmp_path):
    pod_dir, container = LAYOUTS["CRI-O, systemd driver, burstable"]
    pod = make_pod(tmp_path, pod_dir, container, os.getpid())
    assert podfs.open_pod_netns(pod, "192.0.2.254") is None  # TEST-NET-1: held by no namespace here


def test_the_addresses_of_a_namespace_include_loopbacks():
    held = podfs.addresses("/proc/self/ns/net")
    assert ipaddress.ip_address("127.0.0.1") in held
    assert all(a.version in (4, 6) for a in held)


def test_a_container_restart_is_followed_through_its_new_process(tmp_path):
    pod_dir, container = LAYOUTS["containerd or CRI-O, cgroupfs driver"]
    pod = make_pod(tmp_path, pod_dir, container, 2 ** 22 + 7)  # a pid that no longer exists (the old container)
    assert podfs.open_pod_netns(pod, "127.0.0.1") is None
    (pod / container / "cgroup.procs").write_text(f"{os.getpid()}\n")  # the restarted container
    fd = podfs.open_pod_netns(pod, "127.0.0.1")
    assert fd is not None
    os.close(fd)


def test_a_deleted_or_unknown_pod_is_not_found(tmp_path):
    pod_dir, container = LAYOUTS["containerd, systemd driver"]
    make_pod(tmp_path, pod_dir, container, os.getpid())
    assert podfs.find_pod_cgroup(tmp_path, "11111111-2222-3333-4444-555555555555") is None
    assert podfs.find_pod_cgroup(tmp_path / "missing", UID) is None
