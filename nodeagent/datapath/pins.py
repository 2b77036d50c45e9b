"""Where a node's data path lives on bpffs: one directory per node.

    <root>/<node>/maps/<map>          pinned by bcc from the C (BPF_TABLE_PINNED)
    <root>/<node>/progs/<program>     pinned by the loader
    <root>/<node>/links/<hook>        cgroup links: connect4, connect6, getpeername4, sockops
    <root>/<node>/links/sk_lookup/<netns cookie>   one per pod network namespace
    <root>/<node>/agents/<start ns>-<pid>          an empty directory: a running agent's mark
                                                   (agent/succession.py)

Pinned links keep programs attached while no agent runs (so enrolled pods fail
closed) and let a restarted agent find and update them instead of attaching twice.
"""

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROOT = Path(os.environ.get("NODEAGENT_BPF_ROOT", "/sys/fs/bpf/nodeagent"))


@dataclass(frozen=True)
class PinLayout:
    root: Path
    node: str

    def __post_init__(self):
        if not self.node or "/" in self.node or self.node in (".", ".."):
            raise ValueError(f"invalid node name for a pin directory: {self.node!r}")

    @property
    def node_dir(self) -> Path:
        return self.root / self.node

    @property
    def maps(self) -> Path:
        return self.node_dir / "maps"

    @property
    def progs(self) -> Path:
        return self.node_dir / "progs"

    @property
    def links(self) -> Path:
        return self.node_dir / "links"

    @property
    def sk_lookup_links(self) -> Path:
        return self.links / "sk_lookup"

    @property
    def agents(self) -> Path:
        return self.node_dir / "agents"

    def map(self, name: str) -> Path:
        return self.maps / name

    def prog(self, name: str) -> Path:
        return self.progs / name

    def link(self, hook: str) -> Path:
        return self.links / hook

    def sk_lookup_link(self, netns_cookie: int) -> Path:
        return self.sk_lookup_links / str(netns_cookie)
