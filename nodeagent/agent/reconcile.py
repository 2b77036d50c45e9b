"""Which pods to enrol and release, and which data-path slot each one holds: pure."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Changes:
    enrol: tuple[str, ...]  # pod UIDs to enrol
    release: tuple[str, ...]  # pod UIDs to take out of the mesh
    deleted: frozenset[str]  # of those released, the ones gone from the node


def plan_changes(enrolled: set[str], wanted: set[str], on_node: set[str]) -> Changes:
    """`enrolled`: UIDs the proxy serves; `wanted`: meshed pods on the node; `on_node`: all pods on it."""
    release = enrolled - wanted
    return Changes(tuple(sorted(wanted - enrolled)), tuple(sorted(release)), frozenset(release - on_node))


class SlotAllocator:
    """Counter slots in the data path: the lowest free one, so slots stay dense."""

    def __init__(self, size: int):
        self.size = size
        self._used: set[int] = set()

    def take(self) -> int:
        for slot in range(self.size):
            if slot not in self._used:
                self._used.add(slot)
                return slot
        raise RuntimeError(f"all {self.size} pod slots are in use")

    def free(self, slot: int) -> None:
        self._used.discard(slot)
