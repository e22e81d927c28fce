"""The cluster's certificates: a CA, node and operator certificates, and who a certificate names.

Every kvtier node holds a certificate signed by the cluster CA (ECDSA P-256, made with the
`cryptography` package) whose URI SAN names the cluster, the role and the node:
`spiffe://<cluster>/<role>/<name>` (role: metadata, datanode, kvcache, gateway, or operator for
people and tools with admin rights; etcd for the etcd server). Its DNS and IP SANs are the hosts
peers dial, so ordinary TLS hostname checks apply. Services accept a peer only with a valid
certificate of the same cluster whose role the RPC allows (`kvtier.authz`).

Files of a PKI directory (`kvtier up` makes one per dev cluster, `kvtier admin certs` for
production): `ca.crt`, `ca.key` (0600, only where certificates are issued), and
`<name>.crt` / `<name>.key` (0600) per holder. The directory is 0700.

Rotation: issue a new certificate into the same files (`kvtier admin certs issue ...` again);
a running service notices the change (`CertificateFiles.changed`) and serves the new one on new
connections without a restart (docs/security.md).
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import socket
import threading
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvtier import errors, identity

SCHEME = "spiffe"
#: Roles a certificate may name (kvtier.principal.SERVICE_ROLES, operator, and etcd's server).
ROLES = ("metadata", "datanode", "kvcache", "gateway", "operator", "etcd")
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
DEFAULT_CA_DAYS = 3650
DEFAULT_CERT_DAYS = 365
#: How far before its issue a certificate is valid from: a peer checks it against its own wall
#: clock, and one whose clock runs behind (up to the 30 min the datanodes tolerate in version
#: stamps) must accept a certificate issued now (tests/unit/test_pki_clock_skew.py).
NOT_BEFORE_BACKDATE = datetime.timedelta(hours=1)


@dataclasses.dataclass(frozen=True, slots=True)
class CertIdentity:
    """What a kvtier certificate names."""

    cluster: str
    role: str
    name: str

    @property
    def uri(self) -> str:
        """The URI SAN that carries it."""
        return f"{SCHEME}://{self.cluster}/{self.role}/{self.name}"


def parse_uri(uri: str) -> CertIdentity | None:
    """The identity of a `spiffe://cluster/role/name` URI, or None when it is not one."""
    prefix = f"{SCHEME}://"
    if not uri.startswith(prefix):
        return None
    parts = uri[len(prefix) :].split("/")
    if len(parts) != 3 or not all(parts) or parts[1] not in ROLES:
        return None
    return CertIdentity(*parts)


def identity_of(cert: x509.Certificate) -> CertIdentity | None:
    """The kvtier identity in a certificate's URI SANs (None when it carries none)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        found = parse_uri(uri)
        if found is not None:
            return found
    return None


def identity_of_pem(pem: bytes) -> CertIdentity | None:
    """identity_of for a PEM certificate (None when unparsable or without an identity)."""
    try:
        return identity_of(x509.load_pem_x509_certificate(pem))
    except ValueError:
        return None


def _check_name(what: str, value: str) -> str:
    if not value or not all(c.isalnum() or c in "-_." for c in value):
        raise errors.InvalidArgument(f"{what} {value!r}: use letters, digits, '-', '_', '.'")
    return value


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Authority:
    """A cluster CA that can issue certificates."""

    cluster: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate (the trust anchor everyone gets)."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        role: str,
        name: str,
        *,
        hosts: Sequence[str] = (),
        days: int = DEFAULT_CERT_DAYS,
    ) -> tuple[bytes, bytes]:
        """A new (certificate PEM, key PEM) for name in role, valid for hosts (DNS names or IP
        addresses that peers dial). InvalidArgument for an unknown role or a bad name."""
        if role not in ROLES:
            raise errors.InvalidArgument(f"role {role!r}: one of {', '.join(ROLES)}")
        _check_name("name", name)
        key = ec.generate_private_key(ec.SECP256R1())
        ident = CertIdentity(self.cluster, role, name)
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(ident.uri)]
        for host in dict.fromkeys(hosts):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{role}/{name}")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - NOT_BEFORE_BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def new_authority(cluster: str, *, days: int = DEFAULT_CA_DAYS) -> Authority:
    """A fresh cluster CA (the cluster name becomes the trust domain of its certificates)."""
    _check_name("cluster", cluster)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kvtier"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"kvtier CA {cluster}"),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - NOT_BEFORE_BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"{SCHEME}://{cluster}")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return Authority(cluster, cert, key)


def cluster_of_ca(cert: x509.Certificate) -> str:
    """The cluster (trust domain) a CA certificate was made for."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = None
    prefix = f"{SCHEME}://"
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier) if sans else ():
        if uri.startswith(prefix) and "/" not in uri[len(prefix) :]:
            return uri[len(prefix) :]
    raise errors.InvalidArgument("the CA certificate names no kvtier cluster")


def load_authority(directory: Path) -> Authority:
    """The CA of a PKI directory (its ca.crt and ca.key); InvalidArgument when unusable."""
    try:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise errors.InvalidArgument(f"no usable CA in {directory}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise errors.InvalidArgument(f"{directory / CA_KEY} is not an EC key")
    return Authority(cluster_of_ca(cert), cert, key)


def ensure_private_dir(directory: Path) -> None:
    """Create directory (and parents) and make it 0700."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)


def write_authority(directory: Path, authority: Authority) -> None:
    """Write ca.crt (0644) and ca.key (0600) into a 0700 directory."""
    ensure_private_dir(directory)
    identity.write_atomic(directory / CA_KEY, _pem_key(authority.key), mode=0o600)
    identity.write_atomic(directory / CA_CERT, authority.cert_pem, mode=0o644)


def write_pair(directory: Path, stem: str, pair: tuple[bytes, bytes]) -> tuple[Path, Path]:
    """Write <stem>.crt and <stem>.key (0600); returns their paths. The key is written first,
    so a watcher that sees a new certificate finds its key already in place."""
    ensure_private_dir(directory)
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    identity.write_atomic(key_path, pair[1], mode=0o600)
    identity.write_atomic(cert_path, pair[0], mode=0o644)
    return cert_path, key_path


def is_current(directory: Path, stem: str, authority: Authority, *, days_left: int) -> bool:
    """Whether <stem>.crt/.key exist, match, were issued by authority and stay valid for
    days_left more days."""
    try:
        pem = (directory / f"{stem}.crt").read_bytes()
        check_pair(pem, (directory / f"{stem}.key").read_bytes())
        cert = x509.load_pem_x509_certificate(pem)
        cert.verify_directly_issued_by(authority.cert)
    except (OSError, ValueError, TypeError, errors.InvalidArgument, InvalidSignature):
        return False
    return cert.not_valid_after_utc - _now() > datetime.timedelta(days=days_left)


def local_hosts() -> list[str]:
    """The names a node on this machine is dialled by in a dev cluster."""
    return ["127.0.0.1", "localhost", "::1", socket.gethostname()]


@dataclasses.dataclass(frozen=True, slots=True)
class Material:
    """One holder's TLS material as bytes: the CA, its certificate chain and its key."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @property
    def identity(self) -> CertIdentity | None:
        """Who the certificate names."""
        return identity_of_pem(self.cert_pem)


class CertificateFiles:
    """A holder's CA, certificate and key files, read again when they change (rotation).

    `refresh()` re-reads the files when their mtimes moved and bumps `generation` when the
    material changed; consumers (TLS server credentials, outgoing channels, the token issuer)
    remember the generation they built from. Thread-safe: gRPC calls it from its own threads.
    """

    def __init__(self, ca_file: str, cert_file: str = "", key_file: str = "") -> None:
        self.ca_file = ca_file
        self.cert_file = cert_file
        self.key_file = key_file
        self._lock = threading.Lock()
        self._stamp: tuple[int, ...] = ()
        self.generation = 1
        self.material = self._read()
        if self.material.cert_pem or self.material.key_pem:
            check_pair(self.material.cert_pem, self.material.key_pem)

    def _stamps(self) -> tuple[int, ...]:
        paths = [p for p in (self.ca_file, self.cert_file, self.key_file) if p]
        try:
            return tuple(os.stat(p).st_mtime_ns for p in paths)
        except OSError:
            return self._stamp

    def _read(self) -> Material:
        stamp = self._stamps()
        try:
            ca = Path(self.ca_file).read_bytes() if self.ca_file else b""
            cert = Path(self.cert_file).read_bytes() if self.cert_file else b""
            key = Path(self.key_file).read_bytes() if self.key_file else b""
        except OSError as exc:
            raise errors.InvalidArgument(f"TLS files unreadable: {exc}") from None
        for path, pem in ((self.ca_file, ca), (self.cert_file, cert)):
            if path and b"BEGIN CERTIFICATE" not in pem:
                raise errors.InvalidArgument(f"{path} holds no PEM certificate")
        self._stamp = stamp
        return Material(ca, cert, key)

    def refresh(self) -> bool:
        """Re-read the files when their mtimes moved; True when the material changed.

        A half-written pair (unparsable, or certificate and key that do not match) is ignored
        until it is whole: the old material stays in use.
        """
        with self._lock:
            if self._stamps() == self._stamp:
                return False
            try:
                fresh = self._read()
                if fresh.cert_pem or fresh.key_pem:
                    check_pair(fresh.cert_pem, fresh.key_pem)
            except errors.InvalidArgument:
                self._stamp = ()  # look again next time
                return False
            if fresh == self.material:
                return False
            self.material = fresh
            self.generation += 1
            return True


def check_pair(cert_pem: bytes, key_pem: bytes) -> None:
    """InvalidArgument unless key_pem is the private key of cert_pem."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, None)
    except ValueError as exc:
        raise errors.InvalidArgument(f"unparsable certificate or key: {exc}") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(serialization.Encoding.DER, public) != key.public_key(
    ).public_bytes(serialization.Encoding.DER, public):  # fmt: skip
        raise errors.InvalidArgument("the key does not belong to the certificate")
