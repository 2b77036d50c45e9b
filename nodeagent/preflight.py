"""`nodeagent check`: every kernel and host prerequisite, each with pass/fail and a hint.

The agent runs the same checks before it loads anything, so a host that
lacks a feature gets a named failure instead of a traceback.
"""

import os
import platform
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nodeagent import cgroups, netns
from nodeagent.datapath import libbpf

CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    hint: str = ""
    required: bool = True


def effective_caps(status_text: str) -> int:
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_privileges() -> Check:
    with open("/proc/self/status") as f:
        caps = effective_caps(f.read())
    has = {name: bool(caps >> bit & 1) for name, bit in
           (("CAP_BPF", CAP_BPF), ("CAP_NET_ADMIN", CAP_NET_ADMIN), ("CAP_SYS_ADMIN", CAP_SYS_ADMIN))}
    missing = [name for name, ok in has.items() if not ok]
    return Check("privileges", not missing, "have " + ", ".join(has) if not missing else "missing " + ", ".join(missing),
                 "run as root, or grant CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN")


def check_cgroup2() -> Check:
    try:
        return Check("cgroup v2", True, f"mounted at {cgroups.cgroup2_root()}")
    except cgroups.CgroupError as e:
        return Check("cgroup v2", False, str(e), "mount -t cgroup2 none /sys/fs/cgroup")


def mount_types(mountinfo: str) -> dict[str, str]:
    """mount point -> file-system type, from mountinfo text."""
    types = {}
    for line in mountinfo.splitlines():
        fields, _, fs = line.partition(" - ")
        parts = fields.split(" ")
        if len(parts) > 4 and fs:
            types[parts[4]] = fs.split(" ", 1)[0]
    return types


def check_bpffs(pin_root: Path) -> Check:
    with open("/proc/self/mountinfo") as f:
        types = mount_types(f.read())
    mount = next((m for m in sorted(types, key=len, reverse=True)
                  if str(pin_root).startswith(m.rstrip("/") + "/") or str(pin_root) == m), "/")
    ok = types.get(mount) == "bpf"
    return Check("bpffs", ok, f"{mount} is {types.get(mount, 'not mounted')}" + (f" (pins under {pin_root})" if ok else ""),
                 "mount -t bpf bpf /sys/fs/bpf")


def check_btf() -> Check:
    path = Path("/sys/kernel/btf/vmlinux")
    return Check("kernel BTF", path.exists(), str(path) if path.exists() else f"no {path}",
                 "not needed by bcc; CO-RE tooling and bpftool want it", required=False)


def check_headers() -> Check:
    release = platform.release()
    build = Path(f"/lib/modules/{release}/build")
    if not (build / "include").exists():
        return Check("kernel headers", False, f"no headers at {build}",
                     "make setup (or scripts/setup-host.sh) installs or links the closest headers")
    target = build.resolve()
    matched = release in target.name
    return Check("kernel headers", True, f"{build} -> {target}" + ("" if matched else
                 " (headers of another kernel: our BPF uses only stable UAPI types)"))


def check_prog_types() -> list[Check]:
    from nodeagent.datapath.programs import PROGRAMS

    names = {libbpf.PROG_TYPE_CGROUP_SOCK_ADDR: "cgroup sock_addr", libbpf.PROG_TYPE_SOCK_OPS: "sock_ops",
             libbpf.PROG_TYPE_SK_LOOKUP: "sk_lookup (5.9+)", libbpf.PROG_TYPE_SK_MSG: "sk_msg",
             libbpf.PROG_TYPE_SK_SKB: "sk_skb"}
    return [Check(f"program type {names[t]}", libbpf.probe_prog_type(t), "loadable" if libbpf.probe_prog_type(t)
                  else "the kernel refuses it", "a newer kernel (5.15 or later)")
            for t in sorted({p.prog_type for p in PROGRAMS})]


HELPERS = (
    (libbpf.PROG_TYPE_CGROUP_SOCK_ADDR, libbpf.FUNC_GET_NETNS_COOKIE, "bpf_get_netns_cookie in sock_addr"),
    (libbpf.PROG_TYPE_CGROUP_SOCK_ADDR, libbpf.FUNC_GET_SOCKET_COOKIE, "bpf_get_socket_cookie in sock_addr"),
    (libbpf.PROG_TYPE_SOCK_OPS, libbpf.FUNC_GET_NETNS_COOKIE, "bpf_get_netns_cookie in sock_ops"),
    (libbpf.PROG_TYPE_SOCK_OPS, libbpf.FUNC_SOCK_OPS_CB_FLAGS_SET, "bpf_sock_ops_cb_flags_set in sock_ops"),
    (libbpf.PROG_TYPE_SK_LOOKUP, libbpf.FUNC_SK_ASSIGN, "bpf_sk_assign in sk_lookup"),
    (libbpf.PROG_TYPE_SK_LOOKUP, libbpf.FUNC_SK_RELEASE, "bpf_sk_release in sk_lookup"),
    (libbpf.PROG_TYPE_SOCK_OPS, libbpf.FUNC_SOCK_HASH_UPDATE, "bpf_sock_hash_update in sock_ops"),
    (libbpf.PROG_TYPE_SK_MSG, libbpf.FUNC_MSG_REDIRECT_HASH, "bpf_msg_redirect_hash in sk_msg"),
    (libbpf.PROG_TYPE_SK_MSG, libbpf.FUNC_GET_NETNS_COOKIE, "bpf_get_netns_cookie in sk_msg (5.15+)"),
    (libbpf.PROG_TYPE_SK_SKB, libbpf.FUNC_SK_REDIRECT_HASH, "bpf_sk_redirect_hash in sk_skb"),
    (libbpf.PROG_TYPE_SK_SKB, libbpf.FUNC_GET_SOCKET_COOKIE, "bpf_get_socket_cookie in sk_skb"),
)


def check_helpers() -> list[Check]:
    checks = []
    for prog_type, func, name in HELPERS:
        ok = libbpf.probe_helper(prog_type, func)
        checks.append(Check(f"helper {name}", ok, "available" if ok else "missing", "a newer kernel (5.15 or later)"))
    return checks


def check_sockmap_links() -> list[Check]:
    """The fast paths' programs are attached to their sockhash by pinned links."""
    from nodeagent.datapath.programs import SOCKHASH_PROGRAMS

    checks = []
    for program in SOCKHASH_PROGRAMS:
        ok = libbpf.probe_sockmap_link(program.prog_type, program.attach_type)
        checks.append(Check(f"sockmap link for {program.name}", ok, "a link attaches it to a sockhash" if ok else
                            "the kernel refuses a bpf_link on a sockhash",
                            "Linux 6.10 or later; needed only with --fast-path", required=False))
    return checks


def check_netns_cookie() -> Check:
    try:
        with socket.socket() as probe:
            netns.socket_cookie_of_netns(probe)
        return Check("SO_NETNS_COOKIE", True, "the proxy can name a socket's namespace")
    except OSError as e:
        return Check("SO_NETNS_COOKIE", False, e.strerror or str(e), "Linux 5.14 or later")


def check_bcc_compiles() -> Check:
    """Compile and load the real programs in a throw-away process and pin directory."""
    done = subprocess.run([sys.executable, "-m", "nodeagent.datapath.loader", "--check"], capture_output=True,
                          text=True, timeout=120)
    if done.returncode == 0:
        return Check("bcc compiles the data path", True, done.stdout.strip())
    return Check("bcc compiles the data path", False, (done.stderr.strip().splitlines() or ["failed"])[-1],
                 "install python3-bpfcc and kernel headers (make setup)")


def run_all(pin_root: Path, compile_programs: bool = True) -> list[Check]:
    checks: list[Check] = [check_privileges(), check_cgroup2(), check_bpffs(pin_root), check_btf(), check_headers()]
    if os.geteuid() == 0:  # probing program types needs the privileges checked above
        checks += check_prog_types() + check_helpers() + check_sockmap_links()
    checks.append(check_netns_cookie())
    if compile_programs:
        checks.append(check_bcc_compiles())
    return checks


def render(checks: list[Check], write: Callable[[str], None]) -> bool:
    """Print one line a check; True when every required check passed."""
    for c in checks:
        mark = "[ok]  " if c.ok else ("[FAIL]" if c.required else "[warn]")
        line = f"{mark} {c.name}: {c.detail}"
        if not c.ok and c.hint:
            line += f"\n       hint: {c.hint}"
        write(line)
    return all(c.ok or not c.required for c in checks)
