"""What an agent forgets of the pinned enrolments: only what it found at its start and does not
serve, once. During a handover the predecessor still runs beside it and may enrol a pod the
successor's view lacks yet; that pod's entry and sk_lookup link must stay (else it runs unmeshed).
The pinned maps are stood in for by `Pins`, plain values shaped as `Datapath` reads them."""

from nodeagent.agent.agent import Agent
from nodeagent.agent.reconcile import SlotAllocator
from nodeagent.settings import AgentSettings


class Pins:
    """pods_by_netns (cookie -> slot) and the sk_lookup links (cookies), as Datapath shows them."""

    def __init__(self, entries: dict[int, int]):
        self.entries = dict(entries)
        self.links = set(entries)

    def enrolled_cookies(self) -> list[int]:
        return list(self.entries)

    def inbound_cookies(self) -> list[int]:
        return list(self.links)

    def forget_cookie(self, cookie: int) -> None:
        self.entries.pop(cookie, None)
        self.links.discard(cookie)

    def sweep_refusals(self) -> int:
        return 0  # the refusing map: tests/test_kernel_refusal.py


class Proxy:
    def __init__(self, datapath: Pins, served: set[int]):
        self.datapath = datapath
        self.pods = dict.fromkeys(served)


def agent_found(pins: Pins) -> Agent:
    """An agent just started on `pins` (what `Agent.run` does with the pins it finds)."""
    agent = Agent(AgentSettings(node_name="node0"), source=None)
    agent.slots = SlotAllocator(8)
    agent.adopted_slots = dict(pins.entries)
    for slot in pins.entries.values():
        agent.slots.reserve(slot)
    agent._inherited = set(pins.enrolled_cookies()) | set(pins.inbound_cookies())
    return agent


def test_only_what_was_found_at_start_and_is_not_served_is_forgotten_and_only_once():
    pins = Pins({101: 0, 102: 1})  # the predecessor's: 101 is served again, 102 left meanwhile
    agent = agent_found(pins)
    agent.adopted_slots.pop(101)  # enrolled into its old slot
    agent.proxy = Proxy(pins, served={101})
    agent._forget_stale_enrolments()
    assert pins.entries == {101: 0} and pins.links == {101}
    assert agent.slots.take() == 1  # 102's slot is free again
    # Later the predecessor (still draining) enrols a pod this agent does not know yet.
    pins.entries[103] = 2
    pins.links.add(103)
    agent._forget_stale_enrolments()
    assert pins.entries == {101: 0, 103: 2} and pins.links == {101, 103}


def test_the_predecessor_never_forgets_what_its_successor_enrolled():
    pins = Pins({101: 0})
    old = agent_found(pins)
    old.adopted_slots.pop(101)
    old.proxy = Proxy(pins, served={101})
    old._forget_stale_enrolments()  # its own first complete reconcile: nothing to forget
    pins.entries[104] = 1  # the successor enrolled a pod the old agent's view lacks yet
    pins.links.add(104)
    old._forget_stale_enrolments()  # every later reconcile of the old agent
    assert pins.entries == {101: 0, 104: 1} and pins.links == {101, 104}


def test_a_pod_an_older_agent_enrolled_since_this_ones_start_keeps_its_slot_and_new_slots_avoid_every_entry():
    agent = agent_found(Pins({101: 0}))
    agent.adopted_slots.pop(101)  # served again, in slot 0
    pinned = {101: 0, 103: 1}  # the older agent enrolled 103 in slot 1 before it saw this one's mark
    assert agent._new_slot(103, pinned) == 1  # both steer it by one slot
    assert agent._new_slot(104, {**pinned, 105: 2}) == 3  # never a slot another entry names
    assert agent._new_slot(106, {106: 3}) == 2  # its entry's slot is this agent's already: a free one
