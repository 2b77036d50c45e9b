"""What the node's pods share in the proxy, with plain values: the directory (per-Service
state across view changes), the connection table and per-pod limits, the problem log."""

import logging

import pytest

from nodeagent.cluster.model import ClusterView, PodInfo
from nodeagent.proxy import limits
from nodeagent.proxy.connection import NODE_LIMIT, ConnectionTable, Direction, Phase, Refused
from nodeagent.proxy.directory import Directory
from nodeagent.proxy.limits import Limit, PodLimits, Quota
from nodeagent.proxy.problems import BURST, ProblemLog
from nodeagent.proxy.routing import ToService


def pod_object(name: str, ip: str, app: str = "web") -> dict:
    return {"metadata": {"name": name, "namespace": "shop", "labels": {"app": app}},
            "spec": {"containers": [{}]}, "status": {"podIP": ip}}


SERVICE = {"metadata": {"name": "web", "namespace": "shop"},
           "spec": {"clusterIP": "10.96.7.7", "selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}


# --- the directory ---

def test_every_view_change_refreshes_a_services_endpoints():
    """EndpointSets were cached by id(view): CPython reuses ids, so after a change the balancer
    could keep the old endpoints. Each round the Service leaves for a moment (an empty view, so
    the last view it was used in is freed and its id free to be reused), then comes back with a
    different endpoint: the old code kept the stale endpoint in 198 of these 200 rounds."""
    directory = Directory()
    for round_ in range(200):
        ip = f"10.244.0.{round_ % 250 + 1}"
        directory.update(ClusterView())
        directory.update(ClusterView([pod_object(f"web-{round_}", ip)], [SERVICE]))
        decision = directory.route("10.96.7.7", 80)
        assert isinstance(decision, ToService)
        assert set(directory.endpoints_for(decision).states) == {(ip, 8080)}, round_


def test_an_endpoint_that_stays_keeps_its_history_and_services_that_leave_are_forgotten():
    directory = Directory()
    directory.update(ClusterView([pod_object("a", "10.244.0.1")], [SERVICE]))
    decision = directory.route("10.96.7.7", 80)
    state = directory.endpoints_for(decision).states[("10.244.0.1", 8080)]
    directory.config_for(decision), directory.budget_for(decision)
    directory.update(ClusterView([pod_object("a", "10.244.0.1"), pod_object("b", "10.244.0.2")], [SERVICE]))
    assert directory.endpoints_for(directory.route("10.96.7.7", 80)).states[("10.244.0.1", 8080)] is state
    directory.update(ClusterView([pod_object("a", "10.244.0.1")], []))
    assert directory.sizes() == {"endpoint_sets": 0, "configs": 0, "budgets": 0}


# --- limits ---

def test_limits_parse_and_name_what_is_wrong():
    assert limits.parse("handshakes=4, detections=10")[Limit.HANDSHAKES] == 4
    assert limits.parse("")[Limit.OUTBOUND_CONNECTIONS] == 1000
    for text, message in [("handshakes", "not NAME=N"), ("speed=1", "unknown limit 'speed'"),
                          ("handshakes=0", "not in 1..1000000"), ("handshakes=x", "not a number")]:
        with pytest.raises(ValueError, match=message):
            limits.parse(text)


def test_a_pods_annotations_lower_the_defaults_and_bad_ones_are_reported():
    defaults = limits.parse("handshakes=8")
    pod_limits, errors = limits.from_annotations({"limits.nodeagent.io/handshakes": "2",
                                                  "limits.nodeagent.io/detections": "lots",
                                                  "limits.nodeagent.io/speed": "1", "other": "x"}, defaults)
    assert pod_limits[Limit.HANDSHAKES] == 2 and pod_limits[Limit.DETECTIONS] == 100
    assert len(errors) == 2 and all("using the default" in e for e in errors)


def test_a_pods_own_annotations_cannot_raise_its_limits():
    """A pod's author could switch off pacing and every per-pod limit of the shared proxy."""
    defaults = PodLimits()
    asked = {f"limits.nodeagent.io/{limit.value}": str(limits.MAX_VALUE) for limit in Limit}
    pod_limits, errors = limits.from_annotations(asked, defaults)
    assert pod_limits == defaults
    assert len(errors) == len(Limit) and all("may only lower" in e for e in errors)
    equal = {"limits.nodeagent.io/handshakes": str(defaults[Limit.HANDSHAKES])}  # not a raise
    assert limits.from_annotations(equal, defaults) == (defaults, [])


def test_a_namespaces_annotations_raise_or_lower_and_its_pods_may_lower_below_them():
    defaults = limits.parse("handshakes=8,detections=100")
    namespace = {"limits.nodeagent.io/handshakes": "64", "limits.nodeagent.io/detections": "10",
                 "limits.nodeagent.io/handshake-rate": "0"}
    pod_limits, errors = limits.from_annotations({}, defaults, namespace)
    assert pod_limits[Limit.HANDSHAKES] == 64 and pod_limits[Limit.DETECTIONS] == 10
    assert pod_limits[Limit.HANDSHAKE_RATE] == 50 and errors == [
        "namespace annotation limits.nodeagent.io/handshake-rate: handshake-rate: 0 is not in 1..1000000; "
        "using the node's default"]
    pod = {"limits.nodeagent.io/handshakes": "32", "limits.nodeagent.io/detections": "50"}
    pod_limits, errors = limits.from_annotations(pod, defaults, namespace)
    assert pod_limits[Limit.HANDSHAKES] == 32  # below its namespace's 64, above the node's 8: granted
    assert pod_limits[Limit.DETECTIONS] == 10  # above its namespace's 10: ignored
    assert len(errors) == 2 and "above 10" in errors[1]


def test_a_quota_holds_up_to_its_limit_and_refuses_to_give_more_than_it_took():
    quota = Quota(limits.parse("handshakes=2"))
    assert [quota.take(Limit.HANDSHAKES) for _ in range(3)] == [True, True, False]
    quota.give(Limit.HANDSHAKES)
    assert quota.take(Limit.HANDSHAKES)
    with pytest.raises(RuntimeError):
        Quota(PodLimits()).give(Limit.DETECTIONS)


def test_over_a_count_a_pod_waits_in_turn_for_one_given_back_and_too_many_waiting_are_refused():
    quota = Quota(limits.parse("handshakes=2"))
    served = []

    def waiter(name, present=True):
        def granted():
            if present:
                served.append(name)
            return present
        return granted

    assert [quota.take_or_queue(Limit.HANDSHAKES, waiter(n)) for n in "ab"] == [True, True]
    gone, waiting = waiter("gone", present=False), [waiter(n) for n in "cde"]
    assert quota.take_or_queue(Limit.HANDSHAKES, gone) is False
    assert [quota.take_or_queue(Limit.HANDSHAKES, w) for w in waiting] == [False] * 3
    late = [quota.take_or_queue(Limit.HANDSHAKES, waiter(f"late{i}")) for i in range(5)]
    assert late == [False] * 4 + [None]  # 4 x the limit wait at most: then refused at once
    quota.withdraw(Limit.HANDSHAKES, waiting[1])  # "d" gave up waiting
    quota.give(Limit.HANDSHAKES)  # "gone" is passed over (its waiter left), "c" gets it
    assert served == ["c"] and quota.held[Limit.HANDSHAKES] == 2
    assert quota.take(Limit.HANDSHAKES) is False
    assert quota.take_or_queue(Limit.HANDSHAKES, waiter("x")) is False  # others wait: no one is passed over
    quota.give(Limit.HANDSHAKES)
    quota.give(Limit.HANDSHAKES)
    assert served == ["c", "e", "late0"] and quota.held[Limit.HANDSHAKES] == 2
    quota.limits = limits.parse("handshakes=1")  # lowered live: a slot given back above it goes to no one
    quota.give(Limit.HANDSHAKES)
    assert served == ["c", "e", "late0"] and quota.held[Limit.HANDSHAKES] == 1
    quota.give(Limit.HANDSHAKES)
    assert served[-1] == "late1" and quota.held[Limit.HANDSHAKES] == 1
    quota.limits = limits.parse("handshakes=4")  # raised live: the next arrival wakes those waiting first
    assert quota.take_or_queue(Limit.HANDSHAKES, waiter("y")) is False  # room for three: all three waited longer
    assert served == ["c", "e", "late0", "late1", "late2", "late3", "x"] and quota.held[Limit.HANDSHAKES] == 4
    quota.give(Limit.HANDSHAKES)
    assert served[-1] == "y" and not quota.queued[Limit.HANDSHAKES]


def test_the_queue_for_a_count_is_bounded_absolutely_too():
    quota = Quota(limits.parse(f"handshakes={limits.QUEUED_MAX}"))
    assert all(quota.take(Limit.HANDSHAKES) for _ in range(limits.QUEUED_MAX))
    queued = [quota.take_or_queue(Limit.HANDSHAKES, lambda: True) for _ in range(limits.QUEUED_MAX + 1)]
    assert queued == [False] * limits.QUEUED_MAX + [None]


# --- the connection table ---

class Pod:
    def __init__(self, name: str, text: str = ""):
        self.info = PodInfo("shop", name, name, "node0", "10.244.0.9", "default", {}, {})
        self.quota = Quota(limits.parse(text))

    @property
    def key(self) -> str:
        return self.info.key


class Stats:
    def __init__(self):
        self.read = self.written = self.spliced = 0
        self.closes = 0

    def close(self):
        self.closes += 1


class Metrics:
    def __init__(self):
        self.made = []

    def connection(self, direction, pod, peer, tls):
        self.made.append((direction, pod.key, peer, tls))
        return Stats()


def test_one_pod_at_its_limit_is_refused_and_another_is_not():
    refusals = []
    table = ConnectionTable(100, lambda pod, direction, limit: refusals.append((pod.key, direction, limit)))
    greedy, quiet = Pod("greedy", "outbound-connections=3"), Pod("quiet")
    held = [table.admit(greedy, Direction.OUTBOUND, Phase.OPAQUE) for _ in range(3)]
    assert all(held) and table.admit(greedy, Direction.OUTBOUND, Phase.OPAQUE) is None
    assert refusals == [("shop/greedy", Direction.OUTBOUND, "outbound-connections")]
    assert table.admit(quiet, Direction.OUTBOUND, Phase.OPAQUE) is not None
    assert table.admit(greedy, Direction.INBOUND, Phase.AUTHORIZING) is not None  # its inbound share is apart
    held[0].close()
    assert table.admit(greedy, Direction.OUTBOUND, Phase.OPAQUE) is not None


def test_the_node_limit_holds_across_pods():
    refusals = []
    table = ConnectionTable(2, lambda pod, direction, limit: refusals.append(limit))
    assert table.admit(Pod("a"), Direction.OUTBOUND, Phase.OPAQUE) and table.admit(Pod("b"), Direction.INBOUND,
                                                                                    Phase.OPAQUE)
    assert table.admit(Pod("c"), Direction.OUTBOUND, Phase.OPAQUE) is None and refusals == [NODE_LIMIT]


def test_a_phase_holds_its_share_until_the_connection_leaves_it():
    refusals = []
    table = ConnectionTable(100, lambda pod, direction, limit: refusals.append(limit))
    pod = Pod("p", "detections=1,inbound-handshakes=1")
    first = table.admit(pod, Direction.OUTBOUND, Phase.DETECTING)
    assert table.admit(pod, Direction.OUTBOUND, Phase.DETECTING) is None and refusals == ["detections"]
    assert pod.quota.held[Limit.OUTBOUND_CONNECTIONS] == 1  # the refused one gave its connection back
    first.enter(Phase.HTTP1)
    assert table.admit(pod, Direction.OUTBOUND, Phase.DETECTING) is not None
    mesh = table.admit(pod, Direction.INBOUND, Phase.HANDSHAKING)
    other = table.admit(pod, Direction.INBOUND, Phase.AUTHORIZING)
    with pytest.raises(Refused):
        other.enter(Phase.HANDSHAKING)
    assert pod.quota.held[Limit.HANDSHAKES] == 0  # the pod's own, as client: its clients never take them
    mesh.close()
    assert pod.quota.held[Limit.INBOUND_HANDSHAKES] == 0


def test_a_connection_is_counted_and_closed_exactly_once():
    table = ConnectionTable(100, lambda *a: None)
    pod, metrics = Pod("p"), Metrics()
    connection = table.admit(pod, Direction.INBOUND, Phase.AUTHORIZING)
    stats = connection.label(metrics, "unauthenticated", False)
    assert connection.label(metrics, "someone else", True) is stats and len(metrics.made) == 1
    assert table.live("shop/p") == [connection] and table.open_count == 1
    connection.close(10, 20, 5)
    connection.close(99, 99, 99)
    assert stats.closes == 1 and (stats.read, stats.written, stats.spliced) == (10, 20, 5)
    assert table.live("shop/p") == [] and table.open_count == 0 and table.pods() == []
    assert all(held == 0 for held in pod.quota.held.values())


# --- the problem log ---

class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_problems_are_rate_limited_per_kind_and_say_how_many_were_held_back(caplog):
    clock = Clock()
    problems = ProblemLog(logging.getLogger("test.problems"), clock)
    with caplog.at_level(logging.WARNING, "test.problems"):
        for i in range(60):  # 60 truncated ClientHellos in one instant
            problems.warning("tls", "handshake refused from %s", i)
        problems.warning("deny", "a different kind still gets through")
        clock.t += 5.0
        problems.warning("tls", "later")
    lines = [r.getMessage() for r in caplog.records]
    assert len([line for line in lines if "handshake refused" in line]) == BURST
    assert "a different kind still gets through" in lines
    assert lines[-1] == f"later ({60 - BURST} more like this not logged)"


def test_an_exceptions_traceback_is_logged_once_per_place(caplog):
    problems = ProblemLog(logging.getLogger("test.problems"), Clock())

    def fail():
        raise KeyError("boom")

    with caplog.at_level(logging.ERROR, "test.problems"):
        for _ in range(3):
            try:
                fail()
            except KeyError as e:
                problems.exception("http1", e, "HTTP/1 connection")
    with_traceback = [r for r in caplog.records if r.exc_info]
    assert len(caplog.records) == 3 and len(with_traceback) == 1
    assert "HTTP/1 connection: KeyError: 'boom'" in caplog.records[0].getMessage()


# --- the memory guard ---

class Buffered:
    """A transport holding `size` bytes in its write buffer."""

    def __init__(self, size: int):
        self.size, self.aborted = size, False

    def get_write_buffer_size(self) -> int:
        return self.size

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True


def guarded(rss_mib: list, holdings_mib: dict):
    """A guard with a 100 MiB budget over pods holding what `holdings_mib` says (pod -> [MiB per connection])."""
    from nodeagent.proxy.overload import MemoryGuard

    cuts, trims = [], []
    table = ConnectionTable(1000, lambda *a: None, lambda connection, reason: cuts.append(connection.pod.key))
    for name, sizes in holdings_mib.items():
        pod = Pod(name)
        for size in sizes:
            table.admit(pod, Direction.OUTBOUND, Phase.OPAQUE).hold(Buffered(size << 20))
    guard = MemoryGuard(100 << 20, table, None, rss=lambda: rss_mib[0] << 20, trim=lambda: trims.append(1))
    table.admitting = guard.admits
    return guard, table, cuts, trims


def test_below_the_soft_mark_nothing_happens():
    from nodeagent.proxy.overload import Pressure

    guard, table, cuts, trims = guarded([70], {"a": [30]})
    assert guard.check() is Pressure.NORMAL and cuts == [] and trims == []


def test_memory_the_allocator_kept_is_trimmed_not_refused():
    from nodeagent.proxy.overload import Pressure

    guard, table, cuts, trims = guarded([95], {"a": [1, 1]})
    assert guard.check() is Pressure.NORMAL and trims == [1] and cuts == []
    assert table.admit(Pod("b"), Direction.OUTBOUND, Phase.OPAQUE) is not None


def test_near_the_budget_new_connections_are_refused_until_it_eases():
    from nodeagent.proxy.overload import Pressure

    rss = [90]
    guard, table, cuts, trims = guarded(rss, {"hog": [20, 20]})
    assert guard.check() is Pressure.REFUSING and cuts == []
    assert table.admit(Pod("b"), Direction.OUTBOUND, Phase.OPAQUE) is None
    rss[0] = 50
    assert guard.check() is Pressure.NORMAL
    assert table.admit(Pod("b"), Direction.OUTBOUND, Phase.OPAQUE) is not None


def test_over_the_budget_the_connections_holding_the_most_are_cut_first():
    from nodeagent.proxy.overload import Pressure

    guard, table, cuts, trims = guarded([120], {"hog": [40, 30, 20], "quiet": [1, 1]})
    assert guard.check() is Pressure.SHEDDING
    assert cuts == ["shop/hog", "shop/hog", "shop/hog"] and guard.shed == 3  # the quiet pod keeps its own
