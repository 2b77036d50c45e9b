"""Views made by deltas: the same as a view built whole from the same objects, endpoints kept
where nothing changed, dual-stack objects kept and their IPv6 side listed as not served, and
workers given deltas instead of whole views. Pure: plain objects in, views out."""

import pickle
import random

from nodeagent.agent.workers import view_message
from nodeagent.cluster.kube import Store
from nodeagent.cluster.model import ClusterView, Delta, object_key

NAMESPACES = ("default", "shop")


def pod(name, ns, ip, labels, node="node0", ips=None):
    status = {"phase": "Running", "podIP": ip}
    if ips:
        status["podIPs"] = [{"ip": a} for a in ips]
    return {"kind": "Pod", "metadata": {"name": name, "namespace": ns, "uid": f"u-{ns}-{name}", "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 80}]}]},
            "status": status}


def service(name, ns, ip, selector, ips=None):
    spec = {"clusterIP": ip, "selector": selector, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}
    if ips:
        spec["clusterIPs"] = ips
    return {"kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def endpoint_slice(name, ns, svc, addresses, address_type="IPv4"):
    return {"kind": "EndpointSlice", "metadata": {"name": name, "namespace": ns,
                                                  "labels": {"kubernetes.io/service-name": svc}},
            "addressType": address_type, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses]}


def namespace(name, labels):
    return {"kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def summary(view: ClusterView) -> dict:
    return {"pods": dict(view.pods), "services": dict(view.services), "by_ip": dict(view.pod_by_ip),
            "by_address": dict(view.service_by_address), "unserved": dict(view.unserved),
            "namespaces": dict(view.namespace_labels),
            "namespace_annotations": dict(view.namespace_annotations),
            "endpoints": {(s.key, p.port): view.endpoints(s, p) for s in view.services.values() for p in s.ports},
            "meshed": {k: view.meshed(p) for k, p in view.pods.items()}}


def random_object(rng: random.Random, kind: str) -> dict:
    ns = rng.choice(NAMESPACES)
    n = rng.randrange(12)
    if kind == "pods":
        labels = {"app": rng.choice("ab")}
        if rng.random() < 0.3:
            labels["nodeagent.io/mesh"] = rng.choice(["enabled", "disabled"])
        ips = rng.choice([None, [f"10.244.{NAMESPACES.index(ns)}.{n + 1}", f"fd00::{NAMESPACES.index(ns)}:{n + 1}"]])
        return pod(f"p{n}", ns, f"10.244.{NAMESPACES.index(ns)}.{n + 1}", labels, ips=ips)
    if kind == "services":
        app = rng.choice("ab")  # cluster IPs are unique, as the API server makes them
        return service(f"s{app}{n % 3}", ns, f"10.96.{NAMESPACES.index(ns)}.{'ab'.index(app) * 3 + n % 3 + 1}",
                       {"app": app})
    if kind == "endpointslices":
        svc = f"s{rng.choice('ab')}{n % 3}"
        addresses = [f"10.244.{NAMESPACES.index(ns)}.{rng.randrange(12) + 1}" for _ in range(rng.randrange(3))]
        return endpoint_slice(f"{svc}-{rng.randrange(2)}", ns, svc, addresses)
    return namespace(ns, {"nodeagent.io/mesh": "enabled"} if rng.random() < 0.5 else {})


def test_a_view_made_by_deltas_is_the_view_built_whole_from_the_same_objects():
    for seed in range(20):
        rng = random.Random(seed)
        for uses_slices in (True, False):
            objects = {kind: {} for kind in ("pods", "services", "namespaces", "endpointslices")}
            view = ClusterView(endpoint_slices=[] if uses_slices else None)
            for _ in range(15):
                delta = Delta()
                for _ in range(rng.randrange(1, 6)):
                    kind = rng.choice(list(objects))
                    obj = random_object(rng, kind)
                    key = object_key(obj)
                    if key in objects[kind] and rng.random() < 0.3:
                        del objects[kind][key]
                        delta.parse(kind, key, None)
                    else:
                        objects[kind][key] = obj
                        delta.parse(kind, key, obj)
                summary(view)  # fill the endpoint cache, so stale entries would show
                view = view.apply(delta)
                whole = ClusterView(list(objects["pods"].values()), list(objects["services"].values()),
                                    list(objects["namespaces"].values()),
                                    list(objects["endpointslices"].values()) if uses_slices else None)
                assert summary(view) == summary(whole), (seed, uses_slices)


def test_endpoints_are_kept_for_what_a_delta_does_not_touch():
    view = ClusterView([pod("a", "default", "10.244.0.1", {"app": "a"}), pod("b", "shop", "10.244.1.1", {"app": "b"})],
                       [service("sa", "default", "10.96.0.1", {"app": "a"}),
                        service("sb", "shop", "10.96.1.1", {"app": "b"})],
                       endpoint_slices=[endpoint_slice("sa-1", "default", "sa", ["10.244.0.1"]),
                                        endpoint_slice("sb-1", "shop", "sb", ["10.244.1.1"])])
    sa, sb = view.services["default/sa"], view.services["shop/sb"]
    before_a, before_b = view.endpoints(sa, sa.ports[0]), view.endpoints(sb, sb.ports[0])
    delta = Delta()
    delta.parse("endpointslices", "shop/sb-1", endpoint_slice("sb-1", "shop", "sb", ["10.244.1.1", "10.244.1.2"]))
    after = view.apply(delta)
    assert after.endpoints(sa, sa.ports[0]) is before_a  # untouched: not recomputed
    assert [e.ip for e in after.endpoints(sb, sb.ports[0])] == ["10.244.1.1", "10.244.1.2"]
    assert [e.ip for e in view.endpoints(sb, sb.ports[0])] == ["10.244.1.1"] and before_b  # old view unchanged


def test_dual_stack_objects_are_kept_and_their_ipv6_side_listed_as_not_served():
    view = ClusterView(
        [pod("dual", "default", "10.244.0.1", {"app": "a"}, ips=["10.244.0.1", "fd00::1"]),
         pod("v6", "default", "fd00::2", {"app": "a"}, ips=["fd00::2"])],
        [service("dual", "default", "10.96.0.5", {"app": "a"}, ips=["10.96.0.5", "fd00:96::5"]),
         service("v6", "default", "fd00:96::6", {"app": "a"}, ips=["fd00:96::6"])],
        endpoint_slices=[endpoint_slice("dual-4", "default", "dual", ["10.244.0.1"]),
                         endpoint_slice("dual-6", "default", "dual", ["fd00::1", "fd00::2"], "IPv6")])
    assert set(view.pods) == {"default/dual", "default/v6"}  # none skipped
    assert view.pods["default/dual"].ip == "10.244.0.1" and view.pods["default/v6"].ip == ""
    assert view.pod_by_ip["fd00::1"] is view.pods["default/dual"]
    dual = view.services["default/dual"]
    assert view.service_by_address[("10.96.0.5", 80)][0] is dual
    assert [e.ip for e in view.endpoints(dual, dual.ports[0])] == ["10.244.0.1"]
    assert set(view.unserved) == {"pod default/v6", "service default/dual", "service default/v6",
                                  "endpointslice default/dual-6"}
    assert "fd00:96::5" in view.unserved["service default/dual"]


def test_workers_get_a_delta_not_the_whole_view():
    pods = [pod(f"p{i}", "default", f"10.244.{i // 250}.{i % 250 + 1}", {"app": "a"}) for i in range(2000)]
    first = ClusterView(pods, [], [namespace("default", {})], endpoint_slices=[])
    delta = Delta()
    delta.parse("pods", "default/p7", pod("p7", "default", "10.244.0.8", {"app": "b"}))
    second = first.apply(delta)
    kind, sent, version = view_message(first, second)
    assert (kind, version) == ("delta", second.version) and sent is delta
    assert len(pickle.dumps(view_message(first, second))) * 100 < len(pickle.dumps(view_message(None, second)))
    assert view_message(None, second)[0] == "view"  # a new worker gets it whole
    assert view_message(first, second.apply(Delta()))[0] == "view"  # a skipped version: whole again
    # The worker's copy, made from the whole view and the delta, is the agent's.
    copy = pickle.loads(pickle.dumps(first)).apply(pickle.loads(pickle.dumps(delta)))
    assert summary(copy) == summary(second)


def test_a_relist_reports_only_what_changed():
    store = Store()
    objects = [pod(f"p{i}", "default", f"10.244.0.{i + 1}", {}) for i in range(5)]
    store.replace("pods", objects)
    assert set(store.take().pods) == {f"default/p{i}" for i in range(5)}
    objects[1] = pod("p1", "default", "10.244.0.2", {"new": "label"})
    store.replace("pods", objects[1:])
    delta = store.take()
    assert delta.pods.keys() == {"default/p0", "default/p1"} and delta.pods["default/p0"] is None
