import ipaddress

import pytest

from nodeagent.lab.plan import (
    MAX_NODES,
    MAX_PODS_PER_NODE,
    MESH_LABEL,
    POD_CIDR,
    SERVICE_CIDR,
    WORKLOADS,
    plan_from_dict,
    plan_lab,
    plan_to_dict,
    veth_name,
)


def counter():
    n = iter(range(10**6))
    return lambda: f"uid-{next(n)}"


@pytest.mark.parametrize("nodes,pods", [(1, 1), (2, 5), (3, 7), (MAX_NODES, 3), (2, MAX_PODS_PER_NODE)])
def test_names_addresses_and_links_are_unique_and_in_range(nodes, pods):
    plan = plan_lab(nodes, pods, new_uid=counter())
    assert [n.name for n in plan.nodes] == [f"node{i}" for i in range(nodes)]
    assert len(plan.pods) == nodes * pods
    for attr in ("name", "ip", "uid", "netns", "cgroup"):
        values = [getattr(p, attr) for p in plan.pods]
        assert len(set(values)) == len(values), attr
    for node in plan.nodes:
        subnet = ipaddress.IPv4Network(node.pod_cidr)
        assert subnet.subnet_of(POD_CIDR)
        for pod in (p for p in plan.pods if p.node == node.name):
            assert ipaddress.IPv4Address(pod.ip) in subnet
            assert pod.cgroup.startswith(f"{node.name}/kubepods/besteffort/pod{pod.uid}/")
    for service in plan.services:
        assert ipaddress.IPv4Address(service.cluster_ip) in SERVICE_CIDR


def test_interface_names_fit_the_kernel_limit_at_the_largest_lab():
    assert len(veth_name(MAX_NODES - 1, MAX_PODS_PER_NODE - 1)) <= 15


def test_every_node_gets_one_pod_of_each_kind_first():
    plan = plan_lab(2, len(WORKLOADS), new_uid=counter())
    for node in plan.nodes:
        kinds = [p.workload for p in plan.pods if p.node == node.name]
        assert kinds == [w.kind for w in WORKLOADS]
    assert plan.pod("http-n1-0").node == "node1"
    assert plan.pod("http-n1-0").service_account == "http"


def test_services_exist_only_for_serving_kinds_that_have_pods():
    assert [s.name for s in plan_lab(1, 2, new_uid=counter()).services] == ["http", "h2c"]
    assert "client" not in [s.name for s in plan_lab(1, 5, new_uid=counter()).services]
    http = plan_lab(1, 5, new_uid=counter()).services[0]
    assert (http.port, http.target_port, http.selector) == (80, 8080, {"app": "http"})


def test_admin_ports_follow_the_node_index():
    assert [n.admin_port for n in plan_lab(3, 1, new_uid=counter()).nodes] == [4191, 4192, 4193]


@pytest.mark.parametrize("enroll,value", [(True, "enabled"), (False, "disabled")])
def test_enrolment_label(enroll, value):
    plan = plan_lab(1, 2, enroll, new_uid=counter())
    assert {p.labels[MESH_LABEL] for p in plan.pods} == {value}


@pytest.mark.parametrize("nodes,pods", [(0, 1), (MAX_NODES + 1, 1), (1, 0), (1, MAX_PODS_PER_NODE + 1)])
def test_sizes_out_of_range_are_refused(nodes, pods):
    with pytest.raises(ValueError):
        plan_lab(nodes, pods)


def test_plan_survives_a_round_trip_through_its_state_file_form():
    plan = plan_lab(2, 6, new_uid=counter())
    assert plan_from_dict(plan_to_dict(plan)) == plan


def test_unknown_pod_is_a_key_error():
    with pytest.raises(KeyError):
        plan_lab(1, 1, new_uid=counter()).pod("nope")
