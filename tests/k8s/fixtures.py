"""pytest fixtures for the test cluster (tests/k8s/cluster.py): one control plane per test
session, brought up on first use and removed at the session's end, however it ends.

Without the built components (`make k8s-tools`), tests that need the cluster are skipped,
except under CI, where that is a failure: `make test` builds them first."""

import os
import signal

import pytest

from k8s import cluster


@pytest.fixture(scope="session")
def kube():
    missing = cluster.missing_binaries()
    if missing:
        message = f"the test cluster needs {', '.join(missing)}: run `make k8s-tools`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    if os.geteuid() == 0:  # on the Service address, where the test node's pods reach it
        from k8s import node

        plane = cluster.up(address=node.API_IP, port=node.API_PORT)
    else:
        plane = cluster.up()
    # SIGTERM (a `timeout`, a CI runner) would end pytest without teardown: make it an
    # interrupt, which pytest answers by running the finalizers.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield plane
    finally:
        signal.signal(signal.SIGTERM, previous)
        cluster.down(plane.state)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
