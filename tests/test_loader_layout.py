"""The `layout` map across a load that dies halfway: bcc pins the maps (a new `layout` map holds
0) while it compiles, before the loader writes the layout; the program pins are replaced one by
one. A load that died between must neither block every later start nor leave a half-replaced
set of programs that a restart adopts as its own build. Real pins and a real cgroup, no lab."""

import os
from pathlib import Path

import pytest

from nodeagent import cgroups
from nodeagent.datapath import abi, cleanup, libbpf, loader
from nodeagent.datapath.pins import PinLayout

pytestmark = pytest.mark.privileged
NODE = "node0"


@pytest.fixture
def node():
    """(a pin layout on its own root, an empty cgroup), both removed after the test."""
    name = f"nodeagent-test-layout-{os.getpid()}"
    root, cgroup = Path("/sys/fs/bpf") / name, cgroups.cgroup2_root() / name
    cgroup.mkdir()
    try:
        yield PinLayout(root, NODE), cgroup
    finally:
        cleanup.remove_all(root)
        cgroup.rmdir()


def pinned(layout: PinLayout) -> abi.Pins:
    fd = libbpf.obj_get(str(layout.map("layout")))
    try:
        return abi.Pins.from_buffer_copy(libbpf.map_lookup(fd, abi.u32(0), 16))
    finally:
        os.close(fd)


def zero_layout(layout: PinLayout) -> None:
    """What a load that died inside bcc (maps pinned, layout not written yet) leaves."""
    fd = libbpf.obj_get(str(layout.map("layout")))
    try:
        libbpf.map_update(fd, abi.u32(0), bytes(abi.Pins()))
    finally:
        os.close(fd)


def test_a_load_that_dies_while_replacing_programs_leaves_them_unknown_not_adopted(node, monkeypatch):
    layout, cgroup = node
    replace, replaced = loader._replace_pin, []

    def dies_after_one(fd, path):
        if replaced:
            raise OSError("killed")
        replaced.append(path)
        replace(fd, path)

    monkeypatch.setattr(loader, "_replace_pin", dies_after_one)
    with pytest.raises(OSError, match="killed"):
        loader.load(layout, cgroup)
    monkeypatch.undo()
    pins = pinned(layout)
    assert (pins.layout_version, pins.programs_digest) == (abi.LAYOUT_VERSION, 0)  # known layout, unknown build
    report = loader.load_in_subprocess(NODE, cgroup, layout.root)
    assert report["compiled"] is True
    assert pinned(layout).programs_digest == loader.programs_digest(layout)


def test_layout_0_with_nothing_enrolled_is_loaded_again_and_with_an_entry_is_refused(node):
    layout, cgroup = node
    loader.load_in_subprocess(NODE, cgroup, layout.root)
    zero_layout(layout)
    assert loader.load_in_subprocess(NODE, cgroup, layout.root)["compiled"] is True
    assert pinned(layout).layout_version == abi.LAYOUT_VERSION
    fd = libbpf.obj_get(str(layout.map("pods_by_netns")))
    try:
        libbpf.map_update(fd, abi.u64(1), bytes(abi.Pod(pod_ip=0x0100000a, slot=3)))
    finally:
        os.close(fd)
    zero_layout(layout)  # now the maps hold something another layout may have written
    with pytest.raises(loader.LoadError, match="has layout 0"):
        loader.load_in_subprocess(NODE, cgroup, layout.root)


def test_scratch_pins_of_dead_compile_checks_are_swept(tmp_path):
    """`loader --check` pins into a scratch directory it removes in a `finally`; one killed
    before that left its pins for good. Each names its pid now, and the next check sweeps the dead."""
    import os

    from nodeagent.datapath import loader

    dead, alive, unnamed = (tmp_path / f"{loader.CHECK_PREFIX}{name}" for name in
                            ("999999999-abc", f"{os.getpid()}-def", "e693126g"))
    for scratch in (dead, alive, unnamed):
        (scratch / "check" / "maps").mkdir(parents=True)
    loader._sweep_dead_checks(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name]
