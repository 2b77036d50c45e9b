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

    def take(self, excluding: frozenset[int] = frozenset()) -> int:
        """The lowest free slot not in `excluding` (those another agent's entries name)."""
        for slot in range(self.size):
            if slot not in self._used and slot not in excluding:
                self._used.add(slot)
                return slot
        raise RuntimeError(f"all {self.size} pod slots are in use")

    def in_use(self, slot: int) -> bool:
        return slot in self._used

    def reserve(self, slot: int) -> None:
        """A slot a predecessor's entry holds: not given to another pod."""
        self._used.add(slot)

    def free(self, slot: int) -> None:
        self._used.discard(slot)


# Why a meshed pod of the node is not enrolled: a fixed set (a metric label).
HOST_NETWORK = "host-network"  # its namespace is the node's: listeners and sk_lookup would land there
ENROLMENT_FAILED = "enrolment-failed"  # the proxy could not open its listeners or identity (logged with why)
NETNS_WITHOUT_POD_IP = "netns-without-pod-ip"  # no process of its cgroup is in a namespace holding its IP (yet)


def refusal(host_network: bool) -> str | None:
    """Why a pod must never be enrolled, whatever the node shows of it; None if it may be."""
    return HOST_NETWORK if host_network else None


class NotEnrolled:
    """Meshed pods of the node that are not enrolled, and why: reported (logged once per
    reason, in /stats and a metric) until they are enrolled or leave the mesh or the node."""

    def __init__(self):
        self._by_uid: dict[str, tuple[str, str]] = {}  # uid -> (pod key, reason)

    def note(self, uid: str, key: str, reason: str) -> bool:
        """Record it; True if it is news (a new pod or another reason)."""
        news = self._by_uid.get(uid) != (key, reason)
        self._by_uid[uid] = (key, reason)
        return news

    def clear(self, uid: str) -> None:
        self._by_uid.pop(uid, None)

    def keep_only(self, uids: set[str]) -> None:
        for uid in set(self._by_uid) - uids:
            del self._by_uid[uid]

    def reasons(self) -> dict[str, str]:
        """Pod key -> reason."""
        return dict(self._by_uid.values())
