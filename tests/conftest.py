import fcntl
import os
import sys

import pytest

# The Kubernetes test cluster's fixtures (tests/k8s/fixtures.py).
pytest_plugins = ["k8s.fixtures"]

IS_ROOT = os.geteuid() == 0
# One lab per machine (fixed namespace, cgroup and pin names): privileged test sessions
# take turns. Held until the session's process exits.
LAB_LOCK = "/run/nodeagent-lab.lock"
_lock_fd = None


def _take_lab_lock() -> None:
    global _lock_fd
    if _lock_fd is not None:
        return
    _lock_fd = os.open(LAB_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(_lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"waiting for {LAB_LOCK}: another privileged test session is running", file=sys.stderr)
        fcntl.flock(_lock_fd, fcntl.LOCK_EX)


def pytest_collection_modifyitems(config, items):
    if IS_ROOT:
        if any("privileged" in item.keywords for item in items):
            _take_lab_lock()
        return
    skip = pytest.mark.skip(reason="needs root: creates network namespaces, cgroups or BPF programs")
    for item in items:
        if "privileged" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def no_lab_leftovers():
    """Whatever a test does or however it fails, the session leaves no lab behind."""
    yield
    if _lock_fd is not None:  # only a session holding the lab lock may have made a lab: others leave it be
        from nodeagent.lab import lab

        lab.down()


def lab_fixture(nodes: int = 2, pods_per_node: int = 5, mesh: str = "none"):
    """A module-scoped lab for a test module: up before its first test, down after its last."""

    @pytest.fixture(scope="module")
    def lab():
        from nodeagent.lab import lab as lab_ops

        lab_ops.down()
        created = lab_ops.up(nodes=nodes, pods_per_node=pods_per_node, mesh=mesh)
        yield created
        lab_ops.down()

    return lab
