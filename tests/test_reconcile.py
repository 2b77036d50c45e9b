"""Which pods the agent enrols and releases, which it refuses and why: pure, with plain values."""

import pytest

from nodeagent.agent.reconcile import (HOST_NETWORK, NETNS_WITHOUT_POD_IP, NotEnrolled, SlotAllocator, plan_changes,
                                       refusal)
from nodeagent.cluster.model import ClusterView


def test_changes_enrol_the_wanted_and_release_the_rest_telling_deleted_from_left():
    changes = plan_changes(enrolled={"a", "b", "c"}, wanted={"a", "d"}, on_node={"a", "b", "d"})
    assert changes.enrol == ("d",) and changes.release == ("b", "c") and changes.deleted == {"c"}


def test_slots_are_the_lowest_free_and_bounded():
    slots = SlotAllocator(3)
    assert [slots.take() for _ in range(3)] == [0, 1, 2]
    slots.free(1)
    assert slots.take() == 1
    with pytest.raises(RuntimeError, match="all 3 pod slots"):
        slots.take()


def test_a_host_network_pod_is_never_enrollable():
    assert refusal(host_network=True) == HOST_NETWORK
    assert refusal(host_network=False) is None


def test_refusals_are_news_once_per_reason_and_end_with_the_pod():
    refused = NotEnrolled()
    assert refused.note("u1", "ns/a", NETNS_WITHOUT_POD_IP)
    assert not refused.note("u1", "ns/a", NETNS_WITHOUT_POD_IP)  # logged once, not every round
    assert refused.note("u1", "ns/a", HOST_NETWORK)  # another reason is news again
    refused.note("u2", "ns/b", HOST_NETWORK)
    assert refused.reasons() == {"ns/a": HOST_NETWORK, "ns/b": HOST_NETWORK}
    refused.clear("u1")  # enrolled at last
    refused.keep_only({"u3"})  # u2 left the mesh or the node
    assert refused.reasons() == {}


def pod(name: str, **spec) -> dict:
    return {"kind": "Pod", "metadata": {"namespace": "ns", "name": name, "uid": name},
            "spec": {"nodeName": "n", **spec}, "status": {"phase": "Running", "podIP": "10.244.0.9"}}


def test_the_model_reads_host_network_from_the_pod_spec():
    view = ClusterView(pods=[pod("host", hostNetwork=True), pod("plain"), pod("odd", hostNetwork="yes")])
    assert [view.pods[f"ns/{n}"].host_network for n in ("host", "plain")] == [True, False]
    assert "ns/odd" not in view.pods and "not a boolean" in view.errors[0]  # never guessed
