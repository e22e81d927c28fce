"""The test session's PKI: a cluster CA and one certificate per role, made once per run.

`tests/conftest.py` creates it before any test and points the process's default client
security at the operator certificate (KVTIER_CA_FILE / KVTIER_CERT_FILE / KVTIER_KEY_FILE), so
test clients act as an operator (an admin over mutual TLS) unless a test says otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

from kvtier import etcdserver, pki, security

CLUSTER = "kvtier-test"
ROLES = ("metadata", "datanode", "kvcache", "gateway", "operator", "etcd")


@dataclasses.dataclass(frozen=True)
class TestPKI:
    """Where the session's CA and certificates are."""

    directory: Path

    @property
    def ca_file(self) -> str:
        return str(self.directory / pki.CA_CERT)

    def cert(self, role: str) -> str:
        return str(self.directory / f"{role}.crt")

    def key(self, role: str) -> str:
        return str(self.directory / f"{role}.key")

    def service_settings(self, role: str) -> dict[str, Any]:
        """The TLS settings of a service of role."""
        return {
            "tls_ca_file": self.ca_file,
            "tls_cert_file": self.cert(role),
            "tls_key_file": self.key(role),
        }

    def client(self, role: str = "operator") -> security.ClientSecurity:
        """Mutual TLS as role (the operator by default)."""
        return security.ClientSecurity(
            ca_file=self.ca_file, cert_file=self.cert(role), key_file=self.key(role)
        )

    def user(self, access_key: str, secret_key: str) -> security.ClientSecurity:
        """A user with the session's CA as trust anchor."""
        return security.ClientSecurity(
            ca_file=self.ca_file, access_key=access_key, secret_key=secret_key
        )

    def etcd_tls(self) -> etcdserver.EtcdTLS:
        return etcdserver.EtcdTLS(self.ca_file, self.cert("etcd"), self.key("etcd"))


def create() -> TestPKI:
    """A fresh CA and a certificate per role (for 127.0.0.1 and localhost)."""
    directory = Path(tempfile.mkdtemp(prefix="kvtier-test-pki-"))
    authority = pki.new_authority(CLUSTER)
    pki.write_authority(directory, authority)
    for role in ROLES:
        pki.write_pair(
            directory, role, authority.issue(role, f"test-{role}", hosts=pki.local_hosts())
        )
    return TestPKI(directory)


_SESSION: list[TestPKI] = []


def session() -> TestPKI:
    """The run's PKI (created on first use; conftest creates it at start)."""
    if not _SESSION:
        made = create()
        _SESSION.append(made)
        os.environ[security.ENV_CA_FILE] = made.ca_file
        os.environ[security.ENV_CERT_FILE] = made.cert("operator")
        os.environ[security.ENV_KEY_FILE] = made.key("operator")
        security.reset_default()
    return _SESSION[0]
