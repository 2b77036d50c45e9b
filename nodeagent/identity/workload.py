"""The certificates of the ServiceAccounts with pods on this node, and the TLS
contexts built from them. Renewed at RENEW_AT of their lifetime; contexts are
replaced, never changed, so established connections keep theirs.

Session resumption never outlives what a certificate proved: a server context's
tickets live at most the certificate's life left at its renewal (and at most
MAX_SESSION_LIFETIME_S); a resumed session whose peer certificate has expired
is refused on both sides (proxy/tls_sessions.py); `on_retire` tells the client-side
session cache to forget the sessions of a context that goes. The server
contexts' ticket keys are the agent's (proxy/tickets.py: the same in each of
its processes, per identity and trust-anchor bundle, rotated by the agent),
so a ticket resumes in whichever process the kernel picks, across a
renewal too; never under other trust anchors.

The agent asks `allow()` for exactly the identities of its node's pods and
can obtain nothing else: `material()` refuses any other identity.
"""

import datetime
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nodeagent.identity import naming
from nodeagent.identity.ca import DAY, Authority, certificate_pem, key_pem, new_key
from nodeagent.proxy import tickets
from nodeagent.proxy.openssl import limit_session_lifetime

log = logging.getLogger("nodeagent.identity")
RENEW_AT = 0.7
MAX_SESSION_LIFETIME_S = 7200  # OpenSSL's default, kept as the ceiling
_PRIVATE_TMP = "/run" if os.access("/run", os.W_OK) else None


class NotOnThisNode(naming.IdentityError):
    pass


@dataclass
class Material:
    identity: naming.Identity
    not_before: float
    not_after: float
    serial: int
    server: ssl.SSLContext
    client: ssl.SSLContext

    def renew_due(self, now: float) -> bool:
        return now >= self.not_before + RENEW_AT * (self.not_after - self.not_before)


def session_lifetime_s(lifetime_s: float) -> int:
    """Tickets issued up to the renewal (at RENEW_AT) must expire with the certificate."""
    return min(MAX_SESSION_LIFETIME_S, int((1 - RENEW_AT) * lifetime_s))


def _contexts(cert_file: str, key_file: str, anchors_pem: bytes,
              session_lifetime: int = MAX_SESSION_LIFETIME_S) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for context in (server, client):
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.verify_mode = ssl.CERT_REQUIRED  # both ways: mutual TLS
        context.load_verify_locations(cadata=anchors_pem.decode())
        context.load_cert_chain(cert_file, key_file)
    client.check_hostname = False  # identities are URIs: checked after the handshake (mesh.peer_identity)
    limit_session_lifetime(server, session_lifetime)
    return server, client


class WorkloadIdentities:
    def __init__(self, issuer: Authority, anchors_pem: bytes, lifetime: datetime.timedelta = DAY,
                 clock: Callable[[], float] = time.time):
        self.issuer = issuer
        self.anchors_pem = anchors_pem
        self.lifetime = lifetime
        self.clock = clock
        self._allowed: set[naming.Identity] = set()
        self._material: dict[naming.Identity, Material] = {}
        self.issued = 0
        self.ticket_secret: tickets.TicketSecret | None = None  # None: OpenSSL's random keys per context
        # Called with each Material that goes (renewed, dropped): its sessions must go too.
        self.on_retire: list[Callable[[Material], None]] = []

    def allow(self, identities: set[naming.Identity]) -> None:
        """The identities of the pods now on this node; material for others is dropped."""
        self._allowed = set(identities)
        for identity in [i for i in self._material if i not in self._allowed]:
            self._retire(self._material.pop(identity))

    def material(self, identity: naming.Identity) -> Material:
        if identity not in self._allowed:
            raise NotOnThisNode(f"refusing an identity for {identity}: no pod of that ServiceAccount on this node")
        current = self._material.get(identity)
        if current is None or current.renew_due(self.clock()):
            current = self._replace(identity)
        return current

    def renew_due(self) -> list[naming.Identity]:
        """Re-issue what reached RENEW_AT of its lifetime; the identities renewed."""
        now = self.clock()
        due = [i for i, m in self._material.items() if m.renew_due(now)]
        for identity in due:
            self._replace(identity)
        return due

    def replace_issuer(self, issuer: Authority, anchors_pem: bytes) -> int:
        """A new issuer or trust-anchor bundle: every identity held is issued again from it (its
        old contexts retire: their sessions are not resumed); how many."""
        self.issuer, self.anchors_pem = issuer, anchors_pem
        held = list(self._material)
        for identity in held:
            self._replace(identity)
        return len(held)

    def use_ticket_secret(self, secret: tickets.TicketSecret) -> None:
        """The agent's ticket secret (at start, and each rotation): installed on every server
        context held now and built from now on."""
        self.ticket_secret = secret
        for material in self._material.values():
            self._install_ticket_keys(material.identity, material.server)

    def _install_ticket_keys(self, identity: naming.Identity, server: ssl.SSLContext) -> None:
        if self.ticket_secret is None:
            return
        if not tickets.install(server, tickets.ticket_keys(self.ticket_secret, identity.uri, self.anchors_pem)):
            log.warning("cannot set the agent's TLS ticket keys in this Python: tickets of %s resume "
                        "only in the process that issued them", identity)

    def _replace(self, identity: naming.Identity) -> Material:
        new = self._issue(identity)
        old, self._material[identity] = self._material.get(identity), new
        if old is not None:
            self._retire(old)
        return new

    def _retire(self, material: Material) -> None:
        for callback in self.on_retire:
            callback(material)

    def _issue(self, identity: naming.Identity) -> Material:
        key = new_key()
        certificate = self.issuer.issue(identity.uri, key.public_key(), self.lifetime)
        # The key touches a file only because ssl loads keys from nowhere else: a private
        # directory on tmpfs (/run) that exists for the length of the load.
        with tempfile.TemporaryDirectory(prefix="nodeagent-identity-", dir=_PRIVATE_TMP) as directory:
            cert_file, key_file = Path(directory, "tls.crt"), Path(directory, "tls.key")
            key_file.touch(mode=0o600)
            key_file.write_bytes(key_pem(key))
            cert_file.write_bytes(certificate_pem(certificate) + self.issuer.chain_pem())
            server, client = _contexts(str(cert_file), str(key_file), self.anchors_pem,
                                       session_lifetime_s(self.lifetime.total_seconds()))
        self._install_ticket_keys(identity, server)
        self.issued += 1
        return Material(identity, certificate.not_valid_before_utc.timestamp(),
                        certificate.not_valid_after_utc.timestamp(), certificate.serial_number, server, client)

    def expirations(self) -> dict[str, float]:
        return {str(i): m.not_after for i, m in self._material.items()}

    def close(self) -> None:
        for material in self._material.values():
            self._retire(material)
        self._material.clear()
