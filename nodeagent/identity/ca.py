"""Trust anchors, issuers and workload certificates (ECDSA P-256, X.509).

`nodeagent identity init` makes a trust anchor (self-signed root) and an
issuer (an intermediate CA signed by the anchor). Agents hold the issuer and
sign one short-lived certificate per ServiceAccount on their node, with the
SPIFFE ID as the only SAN (a URI), for both TLS client and server use.
"""

import base64
import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

YEAR = datetime.timedelta(days=365)
DAY = datetime.timedelta(hours=24)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _ca_certificate(subject: str, key, issuer_name: x509.Name, signing_key, lifetime: datetime.timedelta,
                    path_length: int, not_before: datetime.datetime | None = None) -> x509.Certificate:
    """A CA certificate. It names its signer's key (AKID): during a trust-anchor rollover two
    anchors share a name, and the key identifier is how a verifier tells them apart."""
    start = not_before or _now() - datetime.timedelta(minutes=1)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
                           critical=False)
            .sign(signing_key, hashes.SHA256()))


@dataclass
class Authority:
    """A CA: its certificate, its key, and the chain above it (anchor last)."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: list[x509.Certificate]

    @classmethod
    def new_anchor(cls, trust_domain: str, lifetime: datetime.timedelta = YEAR) -> "Authority":
        key = new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"root.{trust_domain}")])
        return cls(_ca_certificate(f"root.{trust_domain}", key, name, key, lifetime, 1), key, [])

    def new_issuer(self, trust_domain: str, lifetime: datetime.timedelta = YEAR) -> "Authority":
        key = new_key()
        certificate = _ca_certificate(f"identity.{trust_domain}", key, self.certificate.subject, self.key, lifetime, 0)
        return Authority(certificate, key, [self.certificate, *self.chain])

    def issue(self, spiffe_id: str, public_key, lifetime: datetime.timedelta = DAY,
              not_before: datetime.datetime | None = None) -> x509.Certificate:
        # Valid slightly before now, for peers whose clocks lag, but never for a big part of a short lifetime.
        start = not_before or _now() - min(datetime.timedelta(minutes=1), lifetime / 10)
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([]))
                .issuer_name(self.certificate.subject)
                .public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(start)
                .not_valid_after(start + lifetime)
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                             crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                               critical=False)
                .sign(self.key, hashes.SHA256()))

    # --- PEM ---

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return key_pem(self.key)

    def chain_pem(self) -> bytes:
        """This CA's certificate and the intermediates above it, anchor excluded."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [self.certificate, *self.chain[:-1]])


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


ISSUER_FILES = ("ca.crt", "issuer.crt", "issuer.key")  # the issuer Secret's keys, as `identity init` names them


def load_issuer(directory: Path) -> tuple[Authority, bytes]:
    """(the issuer, the trust-anchor bundle PEM) from files named as `identity init` writes them."""
    return issuer_from_pem(*(read_issuer_files(directory)))


def read_issuer_files(directory: Path) -> tuple[bytes, bytes, bytes]:
    """ca.crt, issuer.crt, issuer.key, as they are now."""
    return tuple((directory / name).read_bytes() for name in ISSUER_FILES)


def issuer_from_pem(anchors: bytes, issuer_crt: bytes, issuer_key: bytes) -> tuple[Authority, bytes]:
    """ValueError unless the key is the certificate's (a Secret caught halfway through an update
    can pair one issuer's certificate with another's key) and an ECDSA key."""
    certificates = x509.load_pem_x509_certificates(issuer_crt)
    key = serialization.load_pem_private_key(issuer_key, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the issuer key must be an ECDSA key")
    if key.public_key().public_numbers() != certificates[0].public_key().public_numbers():
        raise ValueError("issuer.key is not the key of issuer.crt")
    x509.load_pem_x509_certificates(anchors)  # ValueError if the bundle holds no certificate
    return Authority(certificates[0], key, certificates[1:]), anchors


def check_chains_to_anchors(issuer: Authority, anchors_pem: bytes, now: datetime.datetime | None = None) -> None:
    """ValueError unless the issuer's certificate, through its intermediates, was signed by one of
    the trust anchors and every certificate on that path is valid now: workload certificates
    issued otherwise would fail every peer's handshake. A Secret read halfway through an update
    (the old ca.crt with the new issuer) fails here too."""
    now = now or _now()
    path = [issuer.certificate, *issuer.chain]
    for below, above in zip(path, path[1:]):
        try:
            below.verify_directly_issued_by(above)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise ValueError(f"issuer.crt's chain is broken at {below.subject.rfc4514_string()}: {e}") from e
    signers = []
    for anchor in x509.load_pem_x509_certificates(anchors_pem):
        try:
            path[-1].verify_directly_issued_by(anchor)
        except (ValueError, TypeError, InvalidSignature):
            continue
        signers.append(anchor)
    if not signers:
        raise ValueError("issuer.crt does not chain to any trust anchor in ca.crt")
    for certificate in path:
        _check_valid(certificate, now)
    if not any(a.not_valid_before_utc <= now <= a.not_valid_after_utc for a in signers):
        raise ValueError("the trust anchor that signed issuer.crt is not valid now")


def _check_valid(certificate: x509.Certificate, now: datetime.datetime) -> None:
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise ValueError(f"{certificate.subject.rfc4514_string()} is valid from {certificate.not_valid_before_utc} "
                         f"to {certificate.not_valid_after_utc}, not now")


def write_identity_files(directory: Path, anchor: Authority, issuer: Authority) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "ca.crt": anchor.certificate_pem(),
        "ca.key": anchor.key_pem(),
        "issuer.crt": issuer.chain_pem(),
        "issuer.key": issuer.key_pem(),
    }
    written = []
    for name, data in files.items():
        path = directory / name
        path.write_bytes(data)
        path.chmod(0o600 if name.endswith(".key") else 0o644)
        written.append(path)
    return written


def issuer_secret_manifest(namespace: str, issuer: Authority, anchors_pem: bytes) -> dict:
    """The Secret the DaemonSet mounts: the issuer and the trust anchors (never the anchor's key)."""
    encode = lambda data: base64.b64encode(data).decode()  # noqa: E731
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": "nodeagent-identity-issuer", "namespace": namespace},
        "data": {"ca.crt": encode(anchors_pem), "issuer.crt": encode(issuer.chain_pem()),
                 "issuer.key": encode(issuer.key_pem())},
    }
