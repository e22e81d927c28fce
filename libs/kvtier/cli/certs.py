"""`kvtier admin certs`: the cluster CA and the certificates of nodes and operators.

    kvtier admin certs init --dir DIR --cluster NAME
        a new cluster CA in DIR (ca.crt, ca.key mode 0600; DIR mode 0700)
    kvtier admin certs issue --dir DIR --role ROLE --name NAME [--host H ...] [--days N]
        NAME.crt and NAME.key (0600) for a node (metadata, datanode, kvcache, gateway), an
        operator (admin rights: `kvtier` commands) or the etcd server; hosts are the DNS names
        and addresses peers dial it by
    kvtier admin certs bootstrap --dir DIR --cluster NAME --node ROLE:NAME[:HOST,...] ...
        idempotent: the CA when there is none, and a certificate for every node that has no
        current one (missing, not from this CA, or expiring within 30 days); what
        docker-compose's `pki` step runs

Rotation: run `issue` again for the same name. A running service re-reads its files and
serves the new certificate on new connections without a restart (docs/security.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, TextIO

from kvtier import errors, pki


def add_parser(admin_sub: Any) -> None:
    """The `certs` subcommands under `kvtier admin`."""
    certs = admin_sub.add_parser("certs", help="the cluster CA and node/operator certificates")
    sub = certs.add_subparsers(dest="certs_command", required=True)
    init = sub.add_parser("init", help="create a cluster CA")
    init.add_argument("--dir", required=True, help="PKI directory (created mode 0700)")
    init.add_argument("--cluster", required=True, help="cluster name (the trust domain)")
    init.add_argument("--days", type=int, default=pki.DEFAULT_CA_DAYS)
    issue = sub.add_parser("issue", help="issue (or re-issue: rotate) a certificate")
    issue.add_argument("--dir", required=True, help="PKI directory holding ca.crt and ca.key")
    issue.add_argument("--role", required=True, choices=pki.ROLES)
    issue.add_argument("--name", required=True, help="node id or operator name")
    issue.add_argument(
        "--host", action="append", default=[], help="DNS name or IP peers dial (repeatable)"
    )
    issue.add_argument("--days", type=int, default=pki.DEFAULT_CERT_DAYS)
    boot = sub.add_parser("bootstrap", help="CA and node certificates, made once (idempotent)")
    boot.add_argument("--dir", required=True, help="PKI directory (created mode 0700)")
    boot.add_argument("--cluster", required=True, help="cluster name for a new CA")
    boot.add_argument(
        "--node", action="append", default=[], help="ROLE:NAME[:HOST,HOST...] (repeatable)"
    )
    boot.add_argument("--days", type=int, default=pki.DEFAULT_CERT_DAYS)
    for parser in (init, issue, boot):
        parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace, out: TextIO) -> int:
    """Run a `kvtier admin certs` command; 0 on success (errors raise InvalidArgument)."""
    directory = Path(args.dir)
    if args.days < 1:
        raise errors.InvalidArgument("--days must be at least 1")
    if args.certs_command == "bootstrap":
        result = _bootstrap(directory, args.cluster, args.node, args.days)
    elif args.certs_command == "init":
        if (directory / pki.CA_KEY).exists():
            raise errors.InvalidArgument(f"{directory} already holds a CA; refusing to replace it")
        authority = pki.new_authority(args.cluster, days=args.days)
        pki.write_authority(directory, authority)
        result = {"ca_file": str(directory / pki.CA_CERT), "cluster": authority.cluster}
    else:
        authority = pki.load_authority(directory)
        hosts = args.host or pki.local_hosts()
        pair = authority.issue(args.role, args.name, hosts=hosts, days=args.days)
        cert, key = pki.write_pair(directory, args.name, pair)
        ident = pki.CertIdentity(authority.cluster, args.role, args.name)
        result = {"cert_file": str(cert), "key_file": str(key), "identity": ident.uri}
    out.write(json.dumps(result) + "\n" if args.json else _lines(result))
    return 0


def _bootstrap(directory: Path, cluster: str, nodes: list[str], days: int) -> dict[str, str]:
    """The CA (created when absent) and a current certificate for every ROLE:NAME[:HOSTS]."""
    try:
        authority = pki.load_authority(directory)
    except errors.InvalidArgument:
        authority = pki.new_authority(cluster)
        pki.write_authority(directory, authority)
    issued = []
    for spec in nodes:
        role, _, rest = spec.partition(":")
        name, _, hosts = rest.partition(":")
        if not role or not name:
            raise errors.InvalidArgument(f"--node {spec!r}: ROLE:NAME[:HOST,...]")
        if pki.is_current(directory, name, authority, days_left=30):
            continue
        names = [h for h in hosts.split(",") if h] or [name]
        pair = authority.issue(role, name, hosts=[*names, "localhost", "127.0.0.1"], days=days)
        pki.write_pair(directory, name, pair)
        issued.append(name)
    return {"cluster": authority.cluster, "issued": ",".join(issued) or "-"}


def _lines(result: dict[str, str]) -> str:
    return "".join(f"{name:10} {value}\n" for name, value in result.items())
