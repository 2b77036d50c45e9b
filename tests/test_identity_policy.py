import datetime
import ipaddress

import pytest

from nodeagent.identity import naming
from nodeagent.identity.ca import Authority, new_key
from nodeagent.policy.authz import Client, Mode, PodPolicy, authorize, pod_policy

CLUSTER = (ipaddress.ip_network("10.244.0.0/16"),)
ALICE = "spiffe://cluster.local/ns/default/sa/alice"
BOB = "spiffe://cluster.local/ns/default/sa/bob"
OTHER_DOMAIN = "spiffe://partner.example/ns/default/sa/alice"


# --- naming ---

def test_spiffe_id_and_server_name():
    identity = naming.of_pod("payments", "api")
    assert identity.uri == "spiffe://cluster.local/ns/payments/sa/api"
    assert identity.server_name == "api.payments.serviceaccount.identity.cluster.local"
    assert naming.parse(identity.uri) == identity
    assert naming.of_pod("ns", "").service_account == "default"


@pytest.mark.parametrize("uri", ["spiffe://cluster.local/ns/a/sa", "https://x/ns/a/sa/b",
                                 "spiffe://cluster.local/ns/UPPER/sa/b", "spiffe://cluster.local/ns/a/sa/b/c"])
def test_bad_identities_are_refused(uri):
    with pytest.raises(naming.IdentityError):
        naming.parse(uri)


# --- certificates ---

def test_issued_certificates_carry_only_the_spiffe_id_and_chain_to_the_anchor():
    from cryptography import x509

    anchor = Authority.new_anchor("cluster.local")
    issuer = anchor.new_issuer("cluster.local")
    key = new_key()
    leaf = issuer.issue(ALICE, key.public_key(), lifetime=datetime.timedelta(hours=24))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [ALICE]
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc) == datetime.timedelta(hours=24)
    leaf.verify_directly_issued_by(issuer.certificate)
    issuer.certificate.verify_directly_issued_by(anchor.certificate)
    assert issuer.chain == [anchor.certificate]


# --- authorization ---

@pytest.mark.parametrize("mode,client,allowed", [
    (Mode.ALL_UNAUTHENTICATED, Client("192.0.2.9", None), True),
    (Mode.ALL_AUTHENTICATED, Client("10.244.0.5", None), False),
    (Mode.ALL_AUTHENTICATED, Client("10.244.0.5", ALICE), True),
    # Linkerd's meaning: authenticated AND from the cluster (plaintext from the cluster used to pass)
    (Mode.CLUSTER_AUTHENTICATED, Client("10.244.0.5", None), False),
    (Mode.CLUSTER_AUTHENTICATED, Client("10.244.0.5", ALICE), True),
    (Mode.CLUSTER_AUTHENTICATED, Client("192.0.2.9", None), False),
    (Mode.CLUSTER_AUTHENTICATED, Client("192.0.2.9", ALICE), False),
    # a trusted issuer's certificate for another trust domain is not this mesh's member
    (Mode.ALL_AUTHENTICATED, Client("10.244.0.5", OTHER_DOMAIN), False),
    (Mode.CLUSTER_AUTHENTICATED, Client("10.244.0.5", OTHER_DOMAIN), False),
    (Mode.CLUSTER_UNAUTHENTICATED, Client("10.244.1.5", None), True),
    (Mode.CLUSTER_UNAUTHENTICATED, Client("192.0.2.9", ALICE), False),
    (Mode.DENY, Client("10.244.0.5", ALICE), False),
])
def test_modes(mode, client, allowed):
    assert authorize(PodPolicy(mode), 8080, client, CLUSTER).allowed is allowed


def test_another_trust_domain_passes_a_port_list_only_by_name():
    policy = PodPolicy(Mode.DENY, {8080: frozenset({"*"}), 9000: frozenset({OTHER_DOMAIN})})
    assert not authorize(policy, 8080, Client("10.244.0.5", OTHER_DOMAIN), CLUSTER).allowed
    assert authorize(policy, 8080, Client("10.244.0.5", ALICE), CLUSTER).allowed
    assert authorize(policy, 9000, Client("10.244.0.5", OTHER_DOMAIN), CLUSTER).allowed


def test_a_port_allow_list_admits_only_its_identities_whatever_the_mode():
    policy = PodPolicy(Mode.ALL_UNAUTHENTICATED, {8080: frozenset({ALICE}), 9000: frozenset({"*"})})
    assert authorize(policy, 8080, Client("10.244.0.5", ALICE), CLUSTER).allowed
    assert not authorize(policy, 8080, Client("10.244.0.5", BOB), CLUSTER).allowed
    assert not authorize(policy, 8080, Client("10.244.0.5", None), CLUSTER).allowed
    assert authorize(policy, 9000, Client("10.244.0.5", BOB), CLUSTER).allowed
    assert authorize(policy, 7000, Client("192.0.2.1", None), CLUSTER).allowed


def test_pod_policy_from_annotations():
    policy, errors = pod_policy({"config.nodeagent.io/default-inbound-policy": "all-authenticated",
                                 "authz.nodeagent.io/8080": f"{ALICE}, {BOB}", "authz.nodeagent.io/9000": "*"},
                                Mode.ALL_UNAUTHENTICATED)
    assert errors == []
    assert policy == PodPolicy(Mode.ALL_AUTHENTICATED, {8080: frozenset({ALICE, BOB}), 9000: frozenset({"*"})})


def test_bad_policy_annotations_are_reported_and_fail_safe():
    policy, errors = pod_policy({"config.nodeagent.io/default-inbound-policy": "allow-everything",
                                 "authz.nodeagent.io/http": "*", "authz.nodeagent.io/8080": "alice"},
                                Mode.DENY)
    assert policy.mode is Mode.DENY and len(errors) == 3
    assert policy.port_identities == {8080: frozenset()}  # a typo admits no one rather than everyone
