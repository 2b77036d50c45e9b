"""The hop plan (proxy/hop.py), as a table: every kind of destination, and what it gives."""

import pytest

from nodeagent.cluster.model import PodInfo
from nodeagent.identity import naming
from nodeagent.ports import INBOUND_PORT, MESH_PORT, OUTBOUND_PORT
from nodeagent.proxy.hop import PROXY_PORT_REASON, Hint, Hop, HopKind, plan_hop

POD = PodInfo("shop", "cart-0", "uid", "node0", "10.244.1.12", "cart", {}, {})
TD = "cluster.local"
CART = naming.of_pod("shop", "cart", TD)


def plan(address=("10.244.1.12", 9000), destination=POD, meshed=True, served_here=False, on_node_plaintext=False,
         hint=Hint.OPAQUE):
    return plan_hop(address, destination, meshed=meshed, served_here=served_here,
                    on_node_plaintext=on_node_plaintext, hint=hint, trust_domain=TD)


@pytest.mark.parametrize("case, kwargs, expected", [
    ("outside the cluster", dict(address=("192.0.2.1", 443), destination=None),
     Hop(HopKind.PLAIN, ("192.0.2.1", 443), 443)),
    ("a pod outside the mesh", dict(meshed=False),
     Hop(HopKind.PLAIN, ("10.244.1.12", 9000), 9000, destination=POD)),
    ("a pod outside the mesh, on a port the proxy uses elsewhere", dict(address=("10.244.1.12", 4143), meshed=False),
     Hop(HopKind.PLAIN, ("10.244.1.12", 4143), 4143, destination=POD)),
    ("a meshed pod elsewhere", dict(),
     Hop(HopKind.MESH, ("10.244.1.12", MESH_PORT), 9000, Hint.OPAQUE, CART, POD)),
    ("a meshed pod, HTTP/1", dict(address=("10.244.1.12", 8080), hint=Hint.HTTP1),
     Hop(HopKind.MESH, ("10.244.1.12", MESH_PORT), 8080, Hint.HTTP1, CART, POD)),
    ("a meshed pod, HTTP/2", dict(address=("10.244.1.12", 8081), hint=Hint.H2),
     Hop(HopKind.MESH, ("10.244.1.12", MESH_PORT), 8081, Hint.H2, CART, POD)),
    ("a meshed pod on this node, on-node plaintext off", dict(served_here=True),
     Hop(HopKind.MESH, ("10.244.1.12", MESH_PORT), 9000, Hint.OPAQUE, CART, POD)),
    ("a meshed pod on this node, on-node plaintext on, opaque", dict(served_here=True, on_node_plaintext=True),
     Hop(HopKind.ON_NODE, ("10.244.1.12", 9000), 9000, destination=POD)),
    ("a meshed pod on this node, on-node plaintext on, HTTP/1", dict(served_here=True, on_node_plaintext=True,
                                                                       hint=Hint.HTTP1),
     Hop(HopKind.ON_NODE, ("10.244.1.12", 9000), 9000, Hint.HTTP1, destination=POD)),
    ("a meshed pod on this node, on-node plaintext on, HTTP/2", dict(served_here=True, on_node_plaintext=True,
                                                                       hint=Hint.H2),
     Hop(HopKind.ON_NODE, ("10.244.1.12", 9000), 9000, Hint.H2, destination=POD)),
    ("a meshed pod on this node, on-node plaintext on, not detected yet (an early connection)",
     dict(served_here=True, on_node_plaintext=True, hint=Hint.UNDETECTED),
     Hop(HopKind.ON_NODE, ("10.244.1.12", 9000), 9000, Hint.UNDETECTED, destination=POD)),
    ("a meshed pod elsewhere, not detected yet: the destination detects", dict(hint=Hint.UNDETECTED),
     Hop(HopKind.MESH, ("10.244.1.12", MESH_PORT), 9000, Hint.UNDETECTED, CART, POD)),
    ("on-node plaintext on, but the pod is elsewhere", dict(on_node_plaintext=True),
     Hop(HopKind.MESH, ("10.244.1.12", MESH_PORT), 9000, Hint.OPAQUE, CART, POD)),
])
def test_plan(case, kwargs, expected):
    assert plan(**kwargs) == expected


@pytest.mark.parametrize("port", [OUTBOUND_PORT, INBOUND_PORT, MESH_PORT])
@pytest.mark.parametrize("served_here", [False, True])
@pytest.mark.parametrize("hint", list(Hint))
def test_a_meshed_pods_proxy_ports_are_never_a_destination(port, served_here, hint):
    hop = plan(address=("10.244.1.12", port), served_here=served_here, on_node_plaintext=True, hint=hint)
    assert hop.kind is HopKind.REFUSED and hop.connect_to is None and hop.reason == PROXY_PORT_REASON


def test_the_expected_identity_is_the_destinations_service_account_and_default_when_unset():
    default_sa = PodInfo("shop", "cart-1", "uid", "node0", "10.244.1.13", "", {}, {})
    hop = plan(address=("10.244.1.13", 80), destination=default_sa)
    assert hop.expected.uri == "spiffe://cluster.local/ns/shop/sa/default" and hop.tls


def test_identities_are_built_once_per_name():
    assert naming.of_pod("shop", "cart", TD) is naming.of_pod("shop", "cart", TD)
