"""The lab's manifest directory (cluster/files.py): a view when a manifest is added, rewritten or
removed, at any depth; none while nothing changed; symlinked directories are not entered."""

import os

import yaml

from nodeagent.cluster.files import ManifestDirSource


def pod(name: str, ip: str) -> dict:
    return {"metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}", "labels": {"app": name}},
            "spec": {"nodeName": "node0", "containers": [{}]}, "status": {"phase": "Running", "podIP": ip}}


def test_a_view_for_each_change_and_none_while_nothing_changes(tmp_path):
    (tmp_path / "pods" / "deeper").mkdir(parents=True)
    source = ManifestDirSource(tmp_path)
    first = tmp_path / "pods" / "a.yaml"
    first.write_text(yaml.safe_dump(pod("a", "10.0.0.1")))
    assert set(source.poll().pods) == {"default/a"}
    assert source.poll() is None
    (tmp_path / "pods" / "deeper" / "b.yaml").write_text(yaml.safe_dump(pod("b", "10.0.0.2")))
    (tmp_path / "pods" / "notes.txt").write_text("not a manifest")
    assert set(source.poll().pods) == {"default/a", "default/b"}
    first.write_text(yaml.safe_dump(pod("a", "10.0.0.9")))
    os.utime(first, ns=(1, 1))  # a rewrite within the same mtime tick is told by its time
    assert source.poll().pods["default/a"].ip == "10.0.0.9"
    first.unlink()
    assert set(source.poll().pods) == {"default/b"}
    assert source.poll() is None


def test_symlinked_directories_are_not_entered_and_a_missing_kind_is_empty(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "c.yaml").write_text(yaml.safe_dump(pod("c", "10.0.0.3")))
    (tmp_path / "pods").mkdir()
    (tmp_path / "pods" / "link").symlink_to(elsewhere)
    view = ManifestDirSource(tmp_path).poll()  # no services/ or namespaces/ directory at all
    assert view.pods == {}
