"""The Python mirrors of kernel-facing structs and constants match the C."""

import ctypes
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nodeagent.datapath import abi, libbpf

BPF_DIR = Path(__file__).resolve().parents[1] / "bpf"


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler to measure the C structs")
def test_struct_sizes_match_the_c_header(tmp_path):
    names = {abi.Pod: "na_pod", abi.OrigDst: "na_orig_dst", abi.OrigKey: "na_orig_key",
             abi.PolicyKey: "na_policy_key", abi.Config: "na_config", abi.Pins: "na_pins",
             abi.Counters: "na_counters",
             abi.SockKey: "na_sock_key", abi.MsgState: "na_msg_state", abi.Splice: "na_splice",
             abi.SkbSplice: "na_skb_splice"}
    source = tmp_path / "sizes.c"
    source.write_text('#include <stdio.h>\n#include "nodeagent.h"\nint main(void) {\n'
                      + "".join(f'    printf("%zu\\n", sizeof(struct {c}));\n' for c in names.values())
                      + "    return 0;\n}\n")
    subprocess.run(["cc", f"-I{BPF_DIR}", "-o", str(tmp_path / "sizes"), str(source)], check=True)
    sizes = [int(line) for line in subprocess.run([str(tmp_path / "sizes")], capture_output=True, text=True,
                                                   check=True).stdout.split()]
    assert sizes == [ctypes.sizeof(s) for s in names] == [abi.C_SIZES[s] for s in names]


def test_c_constants_match():
    header = (BPF_DIR / "nodeagent.h").read_text()
    assert re.search(rf"#define NA_MAX_PODS {abi.MAX_PODS}\b", header)
    assert re.search(rf"#define NA_LAYOUT_VERSION {abi.LAYOUT_VERSION}\b", header)
    assert re.search(rf"#define NA_POD_ENROLLED {abi.POD_ENROLLED}\b", header)
    assert re.search(rf"#define NA_FAST_SPLICE {abi.FAST_SPLICE}\b", header)
    assert re.search(rf"#define NA_SOCK_PROXY {abi.SOCK_PROXY}\b", header)
    assert re.search(rf"#define NA_FAST_SKB {abi.FAST_SKB}\b", header)
    assert re.search(rf"#define NA_FAST_LOOPBACK {abi.FAST_LOOPBACK}\b", header)
    for name, value in (("UNDECIDED", abi.MSG_UNDECIDED), ("TCP", abi.MSG_TCP), ("PEER", abi.MSG_PEER),
                        ("SPLICED", abi.MSG_SPLICED)):
        assert re.search(rf"#define NA_MSG_{name} {value}\b", header)


def _uapi_bpf_header() -> Path | None:
    for candidate in sorted(Path("/usr/src").glob("linux-headers-*/include/uapi/linux/bpf.h")) + [
            Path("/usr/include/linux/bpf.h")]:
        if candidate.exists():
            return candidate
    return None


@pytest.mark.skipif(_uapi_bpf_header() is None, reason="needs the kernel's UAPI bpf.h")
def test_helper_ids_match_the_kernel_uapi():
    text = _uapi_bpf_header().read_text()
    if "FN(unspec, 0" in text:  # 6.5+: FN(name, id, ...)
        ids = {m[0]: int(m[1]) for m in re.findall(r"FN\((\w+), (\d+),", text)}
    else:  # older: position in the list is the id
        start = text.index("#define __BPF_FUNC_MAPPER(FN)")
        names = re.findall(r"FN\((\w+)\)", text[start:text.index("\n\n", start)])
        ids = {name: i for i, name in enumerate(names)}
    assert ids["map_lookup_elem"] == libbpf.FUNC_MAP_LOOKUP_ELEM
    assert ids["get_socket_cookie"] == libbpf.FUNC_GET_SOCKET_COOKIE
    assert ids["sock_ops_cb_flags_set"] == libbpf.FUNC_SOCK_OPS_CB_FLAGS_SET
    assert ids["sk_release"] == libbpf.FUNC_SK_RELEASE
    assert ids["get_netns_cookie"] == libbpf.FUNC_GET_NETNS_COOKIE
    assert ids["sk_assign"] == libbpf.FUNC_SK_ASSIGN
    assert ids["sock_hash_update"] == libbpf.FUNC_SOCK_HASH_UPDATE
    assert ids["msg_redirect_hash"] == libbpf.FUNC_MSG_REDIRECT_HASH
    assert ids["sk_redirect_hash"] == libbpf.FUNC_SK_REDIRECT_HASH


def test_long_lived_modules_never_import_bcc():
    code = ("import sys, nodeagent.cli, nodeagent.datapath.control, nodeagent.datapath.loader, "
            "nodeagent.preflight; print('bcc' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


# The pinned maps' layout (map declarations, the header's structs and constants, comments and
# spacing aside) as of NA_LAYOUT_VERSION: a change to it needs a new version (and a new digest).
LAYOUT_DIGESTS = {2: "827d2cfd7c38b8b6", 3: "d00544703c859936"}


def layout_digest() -> str:
    import hashlib

    def code(text: str) -> str:
        return re.sub(r"\s+", "", re.sub(r"/\*.*?\*/|//[^\n]*", "", text, flags=re.S))

    header = code(re.sub(r"#define NA_LAYOUT_VERSION \d+", "", (BPF_DIR / "nodeagent.h").read_text()))
    tables = "".join(code(line) for line in (BPF_DIR / "datapath.c").read_text().splitlines()
                     if "BPF_TABLE_PINNED" in line or "NA_SOCKHASH_PINNED(" in line)
    return hashlib.sha256((header + tables).encode()).hexdigest()[:16]


def test_a_change_of_the_pinned_layout_comes_with_a_new_layout_version():
    assert LAYOUT_DIGESTS.get(abi.LAYOUT_VERSION) == layout_digest(), (
        f"the pinned maps' layout changed: bump NA_LAYOUT_VERSION (and abi.LAYOUT_VERSION) and add "
        f"{abi.LAYOUT_VERSION + 1}: {layout_digest()!r} to LAYOUT_DIGESTS")
