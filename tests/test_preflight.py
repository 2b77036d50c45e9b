import pytest

from nodeagent import preflight
from nodeagent.preflight import Check


def test_effective_caps_parses_proc_status():
    assert preflight.effective_caps("Name:\tx\nCapEff:\t000001ffffffffff\n") == 0x1FFFFFFFFFF
    assert preflight.effective_caps("Name:\tx\n") == 0


def test_mount_types():
    text = ("33 25 0:28 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
            "40 25 0:35 / /sys/fs/bpf rw,relatime - bpf bpf rw\n")
    assert preflight.mount_types(text) == {"/sys/fs/cgroup": "cgroup2", "/sys/fs/bpf": "bpf"}


def test_render_fails_only_on_required_checks():
    lines = []
    assert preflight.render([Check("a", True, "fine"), Check("b", False, "absent", "do x", required=False)],
                            lines.append)
    assert lines == ["[ok]   a: fine", "[warn] b: absent\n       hint: do x"]
    assert not preflight.render([Check("c", False, "broken", "fix it")], lines.append)
    assert lines[-1] == "[FAIL] c: broken\n       hint: fix it"


@pytest.mark.privileged
def test_the_sockmap_link_probe_tells_an_accepted_attachment_from_a_refused_one():
    from nodeagent.datapath import libbpf

    assert libbpf.probe_sockmap_link(libbpf.PROG_TYPE_SK_MSG, libbpf.ATTACH_SK_MSG_VERDICT)
    assert libbpf.probe_sockmap_link(libbpf.PROG_TYPE_SK_SKB, libbpf.ATTACH_SK_SKB_STREAM_VERDICT)
    # an sk_msg program where an sk_skb verdict goes: the kernel refuses, the probe says so
    assert not libbpf.probe_sockmap_link(libbpf.PROG_TYPE_SK_MSG, libbpf.ATTACH_SK_SKB_STREAM_VERDICT)
