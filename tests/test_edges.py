"""Workload naming and edges from the agents' metrics: pure, with plain values."""

import pytest

from nodeagent.cluster.model import ClusterView
from nodeagent.observe import edges
from nodeagent.observe.workloads import workload_of

TD = "cluster.local"
MESH = {"nodeagent.io/mesh": "enabled"}


@pytest.mark.parametrize("name,labels,expected", [
    ("web-7d4b9c8f6-x2k9p", {"pod-template-hash": "7d4b9c8f6", "app": "web"}, "deploy/web"),
    ("my-api-v2-5f6d7-abcde", {"pod-template-hash": "5f6d7"}, "deploy/my-api-v2"),
    ("db-0", {"statefulset.kubernetes.io/pod-name": "db-0", "controller-revision-hash": "db-6f"}, "sts/db"),
    ("cache-shard-12", {"statefulset.kubernetes.io/pod-name": "cache-shard-12"}, "sts/cache-shard"),
    ("fluent-x7q2z", {"controller-revision-hash": "6c8d", "pod-template-generation": "3"}, "ds/fluent"),
    ("migrate-4xk2p", {"batch.kubernetes.io/job-name": "migrate", "job-name": "migrate"}, "job/migrate"),
    ("old-job-1", {"job-name": "old-job"}, "job/old-job"),
    ("http-n0-0", {"app": "http"}, "app/http"),
    ("x", {"app.kubernetes.io/name": "shop", "app": "other"}, "app/shop"),
    ("debug", {}, "pod/debug"),
    ("odd", {"pod-template-hash": "zzz"}, "pod/odd"),  # a hash not in the name: not a Deployment's pod
])
def test_workload_names(name, labels, expected):
    assert workload_of("ns", name, labels).name == expected
    assert workload_of("ns", name, labels).key == f"ns/{expected}"


def pod(name, ns, ip, labels, sa="default", node="n0"):
    return {"kind": "Pod", "metadata": {"name": name, "namespace": ns, "uid": f"u-{name}", "labels": labels},
            "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"ports": [{"containerPort": 80}]}]},
            "status": {"phase": "Running", "podIP": ip}}


def service(name, ns, ip, selector):
    return {"metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ip, "selector": selector, "ports": [{"port": 80, "targetPort": 80}]}}


def view():
    return ClusterView(
        [pod("web-5f-aaaaa", "shop", "10.244.0.10", {"pod-template-hash": "5f", "app": "web", **MESH}, sa="web"),
         pod("api-6c-bbbbb", "shop", "10.244.1.10", {"pod-template-hash": "6c", "app": "api", **MESH}, sa="api"),
         pod("api-6c-ccccc", "shop", "10.244.1.11", {"pod-template-hash": "6c", "app": "api", **MESH}, sa="api"),
         pod("legacy-0", "shop", "10.244.1.12", {"app": "api"}, sa="legacy"),  # behind the same Service, unmeshed
         pod("db-0", "data", "10.244.1.20", {"statefulset.kubernetes.io/pod-name": "db-0", **MESH}, sa="db"),
         pod("curl", "shop", "10.244.0.30", {})],
        [service("api", "shop", "10.96.0.1", {"app": "api"}), service("web", "shop", "10.96.0.2", {"app": "web"})])


def out(name, value, pod, peer, tls, **extra):
    return name, {"direction": "outbound", "namespace": pod.split("/")[0], "pod": pod.split("/")[1], "peer": peer,
                  "tls": str(tls).lower(), **extra}, value


def inb(name, value, pod, peer, tls, **extra):
    return name, {"direction": "inbound", "namespace": pod.split("/")[0], "pod": pod.split("/")[1], "peer": peer,
                  "tls": str(tls).lower(), **extra}, value


WEB = "shop/web-5f-aaaaa"
WEB_ID, API_ID, DB_ID = (f"spiffe://{TD}/ns/shop/sa/web", f"spiffe://{TD}/ns/shop/sa/api",
                         f"spiffe://{TD}/ns/data/sa/db")


def test_outbound_series_become_client_edges_with_both_identities():
    samples = [
        out("request_total", 10, WEB, "svc/shop/web", True),  # to itself, one workload behind the Service
        out("response_total", 9, WEB, "svc/shop/web", True, classification="success", status_code="200"),
        out("response_total", 1, WEB, "svc/shop/web", True, classification="failure", status_code="503"),
        out("tcp_open_total", 2, WEB, "svc/shop/web", True),
        out("tcp_open_connections", 1, WEB, "svc/shop/web", True),
        out("tcp_read_bytes_total", 100, WEB, "svc/shop/web", True),
        out("tcp_write_bytes_total", 300, WEB, "svc/shop/web", True),
        out("tcp_open_total", 3, WEB, "pod/data/db-0", True),
        out("tcp_open_total", 4, WEB, "external", False),
        out("request_total", 5, WEB, "svc/shop/api", False),  # api + legacy: two workloads behind it
        out("request_created", 1e9, WEB, "svc/shop/web", True),  # not a count
        ("tcp_open_total", {"direction": "outbound", "namespace": "gone", "pod": "x", "peer": "external",
                            "tls": "false"}, 7),  # a pod no longer in the view
    ]
    found = {(e.dst_namespace, e.dst): e for e in edges.agent_edges(samples, view(), TD)}
    web = found[("shop", "deploy/web")]
    assert (web.src_namespace, web.src, web.client_id, web.server_id, web.tls, web.seen_by) == (
        "shop", "deploy/web", WEB_ID, WEB_ID, True, "client")
    assert (web.requests, web.successes, web.failures, web.connections, web.open, web.bytes_read,
            web.bytes_written) == (10, 9, 1, 2, 1, 100, 300)
    db = found[("data", "sts/db")]
    assert db.server_id == DB_ID and db.connections == 3
    external = found[("", "external")]
    assert (external.client_id, external.server_id, external.tls, external.connections) == ("", "", False, 4)
    api = found[("shop", "svc/api")]  # several workloads: named by the Service; plaintext, so no identities
    assert (api.client_id, api.server_id, api.requests) == ("", "", 5)
    assert len(found) == 4


def test_an_http_connections_tcp_counts_join_the_edge_its_requests_took():
    """An outbound HTTP connection's TCP series say tls=false (the app's side); its requests
    say how they went."""
    secured = [out("request_total", 4, WEB, "svc/shop/web", True),
               out("tcp_open_total", 1, WEB, "svc/shop/web", False),
               out("tcp_read_bytes_total", 50, WEB, "svc/shop/web", False)]
    (edge,) = edges.agent_edges(secured, view(), TD)
    assert (edge.tls, edge.requests, edge.connections, edge.bytes_read, edge.client_id) == (True, 4, 1, 50, WEB_ID)
    mixed = secured + [out("request_total", 1, WEB, "svc/shop/web", False)]  # some went in plaintext
    found = {e.tls: e for e in edges.agent_edges(mixed, view(), TD)}
    assert (found[True].requests, found[True].connections, found[False].requests, found[False].connections) == (
        4, 0, 1, 1)
    opaque = [out("tcp_open_total", 2, WEB, "pod/shop/curl", False)]  # no requests: as labelled
    assert [e.tls for e in edges.agent_edges(opaque, view(), TD)] == [False]


def test_a_service_of_one_meshed_workload_names_its_identity_once():
    samples = [out("tcp_open_total", 1, WEB, "svc/shop/web", True)]
    (edge,) = edges.agent_edges(samples, view(), TD)
    assert edge.server_id == WEB_ID


def test_inbound_series_become_server_edges():
    samples = [
        inb("tcp_open_total", 2, "shop/api-6c-bbbbb", WEB_ID, True),
        inb("tcp_open_total", 3, "shop/api-6c-ccccc", WEB_ID, True),  # the same workload: one edge
        inb("tcp_open_total", 4, "shop/api-6c-bbbbb", "unauthenticated", False),
        inb("tcp_open_total", 1, "data/db-0", f"spiffe://{TD}/ns/shop/sa/nobody", True),
        inb("request_total", 6, "shop/api-6c-bbbbb", WEB_ID, True),  # once inbound HTTP is counted
    ]
    found = {(e.src, e.dst): e for e in edges.agent_edges(samples, view(), TD)}
    meshed = found[("deploy/web", "deploy/api")]
    assert (meshed.client_id, meshed.server_id, meshed.connections, meshed.requests, meshed.seen_by) == (
        WEB_ID, API_ID, 5, 6, "server")
    unmeshed = found[("unmeshed", "deploy/api")]
    assert (unmeshed.src_namespace, unmeshed.client_id, unmeshed.server_id, unmeshed.tls) == ("", "", "", False)
    stranger = found[("sa/nobody", "sts/db")]  # an identity no meshed workload runs as
    assert stranger.src_namespace == "shop" and stranger.client_id.endswith("/sa/nobody")


def test_merge_counts_a_meshed_edge_once_and_marks_it_verified():
    client_side = edges.agent_edges([out("tcp_open_total", 5, WEB, "pod/data/db-0", True),
                                     out("tcp_open_total", 1, WEB, "external", False)], view(), TD)
    server_side = edges.agent_edges([inb("tcp_open_total", 5, "data/db-0", WEB_ID, True),
                                     inb("tcp_open_total", 2, "data/db-0", "unauthenticated", False)], view(), TD)
    merged = edges.merge([client_side, server_side])
    assert [(e.src, e.dst, e.seen_by, e.verified, e.connections) for e in merged] == [
        ("unmeshed", "sts/db", "server", False, 2),
        ("deploy/web", "external", "client", False, 1),
        ("deploy/web", "sts/db", "client", True, 5),
    ]
    # Without the client's agent, the server's view of the mesh edge is kept.
    assert [(e.src, e.seen_by) for e in edges.merge([server_side])] == [("unmeshed", "server"),
                                                                         ("deploy/web", "server")]


def test_merge_adds_the_same_edge_from_two_agents():
    one = edges.agent_edges([out("request_total", 2, WEB, "svc/shop/api", False)], view(), TD)
    other = edges.agent_edges([out("request_total", 3, WEB, "svc/shop/api", False)], view(), TD)
    (edge,) = edges.merge([one, other])
    assert edge.requests == 5 and one[0].requests == 2  # the inputs are left alone


def test_document_round_trips_and_lists_enrolled_pods():
    v = view()
    document = edges.document("n0", [out("tcp_open_total", 1, WEB, "external", False)], v, TD,
                              [v.pods[WEB]])
    assert document["pods"] == [{"pod": WEB, "namespace": "shop", "workload": "deploy/web", "identity": WEB_ID,
                                 "node": "n0"}]
    assert document["workloads"] == [
        {"namespace": "data", "workload": "sts/db", "pods": 1}, {"namespace": "shop", "workload": "app/api", "pods": 1},
        {"namespace": "shop", "workload": "deploy/api", "pods": 2}, {"namespace": "shop", "workload": "deploy/web",
                                                                      "pods": 1},
        {"namespace": "shop", "workload": "pod/curl", "pods": 1}]
    assert document["peers"] == {"external": {"namespace": "", "workload": "external"}}
    assert edges.from_document(document) == edges.agent_edges([out("tcp_open_total", 1, WEB, "external", False)],
                                                              v, TD)


def test_merge_counts_once_a_service_of_several_workloads():
    """A canary: the client sees `svc/api` (two workloads behind it), each server its own workload;
    the requests are the client's, counted once, and verified by the servers' identity."""
    canary = ClusterView(
        [pod("web-5f-aaaaa", "shop", "10.244.0.10", {"pod-template-hash": "5f", "app": "web", **MESH}, sa="web"),
         pod("api-v1-6c-bbbbb", "shop", "10.244.1.10", {"pod-template-hash": "6c", "app": "api", **MESH}, sa="api"),
         pod("api-v2-7d-ccccc", "shop", "10.244.1.11", {"pod-template-hash": "7d", "app": "api", **MESH}, sa="api")],
        [service("api", "shop", "10.96.0.1", {"app": "api"})])
    client_side = edges.agent_edges([out("request_total", 100, WEB, "svc/shop/api", True)], canary, TD)
    server_side = edges.agent_edges([inb("request_total", 60, "shop/api-v1-6c-bbbbb", WEB_ID, True),
                                     inb("request_total", 40, "shop/api-v2-7d-ccccc", WEB_ID, True)], canary, TD)
    merged = edges.merge([client_side, server_side])
    assert [(e.dst, e.seen_by, e.verified, e.requests) for e in merged] == [("svc/api", "client", True, 100)]
