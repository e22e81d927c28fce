"""Benchmark clients of a secure kvtier cluster (issue 13), with credentials configured the way a
user configures them: never the harness's own.

- `cli_env()`: the environment for `kvtier` CLI processes (`up`, `down`, `admin user add`)
  without any `KVTIER_*` credential variable of the caller (a test's operator certificate of
  another CA, say), so the CLI uses the dev cluster's own operator certificate in its state dir.
- `add_user(state, tenant, trusted=...)`: `kvtier admin user add --json` (`--trust-shm` for a
  user trusted for same-host shared memory); a `BenchUser` with what a client needs: its
  `security()` for in-process clients, its `env()` (KVTIER_CA_FILE, KVTIER_ACCESS_KEY,
  KVTIER_SECRET_KEY) for client processes, and its `kwargs()` for spawned ones. Against an
  insecure dev cluster (`kvtier up --insecure`) the user is `KVTIER_INSECURE=1`.
- `StandalonePKI`: a cluster CA and certificates in a directory, for benchmarks that start
  services themselves (bench/kv_peers/kvtier.py): the TLS flags of each service and the
  operator's client security.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvtier import pki, security

ROOT = Path(__file__).resolve().parent.parent
CREDENTIAL_ENV = (
    security.ENV_INSECURE, security.ENV_CA_FILE, security.ENV_CERT_FILE, security.ENV_KEY_FILE,
    security.ENV_ACCESS_KEY, security.ENV_SECRET_KEY, security.ENV_CLUSTER_FILE,
)  # fmt: skip


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ without KVTIER_* credential variables, plus extra."""
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_ENV}
    return {**env, **(extra or {})}


@dataclasses.dataclass(frozen=True)
class BenchUser:
    """A user of a dev cluster (see the module docstring). Its repr shows no secret."""

    access_key: str = ""
    secret_key: str = dataclasses.field(default="", repr=False)
    tenant: str = ""
    ca_file: str = ""
    insecure: bool = False

    def kwargs(self) -> dict[str, Any]:
        """`kvtier.security.ClientSecurity` arguments (picklable, for spawned processes)."""
        if self.insecure:
            return {"insecure": True}
        return {"ca_file": self.ca_file, "access_key": self.access_key,
                "secret_key": self.secret_key}  # fmt: skip

    def security(self) -> security.ClientSecurity:
        """For clients in this process."""
        return security.ClientSecurity(**self.kwargs())

    def env(self) -> dict[str, str]:
        """KVTIER_* variables for a client process (merge over `cli_env()`)."""
        if self.insecure:
            return {security.ENV_INSECURE: "1"}
        return {
            security.ENV_CA_FILE: self.ca_file,
            security.ENV_ACCESS_KEY: self.access_key,
            security.ENV_SECRET_KEY: self.secret_key,
        }


def add_user(state: Path, tenant: str, *, trusted: bool = False) -> BenchUser:
    """A user of tenant on the dev cluster in state (made by its operator through the CLI)."""
    info = json.loads((state / "cluster.json").read_text())
    if info.get("insecure"):
        return BenchUser(tenant=tenant, insecure=True)
    argv = [sys.executable, "-m", "kvtier.cli.main", "admin", "user", "add", "--tenant", tenant,
            "--json", "--state-dir", str(state), *(["--trust-shm"] if trusted else [])]  # fmt: skip
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT, env=cli_env()
    )
    if done.returncode != 0:
        raise RuntimeError(f"kvtier admin user add failed: {done.stderr.strip()[-500:]}")
    made = json.loads(done.stdout)
    return BenchUser(
        access_key=made["access_key"],
        secret_key=made["secret_key"],
        tenant=made["tenant"],
        ca_file=str(info["ca_file"]),
    )


def operator_security(state: Path) -> security.ClientSecurity:
    """The dev cluster's operator certificate (from its cluster.json), or insecure."""
    return security.ClientSecurity.from_cluster_file(state / "cluster.json", as_operator=True)


class StandalonePKI:
    """A cluster CA and a certificate per role in directory (for 127.0.0.1 and localhost)."""

    def __init__(self, directory: Path, cluster: str = "kvtier-bench") -> None:
        self.directory = directory
        authority = pki.new_authority(cluster)
        pki.write_authority(directory, authority)
        for role in ("etcd", "kvcache", "operator"):
            pki.write_pair(directory, role, authority.issue(role, f"bench-{role}",
                                                            hosts=pki.local_hosts()))  # fmt: skip

    @property
    def ca_file(self) -> str:
        return str(self.directory / pki.CA_CERT)

    def cert(self, role: str) -> str:
        return str(self.directory / f"{role}.crt")

    def key(self, role: str) -> str:
        return str(self.directory / f"{role}.key")

    def service_flags(self, role: str) -> list[str]:
        """A service's TLS command-line flags."""
        return [f"--tls-ca-file={self.ca_file}", f"--tls-cert-file={self.cert(role)}",
                f"--tls-key-file={self.key(role)}"]  # fmt: skip

    def operator_kwargs(self) -> dict[str, Any]:
        """`ClientSecurity` arguments of the operator (mutual TLS, trusted for shm)."""
        return {"ca_file": self.ca_file, "cert_file": self.cert("operator"),
                "key_file": self.key("operator")}  # fmt: skip
