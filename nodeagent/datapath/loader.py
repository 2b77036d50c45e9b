"""Compile bpf/datapath.c with bcc, pin the programs, attach or adopt the links.

Run as a short-lived process (`python -m nodeagent.datapath.loader`) so that
bcc's ~60-135 MB never stay in the agent: everything it leaves behind is
pinned on bpffs, and the agent works on the pins through libbpf.

A second run on the same node adopts what the first left (cleanly stopped or
killed): the pinned maps keep their contents, and each pinned link gets the
new program through bpf_link_update, so nothing is ever attached twice and
enrolled pods are never without a program, not even for a moment. When the
pinned programs were built from the same source, flags and kernel (the
digest in the `layout` map), nothing is compiled: they are adopted as they
are, so an agent restarted after a crash serves again in well under a second.
"""

import argparse
import ctypes
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from nodeagent.datapath import abi, libbpf
from nodeagent.datapath.cleanup import detach_link
from nodeagent.datapath.pins import DEFAULT_ROOT, PinLayout
from nodeagent.ports import INBOUND_PORT, MESH_PORT
from nodeagent.datapath.programs import (CGROUP_PROGRAMS, PROGRAMS, SK_LOOKUP, SOCKHASH_OF, SOCKHASH_PROGRAMS,
                                        SOCKOPS_PROXY, Program)

BPF_SRC_DIR = Path(os.environ.get("NODEAGENT_BPF_SRC", Path(__file__).resolve().parents[2] / "bpf"))
DEFAULT_MESH_PORT = MESH_PORT
DEFAULT_FAST_PATHS = 0  # off: see benchmarks/README.md, "Kernel fast paths"


class LoadError(RuntimeError):
    pass


class NeedsCompile(LoadError):
    """The pinned programs are not of this build (or there are none): only the loader process compiles."""


def _replace_pin(fd: int, path: Path) -> None:
    path.unlink(missing_ok=True)
    libbpf.obj_pin(fd, str(path))


def _cflags(layout: PinLayout) -> list[str]:
    return [f"-I{BPF_SRC_DIR}", f'-DPIN_DIR="{layout.maps}"']


def programs_digest(layout: PinLayout) -> int:
    """What the programs are built from: their source, flags and the kernel they are built for."""
    digest = hashlib.sha256()
    for part in ((BPF_SRC_DIR / "datapath.c").read_bytes(), (BPF_SRC_DIR / "nodeagent.h").read_bytes(),
                 " ".join(_cflags(layout)).encode(), os.uname().release.encode()):
        digest.update(len(part).to_bytes(8, "little") + part)
    return int.from_bytes(digest.digest()[:8], "little")


def compile_and_load(layout: PinLayout) -> tuple[object, dict[str, int], float]:
    """(the bcc module, program fds by name, compile+load seconds)."""
    from bcc import BPF  # the one place bcc is imported

    started = time.monotonic()
    try:
        module = BPF(src_file=str(BPF_SRC_DIR / "datapath.c"), cflags=_cflags(layout))
        fds = {p.name: module.load_func(p.name, p.prog_type, attach_type=p.attach_type).fd for p in PROGRAMS}
    except Exception as e:  # bcc raises bare Exceptions for compile and load failures
        raise LoadError(f"bcc could not compile or load {BPF_SRC_DIR / 'datapath.c'}: {e}") from e
    return module, fds, time.monotonic() - started


def _link_target(path: Path) -> int:
    """The cgroup id (inode) a pinned cgroup link is attached to."""
    link = libbpf.obj_get(str(path))
    try:
        return libbpf.link_info(link)[2]
    finally:
        os.close(link)


def attach_cgroup_links(layout: PinLayout, cgroup: Path, fds: dict[str, int],
                        programs=CGROUP_PROGRAMS) -> tuple[list[str], list[str]]:
    """(hooks created, hooks adopted). A link pinned for another cgroup is replaced."""
    created, adopted = [], []
    cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        cgroup_id = os.fstat(cgroup_fd).st_ino  # on cgroup2 the inode number is the cgroup id
        for program in programs:
            path = layout.link(program.name)
            if path.exists() and _link_target(path) == cgroup_id:
                link = libbpf.obj_get(str(path))
                try:
                    libbpf.link_update(link, fds[program.name])
                finally:
                    os.close(link)
                adopted.append(program.name)
                continue
            if path.exists():
                detach_link(path)
            libbpf.pin_new_link(fds[program.name], cgroup_fd, program.attach_type, str(path))
            created.append(program.name)
    finally:
        os.close(cgroup_fd)
    return created, adopted


def attach_proxy_cgroup(layout: PinLayout, cgroup: Path, proxy_cgroup: Path | None,
                        fds: dict[str, int]) -> tuple[list[str], list[str]]:
    """The proxy's own sockets need sockops for the loopback fast path; when the proxy runs
    below the pods' cgroup (an agent pod in kubepods) the pods' link covers them already."""
    path = layout.link(SOCKOPS_PROXY.name)
    if proxy_cgroup is None or proxy_cgroup.resolve().is_relative_to(cgroup.resolve()):
        if path.exists():
            detach_link(path)
        return [], []
    return attach_cgroup_links(layout, proxy_cgroup, fds, (SOCKOPS_PROXY,))


def attach_sockhash_link(layout: PinLayout, program: Program, prog_fd: int) -> str:
    """sk_msg and sk_skb programs run for the sockets of their sockhash: one link on the map, pinned."""
    path = layout.link(program.name)
    if path.exists():
        link = libbpf.obj_get(str(path))
        try:
            libbpf.link_update(link, prog_fd)
            return "adopted"
        except libbpf.BpfError:
            pass  # its map was replaced: attach anew
        finally:
            os.close(link)
        detach_link(path)
    sockhash = libbpf.obj_get(str(layout.map(SOCKHASH_OF[program.name])))
    try:
        libbpf.pin_new_link(prog_fd, sockhash, program.attach_type, str(path))
    finally:
        os.close(sockhash)
    return "created"


def update_sk_lookup_links(layout: PinLayout, prog_fd: int) -> int:
    """Give every pod's pinned sk_lookup link the new program; drop links of dead namespaces."""
    updated = 0
    for path in sorted(layout.sk_lookup_links.iterdir()):
        link = libbpf.obj_get(str(path))
        try:
            libbpf.link_update(link, prog_fd)
            updated += 1
        except libbpf.BpfError:
            path.unlink()  # its namespace is gone; the link is defunct
        finally:
            os.close(link)
    return updated


def check_layout(layout: PinLayout) -> abi.Pins | None:
    """What the pins say of themselves (None: nothing is pinned yet). Pins of another layout are
    refused, not misread: maps are adopted with their contents."""
    if not layout.map("pods_by_netns").exists():
        return None
    fix = (f"adopting them would misread their contents; `nodeagent cleanup --node {layout.node}` removes them "
           f"(the node's meshed pods fail closed until an agent enrols them again)")
    if not layout.map("layout").exists():
        raise LoadError(f"the data path pinned at {layout.node_dir} has no layout version (an agent older than "
                        f"layout {abi.LAYOUT_VERSION} made it): {fix}")
    fd = libbpf.obj_get(str(layout.map("layout")))
    try:
        raw = libbpf.map_lookup(fd, abi.u32(0), ctypes.sizeof(abi.Pins))
    finally:
        os.close(fd)
    pins = abi.Pins.from_buffer_copy(raw) if raw is not None and len(raw) == ctypes.sizeof(abi.Pins) else abi.Pins()
    if pins.layout_version == 0 and raw == bytes(ctypes.sizeof(abi.Pins)) and _nothing_enrolled(layout):
        return pins  # a first load died between bcc pinning the maps and `write_layout`: compile again
    if pins.layout_version != abi.LAYOUT_VERSION:
        raise LoadError(f"the data path pinned at {layout.node_dir} has layout {pins.layout_version}, this agent's "
                        f"is {abi.LAYOUT_VERSION}: {fix}")
    return pins


def _nothing_enrolled(layout: PinLayout) -> bool:
    """No pod entry and no sk_lookup link: the maps hold nothing a layout could misread."""
    fd = libbpf.obj_get(str(layout.map("pods_by_netns")))
    try:
        entries = next(iter(libbpf.map_keys(fd, 8)), None)
    finally:
        os.close(fd)
    links = layout.sk_lookup_links
    return entries is None and not (links.exists() and any(links.iterdir()))


def write_layout(layout: PinLayout, digest: int) -> None:
    """This layout's version and the pinned programs' digest (0: unknown, compile again)."""
    fd = libbpf.obj_get(str(layout.map("layout")))
    try:
        libbpf.map_update(fd, abi.u32(0), bytes(abi.Pins(abi.LAYOUT_VERSION, 0, digest)))
    finally:
        os.close(fd)


def pinned_programs(layout: PinLayout, pins: abi.Pins | None, digest: int) -> dict[str, int] | None:
    """Fds of the pinned programs, if they were built as this loader would build them; else None."""
    if pins is None or pins.programs_digest != digest or not all(layout.prog(p.name).exists() for p in PROGRAMS):
        return None
    return {p.name: libbpf.obj_get(str(layout.prog(p.name))) for p in PROGRAMS}


def write_config(layout: PinLayout, mesh_port: int, fast_paths: int) -> None:
    fd = libbpf.obj_get(str(layout.map("config")))
    try:
        libbpf.map_update(fd, abi.u32(0), bytes(abi.Config(mesh_port, INBOUND_PORT, fast_paths)))
    finally:
        os.close(fd)


def load(layout: PinLayout, cgroup: Path, mesh_port: int = DEFAULT_MESH_PORT, proxy_cgroup: Path | None = None,
         fast_paths: int = DEFAULT_FAST_PATHS, may_compile: bool = True) -> dict:
    """Attach or adopt; with `may_compile` False, NeedsCompile unless the pinned programs are of
    this build (then nothing here imports bcc: the agent may run it in its own process)."""
    if not cgroup.is_dir() or not (cgroup / "cgroup.procs").exists():
        raise LoadError(f"{cgroup} is not a cgroup v2 directory")
    pins = check_layout(layout)
    for directory in (layout.maps, layout.progs, layout.sk_lookup_links):
        directory.mkdir(parents=True, exist_ok=True)
    digest = programs_digest(layout)
    module, seconds, fds = None, 0.0, pinned_programs(layout, pins, digest)
    compiled = fds is None
    if compiled and not may_compile:
        raise NeedsCompile(f"the programs pinned at {layout.progs} are not of this build")
    if compiled:
        module, fds, seconds = compile_and_load(layout)
        # bcc pinned the maps (a new `layout` map holds 0): the layout now, and digest 0 until
        # every program pin is replaced, so a load that dies halfway is never adopted as a build.
        write_layout(layout, 0)
        for name, fd in fds.items():
            _replace_pin(fd, layout.prog(name))
    write_layout(layout, digest)
    created, adopted = attach_cgroup_links(layout, cgroup, fds)
    proxy_created, proxy_adopted = attach_proxy_cgroup(layout, cgroup, proxy_cgroup, fds)
    for program in SOCKHASH_PROGRAMS:  # only for the fast paths (sockmap links need 6.10+)
        path = layout.link(program.name)
        if not fast_paths:
            if path.exists():
                detach_link(path)
        elif attach_sockhash_link(layout, program, fds[program.name]) == "created":
            created.append(program.name)
        else:
            adopted.append(program.name)
    pods = update_sk_lookup_links(layout, fds[SK_LOOKUP.name])
    write_config(layout, mesh_port, fast_paths)
    if not compiled:
        for fd in fds.values():
            os.close(fd)
    del module
    return {"node": layout.node, "cgroup": str(cgroup), "pin_dir": str(layout.node_dir), "compiled": compiled,
            "compile_and_load_ms": round(seconds * 1000, 1), "created": created + proxy_created,
            "adopted": adopted + proxy_adopted, "fast_paths": fast_paths,
            "sk_lookup_links_updated": pods}


CHECK_PREFIX = "nodeagent-check-"


def _sweep_dead_checks(bpffs: Path) -> None:
    """Scratch pins of checks whose process died before its `finally` (a SIGKILL): named with
    their pid, removed once that pid is gone. Unnamed ones predate the pid in the name."""
    import shutil

    for scratch in bpffs.glob(f"{CHECK_PREFIX}*"):
        pid = scratch.name[len(CHECK_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
            shutil.rmtree(scratch, ignore_errors=True)


def check_compiles() -> str:
    """Compile and load every program with its maps pinned in a scratch directory, then remove it."""
    import shutil
    import tempfile

    _sweep_dead_checks(DEFAULT_ROOT.parent)
    scratch = Path(tempfile.mkdtemp(prefix=f"{CHECK_PREFIX}{os.getpid()}-", dir=DEFAULT_ROOT.parent))
    try:
        layout = PinLayout(scratch, "check")
        layout.maps.mkdir(parents=True)
        module, fds, seconds = compile_and_load(layout)
        del module
        return f"{len(fds)} programs compiled and verified in {seconds * 1000:.0f} ms"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compile and load, attach nothing")
    parser.add_argument("--node")
    parser.add_argument("--cgroup", type=Path, help="the cgroup v2 directory of the node's pods")
    parser.add_argument("--pin-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--mesh-port", type=int, default=DEFAULT_MESH_PORT)
    parser.add_argument("--proxy-cgroup", type=Path, help="the proxy's own cgroup (for the loopback fast path)")
    parser.add_argument("--fast-paths", type=int, default=DEFAULT_FAST_PATHS, help="NA_FAST_* bits")
    args = parser.parse_args()
    if args.check:
        try:
            print(check_compiles())
        except (LoadError, OSError) as e:
            print(f"nodeagent loader: {e}", file=sys.stderr)
            raise SystemExit(2) from e
        return
    if not args.node or not args.cgroup:
        parser.error("--node and --cgroup are required to load")
    try:
        report = load(PinLayout(args.pin_root, args.node), args.cgroup, args.mesh_port,
                      args.proxy_cgroup, args.fast_paths)
    except (LoadError, OSError, ValueError) as e:
        print(f"nodeagent loader: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    print(json.dumps(report))


if __name__ == "__main__":
    main()


def load_same_build_here(node: str, cgroup: Path, pin_root: Path = DEFAULT_ROOT, mesh_port: int = DEFAULT_MESH_PORT,
                         proxy_cgroup: Path | None = None, fast_paths: int = DEFAULT_FAST_PATHS) -> dict:
    """The load in this process when the pinned programs are of this build (a restart: no compile,
    no second interpreter's start), else in the loader's own process; its report."""
    try:
        return load(PinLayout(pin_root, node), cgroup, mesh_port, proxy_cgroup, fast_paths, may_compile=False)
    except NeedsCompile:
        return load_in_subprocess(node, cgroup, pin_root, mesh_port, proxy_cgroup, fast_paths)
    except (OSError, ValueError, libbpf.BpfError) as e:
        raise LoadError(str(e)) from e


def load_in_subprocess(node: str, cgroup: Path, pin_root: Path = DEFAULT_ROOT, mesh_port: int = DEFAULT_MESH_PORT,
                       proxy_cgroup: Path | None = None, fast_paths: int = DEFAULT_FAST_PATHS) -> dict:
    """Run the loader as its own process (bcc's memory leaves with it); its report."""
    import subprocess

    command = [sys.executable, "-m", "nodeagent.datapath.loader", "--node", node, "--cgroup", str(cgroup),
               "--pin-root", str(pin_root), "--mesh-port", str(mesh_port),
               "--fast-paths", str(fast_paths)]
    if proxy_cgroup is not None:
        command += ["--proxy-cgroup", str(proxy_cgroup)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise LoadError(done.stderr.strip() or f"loader exited with {done.returncode}")
    return json.loads(done.stdout)
