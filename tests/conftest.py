import os

import pytest

# The Kubernetes test cluster's fixtures (tests/k8s/fixtures.py).
pytest_plugins = ["k8s.fixtures"]

IS_ROOT = os.geteuid() == 0


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected what will not run
def pytest_collection_modifyitems(config, items):
    if IS_ROOT:
        if any("privileged" in item.keywords for item in items):
            from nodeagent.lab import lock

            lock.hold()  # one lab per machine: privileged sessions take turns (lab/lock.py)
        return
    skip = pytest.mark.skip(reason="needs root: creates network namespaces, cgroups or BPF programs")
    for item in items:
        if "privileged" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def no_lab_leftovers():
    """Whatever a test does or however it fails, the session leaves no lab behind."""
    yield
    from nodeagent.lab import lab, lock

    if IS_ROOT and lock.held():  # only sessions that ran privileged tests made a lab
        lab.down()


def lab_fixture(nodes: int = 2, pods_per_node: int = 5, mesh: str = "none", agent_args: tuple = ()):
    """A module-scoped lab for a test module: up before its first test, down after its last
    (`agent_args`: added to every agent's command line, e.g. a setting the module depends on)."""

    @pytest.fixture(scope="module")
    def lab():
        from nodeagent.lab import lab as lab_ops

        lab_ops.down()
        saved = lab_ops.AGENT_EXTRA_ARGS
        lab_ops.AGENT_EXTRA_ARGS = [*saved, *agent_args]
        try:
            created = lab_ops.up(nodes=nodes, pods_per_node=pods_per_node, mesh=mesh)
            yield created
        finally:
            lab_ops.AGENT_EXTRA_ARGS = saved
            lab_ops.down()

    return lab


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed lab test carries the tail of each lab agent's log (the lab and its logs are gone
    by the time anyone reads the report)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "privileged" in item.keywords:
        from nodeagent.lab.lab import STATE_DIR

        for log in sorted((STATE_DIR / "logs").glob("agent-*.log")):
            lines = log.read_text(errors="replace").splitlines()[-40:]
            report.sections.append((f"lab {log.stem} (last 40 lines)", "\n".join(lines)))
