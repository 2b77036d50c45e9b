"""Images for the test node, made here (no image registry is reachable) and imported into its
containerd: the pause image (tests/k8s/pause.c, static), and the agent's image: the base
made by scripts/k8s-image.sh (Debian 12, bcc, a venv with the dependencies) plus a layer with
this checkout's source, so the DaemonSet runs the code under test.

Docker image archives (manifest.json, config, uncompressed layers), which `ctr images import`
reads."""

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

from k8s.cluster import REPO, TOOLS

PAUSE_IMAGE = "nodeagent.test/pause:1"
AGENT_IMAGE = "nodeagent.test/nodeagent:test"
APP_IMAGE = AGENT_IMAGE  # test pods run the same image (python3 for servers and clients)
SOURCE = ("nodeagent", "bpf", "pyproject.toml", "README.md")
SITE_PACKAGES = "opt/venv/lib/python3.11/site-packages"


def base_image() -> Path:
    subprocess.run(["bash", str(REPO / "scripts" / "k8s-image.sh")], check=True)
    (found,) = sorted((TOOLS / "image").glob("base-*.tar"))
    return found


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    archive.addfile(info, io.BytesIO(data))


def write_archive(out: Path, tag: str, layers: list[Path], entrypoint: list[str], env: list[str]) -> Path:
    diff_ids = [_digest(layer) for layer in layers]
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Entrypoint": entrypoint, "Env": env},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    with tarfile.open(out, "w") as archive:
        _add_bytes(archive, config_name, config)
        names = []
        for layer, digest in zip(layers, diff_ids):
            name = f"{digest.split(':')[1]}/layer.tar"
            archive.add(layer, name)
            names.append(name)
        _add_bytes(archive, "manifest.json", json.dumps(
            [{"Config": config_name, "RepoTags": [tag], "Layers": names}]).encode())
    return out


def pause_archive(work: Path) -> Path:
    binary = work / "pause"
    subprocess.run(["gcc", "-static", "-Os", "-s", "-o", str(binary), str(Path(__file__).with_name("pause.c"))],
                   check=True)
    layer = work / "pause-layer.tar"
    with tarfile.open(layer, "w") as archive:
        archive.add(binary, "pause")
    return write_archive(work / "pause.tar", PAUSE_IMAGE, [layer], ["/pause"], [])


def agent_archive(work: Path) -> Path:
    """The base, and this checkout's source on top (as deploy/Dockerfile installs it)."""
    layer = work / "source-layer.tar"
    with tarfile.open(layer, "w") as archive:
        for name in SOURCE:
            archive.add(REPO / name, f"opt/nodeagent/{name}",
                        filter=lambda info: None if "__pycache__" in info.name else info)
        _add_bytes(archive, f"{SITE_PACKAGES}/nodeagent-source.pth", b"/opt/nodeagent\n")
        _add_bytes(archive, "opt/venv/bin/nodeagent",
                   b"#!/opt/venv/bin/python\nimport sys\nfrom nodeagent.cli import main\nsys.exit(main())\n", 0o755)
    return write_archive(work / "agent.tar", AGENT_IMAGE, [base_image(), layer], ["/opt/venv/bin/nodeagent"],
                         ["PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin", "NODEAGENT_BPF_SRC=/opt/nodeagent/bpf"])
