"""SPIFFE identities of Kubernetes ServiceAccounts: pure.

    spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>
"""

import functools
import re
from dataclasses import dataclass

DEFAULT_TRUST_DOMAIN = "cluster.local"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9._]{0,253}[a-z0-9])?$")


class IdentityError(ValueError):
    pass


@dataclass(frozen=True)
class Identity:
    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self):
        if not _TRUST_DOMAIN.match(self.trust_domain):
            raise IdentityError(f"invalid trust domain {self.trust_domain!r}")
        if not _DNS_LABEL.match(self.namespace):
            raise IdentityError(f"invalid namespace {self.namespace!r}")
        if not _DNS_SUBDOMAIN.match(self.service_account):
            raise IdentityError(f"invalid service account {self.service_account!r}")

    @functools.cached_property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def server_name(self) -> str:
        """A DNS-shaped name for TLS SNI (SNI cannot carry a URI)."""
        return f"{self.service_account}.{self.namespace}.serviceaccount.identity.{self.trust_domain}"

    def __str__(self) -> str:
        return self.uri


def parse(uri: str) -> Identity:
    match = re.match(r"^spiffe://([^/]+)/ns/([^/]+)/sa/([^/]+)$", uri)
    if not match:
        raise IdentityError(f"not a ServiceAccount SPIFFE ID: {uri!r}")
    return Identity(*match.groups())


@functools.lru_cache(maxsize=4096)  # built per connection and per request: validated once per name
def of_pod(namespace: str, service_account: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> Identity:
    return Identity(trust_domain, namespace, service_account or "default")
