"""The lab's cluster: Kubernetes manifests in a directory, re-read when they change.

Same object model as the API watcher: `poll()` returns a new ClusterView when
any manifest was added, removed or rewritten since the last call.
"""

from pathlib import Path

import yaml

from nodeagent.cluster.model import MESH_LABEL, ClusterView

KINDS = ("pods", "services", "namespaces")


class ManifestDirSource:
    def __init__(self, root: Path, mesh_label: str = MESH_LABEL):
        self.root = root
        self.mesh_label = mesh_label
        self._signature: tuple | None = None

    def _files(self) -> dict[str, list[Path]]:
        return {kind: sorted((self.root / kind).rglob("*.yaml")) if (self.root / kind).exists() else []
                for kind in KINDS}

    def close(self) -> None:
        pass

    def problems(self) -> list[str]:
        return []  # files are read whole at every change: never stale

    def poll(self) -> ClusterView | None:
        files = self._files()
        signature = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size)
                          for paths in files.values() for p in paths if p.exists())
        if signature == self._signature:
            return None
        objects: dict[str, list[dict]] = {kind: [] for kind in KINDS}
        errors = []
        for kind, paths in files.items():
            for path in paths:
                try:
                    loaded = yaml.safe_load(path.read_text())
                except (OSError, yaml.YAMLError) as e:  # removed or half-written: next poll
                    errors.append(f"{path}: {e}")
                    continue
                if isinstance(loaded, dict):
                    objects[kind].append(loaded)
        self._signature = signature
        view = ClusterView(objects["pods"], objects["services"], objects["namespaces"], mesh_label=self.mesh_label)
        view.errors.extend(errors)
        return view
