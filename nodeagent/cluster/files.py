"""The lab's cluster: Kubernetes manifests in a directory, re-read when they change.

Same object model as the API watcher: `poll()` returns a new ClusterView when
any manifest was added, removed or rewritten since the last call.

The agent polls every 0.25 s on its event loop, so an unchanged directory must cost little:
one scandir per directory and one stat per file (pathlib's rglob with three stats per file held
the loop 0.9 ms a poll for 30 files; benchmarks/README.md, "The latency tail").
"""

import os
from pathlib import Path

import yaml

from nodeagent.cluster.model import MESH_LABEL, ClusterView

KINDS = ("pods", "services", "namespaces")


class ManifestDirSource:
    def __init__(self, root: Path, mesh_label: str = MESH_LABEL):
        self.root = root
        self.mesh_label = mesh_label
        self._signature: tuple | None = None

    def _files(self) -> dict[str, list[tuple[str, int, int]]]:
        """Per kind, every *.yaml below its directory (symlinked directories not entered, as
        rglob): (path, mtime_ns, size), sorted by path."""
        return {kind: sorted(_manifests(str(self.root / kind))) for kind in KINDS}

    def close(self) -> None:
        pass

    def problems(self) -> list[str]:
        return []  # files are read whole at every change: never stale

    def poll(self) -> ClusterView | None:
        files = self._files()
        signature = tuple(file for found in files.values() for file in found)
        if signature == self._signature:
            return None
        objects: dict[str, list[dict]] = {kind: [] for kind in KINDS}
        errors = []
        for kind, found in files.items():
            for path, _, _ in found:
                try:
                    loaded = yaml.safe_load(Path(path).read_text())
                except (OSError, yaml.YAMLError) as e:  # removed or half-written: next poll
                    errors.append(f"{path}: {e}")
                    continue
                if isinstance(loaded, dict):
                    objects[kind].append(loaded)
        self._signature = signature
        view = ClusterView(objects["pods"], objects["services"], objects["namespaces"], mesh_label=self.mesh_label)
        view.errors.extend(errors)
        return view


def _manifests(directory: str) -> list[tuple[str, int, int]]:
    found = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return found
    for entry in entries:
        try:
            if entry.is_dir() and not entry.is_symlink():
                found.extend(_manifests(entry.path))
            elif entry.name.endswith(".yaml"):
                stat = entry.stat()
                found.append((entry.path, stat.st_mtime_ns, stat.st_size))
        except OSError:  # removed meanwhile (the next poll sees it gone), or a dangling or looping link
            continue
    return found
