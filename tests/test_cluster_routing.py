import pytest

from nodeagent.cluster.model import ClusterView
from nodeagent.lab.manifests import namespace_manifest, pod_manifest, service_manifest
from nodeagent.lab.plan import plan_lab
from nodeagent.proxy import service_config as sc
from nodeagent.proxy.routing import Passthrough, ToPod, ToService, route


def lab_view(**namespace_labels):
    plan = plan_lab(2, 5)
    namespace = namespace_manifest("default")
    namespace["metadata"]["labels"] = namespace_labels
    return plan, ClusterView([pod_manifest(p) for p in plan.pods], [service_manifest(s) for s in plan.services],
                             [namespace])


def test_service_vip_routes_to_its_endpoints_on_the_target_port():
    plan, view = lab_view()
    decision = route(view, "10.96.0.10", 80)
    assert isinstance(decision, ToService) and decision.service.name == "http"
    assert [(e.ip, e.port) for e in decision.endpoints] == [(plan.pod("http-n0-0").ip, 8080),
                                                            (plan.pod("http-n1-0").ip, 8080)]


def test_pod_ip_routes_to_the_pod_and_anything_else_passes_through():
    plan, view = lab_view()
    pod = plan.pod("echo-n1-0")
    assert route(view, pod.ip, 9000) == ToPod(view.pod_by_ip[pod.ip], 9000)
    assert route(view, "10.96.0.10", 81) == Passthrough("10.96.0.10", 81)  # VIP, but not a Service port
    assert route(view, "192.0.2.7", 443) == Passthrough("192.0.2.7", 443)


def test_named_target_ports_resolve_per_pod():
    pod = {"metadata": {"name": "a", "namespace": "ns", "labels": {"app": "a"}},
           "spec": {"containers": [{"ports": [{"name": "web", "containerPort": 8000}]}]},
           "status": {"podIP": "10.244.0.5"}}
    other = {"metadata": {"name": "b", "namespace": "ns", "labels": {"app": "a"}},
             "spec": {"containers": [{}]}, "status": {"podIP": "10.244.0.6"}}
    service = {"metadata": {"name": "a", "namespace": "ns"},
               "spec": {"clusterIP": "10.96.5.5", "selector": {"app": "a"},
                        "ports": [{"port": 80, "targetPort": "web"}]}}
    decision = route(ClusterView([pod, other], [service]), "10.96.5.5", 80)
    assert [(e.ip, e.port) for e in decision.endpoints] == [("10.244.0.5", 8000)]


def test_selectorless_headless_and_other_namespace_services():
    plan, _ = lab_view()
    headless = {"metadata": {"name": "h", "namespace": "default"},
                "spec": {"clusterIP": "None", "selector": {"app": "http"}, "ports": [{"port": 80}]}}
    manual = {"metadata": {"name": "m", "namespace": "default"},
              "spec": {"clusterIP": "10.96.9.9", "ports": [{"port": 80}]}}
    elsewhere = {"metadata": {"name": "x", "namespace": "other"},
                 "spec": {"clusterIP": "10.96.9.10", "selector": {"app": "http"}, "ports": [{"port": 80}]}}
    view = ClusterView([pod_manifest(p) for p in plan.pods], [headless, manual, elsewhere])
    assert "default/h" not in view.services
    assert route(view, "10.96.9.9", 80).endpoints == ()
    assert route(view, "10.96.9.10", 80).endpoints == ()


def test_malformed_objects_are_reported_and_skipped():
    view = ClusterView([{"kind": "Pod", "metadata": {}, "status": {"podIP": "10.244.0.1"}},
                        {"kind": "Pod", "metadata": {"name": "x", "namespace": "n"}, "status": {"podIP": "nope"}}],
                       [{"kind": "Service", "spec": {"clusterIP": "10.96.0.1"}}])
    assert view.pods == {} and view.services == {} and len(view.errors) == 3


@pytest.mark.parametrize("pod_label,ns_label,meshed", [
    ("enabled", None, True), ("disabled", None, False), (None, None, False),
    (None, "enabled", True), ("disabled", "enabled", False), ("enabled", "disabled", True),
])
def test_opt_in_by_pod_or_namespace_label(pod_label, ns_label, meshed):
    labels = {"nodeagent.io/mesh": pod_label} if pod_label else {}
    pod = {"metadata": {"name": "p", "namespace": "ns", "labels": labels}, "status": {"podIP": "10.244.0.9"}}
    namespace = {"metadata": {"name": "ns", "labels": {"nodeagent.io/mesh": ns_label} if ns_label else {}}}
    view = ClusterView([pod], [], [namespace])
    assert view.meshed(view.pods["ns/p"]) is meshed


def test_pods_on_a_node_and_finished_pods():
    plan, view = lab_view()
    assert [p.name for p in view.pods_on("node1")] == sorted(p.name for p in plan.pods if p.node == "node1")
    done = pod_manifest(plan.pods[0])
    done["status"]["phase"] = "Succeeded"
    assert ClusterView([done]).pods == {}


# --- per-Service configuration ---

def test_annotations_parse():
    config, errors = sc.from_annotations({
        sc.PREFIX_OPAQUE: "9000, 3306,8000-8002", sc.RETRY_HTTP: "gateway-error,429", sc.RETRY_LIMIT: "3",
        sc.TIMEOUT_REQUEST: "1.5s", sc.TIMEOUT_IDLE: "2m", sc.TIMEOUT_CONNECT: "250ms"})
    assert errors == []
    assert config.opaque_ports == {9000, 3306, 8000, 8001, 8002}
    assert config.retry_statuses == {502, 503, 504, 429}
    assert (config.retry_limit, config.request_timeout_s, config.idle_timeout_s, config.connect_timeout_s) == (
        3, 1.5, 120.0, 0.25)
    assert sc.from_annotations({sc.RETRY_HTTP: "5xx"})[0].retries_status(599)


@pytest.mark.parametrize("key,value", [
    (sc.PREFIX_OPAQUE, "0"), (sc.PREFIX_OPAQUE, "9-1"), (sc.PREFIX_OPAQUE, "http"),
    (sc.RETRY_HTTP, "4xx"), (sc.RETRY_HTTP, "99"), (sc.RETRY_LIMIT, "11"), (sc.RETRY_LIMIT, "x"),
    (sc.TIMEOUT_REQUEST, "10"), (sc.TIMEOUT_REQUEST, "0s"), (sc.TIMEOUT_IDLE, "-1s"),
])
def test_bad_annotations_fall_back_to_defaults_with_a_message(key, value):
    config, errors = sc.from_annotations({key: value})
    assert config == sc.DEFAULT
    assert len(errors) == 1 and errors[0].startswith(key)
