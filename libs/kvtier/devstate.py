"""A dev cluster's state directory (`kvtier.devcluster`'s layout): its files and what they hold.

The cluster CA and certificates (`ensure_pki`, `operator_security`), the admin keys
(`credentials`) and the admin user made of them (`ensure_admin`), the master key, etcd's kept
ports, and the processes' log files (`open_log`). `kvtier.devcluster` re-exports the public names.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import IO, Any

from kvtier import devports, errors, etcdserver, identity, masterkey, pki, security, users
from kvtier.clients import metadata as metadata_client

log = logging.getLogger(__name__)

MASTER_KEY_FILE = "master.key"
ADMIN_TENANT = "default"


class ClusterError(Exception):
    """The dev cluster could not start or stop; the message is one line."""


def open_log(path: Path) -> IO[bytes]:
    """A log file for appending, readable by its owner only (logs may name users and keys)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")


def pki_dir(state: Path) -> Path:
    """Where the dev cluster's CA and certificates live."""
    return state / "pki"


def ensure_pki(state: Path, names: list[tuple[str, str]]) -> pki.Authority:
    """The state dir's CA (created once) and a certificate for each (role, name) that has none
    or one expiring within 30 days (also when the CA changed)."""
    directory = pki_dir(state)
    try:
        authority = pki.load_authority(directory)
    except errors.InvalidArgument:
        authority = pki.new_authority(f"kvtier-dev-{os.urandom(3).hex()}")
        pki.write_authority(directory, authority)
    for role, name in names:
        if not pki.is_current(directory, name, authority, days_left=30):
            pair = authority.issue(role, name, hosts=pki.local_hosts())
            pki.write_pair(directory, name, pair)
    return authority


def operator_security(state: Path) -> security.ClientSecurity:
    """Mutual TLS as the dev cluster's operator (the supervisor and the CLI use it)."""
    directory = pki_dir(state)
    return security.ClientSecurity(
        ca_file=str(directory / pki.CA_CERT),
        cert_file=str(directory / "operator.crt"),
        key_file=str(directory / "operator.key"),
    )


def load_json(path: Path) -> dict[str, Any]:
    """The JSON object in path; {} when it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def etcd_ports(state: Path, plan: devports.PortPlan) -> tuple[int, int]:
    """etcd's (client, peer) ports: the plan's, or under `--ports auto` those of ports.json while
    still free (else new free ones, kept there)."""
    if not plan.auto:
        return plan.etcd_ports()
    kept = load_json(state / "ports.json")
    ports = (int(kept.get("etcd_client", 0)), int(kept.get("etcd_peer", 0)))
    if not all(ports) or not all(devports.port_free(p) for p in ports):
        ports = (etcdserver.free_port(), etcdserver.free_port())
        identity.write_atomic(
            state / "ports.json",
            json.dumps({"etcd_client": ports[0], "etcd_peer": ports[1]}).encode(),
        )
    return ports


def credentials(state: Path) -> dict[str, str]:
    """The dev cluster's admin keys, {"access_key", "secret_key"}: those of credentials.json
    (mode 0600), created there once, so every `up` of a state dir has the same admin."""
    path = state / "credentials.json"
    kept = load_json(path)
    if kept.get("access_key") and kept.get("secret_key"):
        return {"access_key": str(kept["access_key"]), "secret_key": str(kept["secret_key"])}
    creds = {"access_key": users.new_access_key(), "secret_key": users.new_secret().reveal()}
    identity.write_atomic(path, json.dumps(creds).encode(), mode=0o600)
    return creds


def master_key(state: Path) -> masterkey.MasterKey:
    """The state dir's master key, created once; ClusterError when it cannot be used."""
    path = state / MASTER_KEY_FILE
    masterkey.write_new(path)
    try:
        key = masterkey.load(str(path))
    except errors.InvalidArgument as exc:
        raise ClusterError(exc.message) from None
    assert key is not None
    return key


async def ensure_admin(
    metadata: str,
    store: users.UserStore,
    creds: dict[str, str],
    sec: security.ClientSecurity | None = None,
) -> users.User:
    """The admin user of credentials.json: created through the metadata service at metadata,
    or, when its access key exists, checked in etcd (store) to open with today's master key and
    hold today's secret; a stale one (the master key or credentials.json was replaced) is
    deleted and created again."""
    access_key, secret = creds["access_key"], users.Secret(creds["secret_key"])
    async with metadata_client.MetadataClient(metadata, timeout_s=10.0, security=sec) as client:
        for _attempt in range(2):
            try:
                return await client.create_user(
                    tenant=ADMIN_TENANT,
                    display_name="admin",
                    is_admin=True,
                    access_key=access_key,
                    secret=secret,
                )
            except errors.AlreadyExists:
                pass
            try:
                user = await store.get(access_key)
            except (errors.Corrupt, errors.PreconditionFailed) as exc:
                log.warning("admin user %s is stale (%s): creating it again", access_key, exc)
            else:
                if user.secret.reveal() == secret.reveal() and user.is_admin:
                    return user
                log.warning("admin user %s has other keys or rights: creating it again", access_key)
            await client.delete_user(access_key)
    raise ClusterError(f"could not create the admin user {access_key}")
