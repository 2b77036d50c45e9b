import os

import pytest

IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config, items):
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root: creates network namespaces, cgroups or BPF programs")
    for item in items:
        if "privileged" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def no_lab_leftovers():
    """Whatever a test does or however it fails, the session leaves no lab behind."""
    yield
    if IS_ROOT:
        from nodeagent.lab import lab

        lab.down()
