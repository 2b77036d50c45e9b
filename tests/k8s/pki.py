"""Certificates for the test cluster: one CA, the API server's serving certificate, a client
certificate per component (their names are what RBAC knows them by), the ServiceAccount key.
Test-only; ECDSA P-256 like the rest of the project."""

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LIFETIME = datetime.timedelta(days=2)


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def _write(path: Path, key, certificate: x509.Certificate | None) -> None:
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.with_suffix(".key").chmod(0o600)
    if certificate is not None:
        path.with_suffix(".crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


class Pki:
    def __init__(self, directory: Path):
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
        self._window = (now, now + LIFETIME)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = (x509.CertificateBuilder().subject_name(_name("nodeagent-test-ca")).issuer_name(_name(
            "nodeagent-test-ca")).public_key(self.ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.ca_key.public_key()), critical=False)
            .sign(self.ca_key, hashes.SHA256()))
        _write(directory / "ca", self.ca_key, self.ca)
        # The ServiceAccount token signing key, and its public half for the API server to verify.
        sa = ec.generate_private_key(ec.SECP256R1())
        _write(directory / "sa", sa, None)
        (directory / "sa.pub").write_bytes(sa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    @classmethod
    def load(cls, directory: Path) -> "Pki":
        """The CA `__init__` made in `directory` earlier (another process's cluster)."""
        pki = object.__new__(cls)
        pki.dir = directory
        pki.ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        pki.ca = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
        now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
        pki._window = (now, pki.ca.not_valid_after_utc)
        return pki

    def path(self, name: str, suffix: str) -> Path:
        return self.dir / f"{name}{suffix}"

    def issue(self, name: str, common_name: str, organization: str | None = None,
              server_names: tuple[str, ...] = (), client: bool = True) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        builder = (x509.CertificateBuilder().subject_name(_name(common_name, organization))
                   .issuer_name(self.ca.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(self._window[0]).not_valid_after(self._window[1])
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()),
                                  critical=False))
        if server_names:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
            sans = []
            for value in server_names:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(value)))
                except ValueError:
                    sans.append(x509.DNSName(value))
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        _write(self.dir / name, key, builder.sign(self.ca_key, hashes.SHA256()))
