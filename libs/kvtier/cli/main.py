"""`kvtier`: run and inspect clusters.

kvtier up [--state-dir DIR] [--detach] [--ports fixed|auto] [--port-offset N]
                                          start a dev cluster on 127.0.0.1 (fixed ports:
                                          S3 9000, gateway 7000, metadata 7001, etcd 7379)
kvtier down [--state-dir DIR]             stop a detached dev cluster
kvtier status [--state-dir DIR | --etcd-endpoints H:P] [--json]
                                          exit 0 when healthy, 1 when degraded
kvtier revive [--state-dir DIR]           restart dev-cluster processes that exited
kvtier health [HOST:PORT]                 exit 0 when the node's health is SERVING; without
                                          an address: every node, and the cluster's verdict
kvtier --version
kvtier admin heal [BUCKET[/PREFIX]] [--gateway H:P | --state-dir DIR] [--dry-run]
                                          check and heal objects; exit 0 when every one is whole
kvtier admin heal queue [--limit N] [--gateway H:P | --metadata H:P | --state-dir DIR] [--json]
                                          what every gateway's heal queue holds (oldest first)
kvtier admin pool status|add [--metadata H:P | --state-dir DIR] [--json]
kvtier admin pool drain|remove INDEX [--gateway H:P | --state-dir DIR]
                                          pools: state and capacity, how a new one forms,
                                          move a pool's objects away (progress), retire it
kvtier admin user add|list|remove [...] [--metadata H:P | --state-dir DIR] [--json]
                                          S3 users (the secret is printed once, at add)
kvtier admin bucket create NAME [--kind objects|kv] [--tenant T] | list [--tenant T]
                                          buckets (a KV bucket for S3 tools that cannot send
                                          x-kvtier-bucket-kind)
kvtier admin kv quota TENANT BYTES | ttl TENANT NAMESPACE SECONDS
                | durability TENANT NAMESPACE none|write-back|write-through
                                          KV settings, on every kvcache node of the map
kvtier admin certs init --dir DIR --cluster NAME
kvtier admin certs issue --dir DIR --role ROLE --name NAME [--host H ...] [--days N]
                                          the cluster CA and node/operator certificates
kvtier console [--state-dir DIR | --metadata H:P --ca-file F --tls-cert-file F --tls-key-file F]
                                          the operator console (HTTPS, port 9001): log in with
                                          an access key and secret
kvtier cp FILE s3://BUCKET/KEY | cp s3://BUCKET/KEY FILE [--gateway H:P | --state-dir DIR]
                                          upload or download one object, with progress (as the
                                          KVTIER_* user, else the dev cluster's admin user)

Exit codes: 0 success, 1 failure (or a degraded cluster), 2 a bad flag or state dir (one line).

Every command that talks to a cluster authenticates: with the dev cluster's operator
certificate (--state-dir's cluster.json), or with KVTIER_* environment variables
(KVTIER_CA_FILE, KVTIER_CERT_FILE/KVTIER_KEY_FILE, KVTIER_ACCESS_KEY/KVTIER_SECRET_KEY,
KVTIER_CLUSTER_FILE, KVTIER_INSECURE=1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kvtier import config as kvtier_config
from kvtier import devports
from kvtier.cli import parser as cli_parser

if TYPE_CHECKING:
    from kvtier import devcluster, security

# Start-up time: every other module (grpc, cryptography, aetcd, the console's aiohttp) is
# imported inside the handler of the one subcommand that needs it, as kvtier.cli.parser does
# for the options, so `kvtier --help` loads none of it (docs/operations.md, CLI start-up).

EXIT_USAGE = cli_parser.EXIT_USAGE
_parser = cli_parser.build  # tests build the parser through main


class UsageError(Exception):
    """A bad flag or state dir: one line, exit 2."""


def state_dir(raw: str, *, create: bool = False) -> Path:
    """The resolved --state-dir; UsageError when it is empty, not a directory, on a kernel file
    system (/proc, /sys, /dev but /dev/shm) or (create) cannot be made private."""
    try:
        kvtier_config.check_storage_dir("--state-dir", raw)
    except kvtier_config.ConfigError as exc:
        raise UsageError(str(exc)) from None
    path = Path(raw).resolve()
    if create:
        from kvtier import pki  # here: start-up time (cryptography)

        try:
            pki.ensure_private_dir(path)
        except OSError as exc:
            raise UsageError(f"--state-dir {path}: {exc.strerror or exc}") from None
    return path


def _ports(args: argparse.Namespace) -> devports.PortPlan:
    return devports.PortPlan(
        auto=args.ports == "auto",
        offset=args.port_offset,
        s3=args.s3_port,
        gateway=args.gateway_port,
        metadata=args.metadata_port,
        etcd=args.etcd_port,
    )


def _options(args: argparse.Namespace) -> devcluster.ClusterOptions:
    from kvtier import devcluster  # here: start-up time

    return devcluster.ClusterOptions(
        state_dir=state_dir(args.state_dir, create=True),
        datanodes=args.datanodes,
        drives_per_datanode=args.drives_per_datanode,
        kvcache_nodes=args.kvcache_nodes,
        kvcache_arena_bytes=args.kvcache_arena_mib << 20,
        lease_ttl_s=args.lease_ttl_s,
        shutdown_grace_s=args.shutdown_grace_s,
        ready_timeout_s=args.ready_timeout_s,
        etcd_binary=args.etcd_binary,
        insecure=args.insecure,
        ports=_ports(args),
    )


def _up(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from kvtier import devcluster, pki  # here: start-up time

    opts = _options(args)
    pid = devcluster.supervisor_pid(opts.state_dir)
    if pid is not None:  # before its log is opened: the running cluster's log stays its own
        raise devcluster.ClusterError(
            f"a dev cluster is already running from {opts.state_dir} (pid {pid}); "
            f"stop it with: kvtier down --state-dir {opts.state_dir}"
        )
    opts.ports.check(opts.expected_roles())
    if not args.detach:
        return devcluster.Supervisor(opts, sys.stdout).run()
    # Private from the start: the state dir holds keys, secrets and logs.
    pki.ensure_private_dir(opts.state_dir)
    log_path = opts.state_dir / "logs" / "supervisor.log"
    pki.ensure_private_dir(log_path.parent)
    foreground = [a for a in argv if a != "--detach"]
    with devcluster.open_log(log_path) as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvtier.cli.main", *foreground],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    info = devcluster.wait_detached(opts.state_dir, proc, opts.ready_timeout_s + 30)
    print(devcluster.render_summary(info))
    return 0


def _down(args: argparse.Namespace) -> int:
    # Here, and devcluster's parts only: start-up time (devcluster imports every service's).
    from kvtier import devcontrol

    state = Path(args.state_dir).resolve()
    if devcontrol.stop_detached(state, args.timeout_s):
        print(f"stopped the dev cluster in {state}")
    else:
        print(f"no dev cluster is running from {state}")
    return 0


def _revive(args: argparse.Namespace) -> int:
    # Here, and devcluster's parts only: start-up time (devcluster imports every service's).
    from kvtier import devcontrol, devstate

    state = Path(args.state_dir).resolve()
    pid = devcontrol.supervisor_pid(state)
    if pid is None:
        raise devstate.ClusterError(f"no dev cluster is running from {state}")
    os.kill(pid, signal.SIGHUP)
    print(f"asked the supervisor (pid {pid}) to restart exited processes")
    return 0


def _status(args: argparse.Namespace) -> int:
    from kvtier.cli import status as status_cmd  # here: start-up time

    endpoints = _etcd_endpoints(args)
    sec = cli_security(args.state_dir)
    state = asyncio.run(status_cmd.collect(endpoints, args.etcd_prefix, args.timeout_s, sec))
    print(json.dumps(state, indent=2) if args.json else status_cmd.render(state))
    return 0 if state["healthy"] else 1


def _etcd_endpoints(args: argparse.Namespace) -> tuple[str, ...]:
    """--etcd-endpoints, else the etcd of the dev cluster in --state-dir."""
    endpoints = tuple(e for e in args.etcd_endpoints.split(",") if e)
    if endpoints:
        return endpoints
    info_path = Path(args.state_dir) / "cluster.json"
    try:
        return (str(json.loads(info_path.read_text())["etcd"]),)
    except (OSError, ValueError, KeyError):
        from kvtier import devstate  # here: start-up time (devcluster's ClusterError is its)

        raise devstate.ClusterError(
            f"no running cluster at {info_path}; pass --etcd-endpoints"
        ) from None


def cli_security(state_dir: str) -> security.ClientSecurity:
    """How the CLI authenticates: KVTIER_* variables when any is set, else the operator
    certificate of the dev cluster in state_dir (its cluster.json), else TLS with the
    system's trust store and no credential."""
    from kvtier import security  # here: start-up time (grpc, cryptography)

    if any(name.startswith("KVTIER_") and name not in _NOT_CREDENTIALS for name in os.environ):
        return security.ClientSecurity.from_env()
    info = Path(state_dir) / "cluster.json"
    if info.exists():
        return security.ClientSecurity.from_cluster_file(info, as_operator=True)
    return security.ClientSecurity.from_env()


_NOT_CREDENTIALS = frozenset({"KVTIER_STATE_DIR", "KVTIER_TEST_SEED"})


def service_security(environ: Mapping[str, str]) -> security.ClientSecurity:
    """Mutual TLS with the TLS files of the one kvtier service configured in environ
    (KVTIER_<SERVICE>_TLS_CA_FILE / _CERT_FILE / _KEY_FILE), or insecure when it is."""
    from kvtier import errors, security  # here: start-up time (grpc, cryptography)

    found: dict[str, dict[str, str]] = {}
    for name, value in environ.items():
        parts = name.split("_", 2)
        if len(parts) == 3 and parts[0] == "KVTIER":
            found.setdefault(parts[1], {})[parts[2]] = value
    services = {s: v for s, v in found.items() if "TLS_CERT_FILE" in v or "INSECURE" in v}
    if len(services) != 1:
        raise errors.InvalidArgument("--from-env: no single kvtier service configured here")
    settings = next(iter(services.values()))
    if settings.get("INSECURE", "").lower() in {"1", "true", "yes", "on"}:
        return security.ClientSecurity(insecure=True)
    return security.ClientSecurity(
        ca_file=settings.get("TLS_CA_FILE", ""),
        cert_file=settings.get("TLS_CERT_FILE", ""),
        key_file=settings.get("TLS_KEY_FILE", ""),
    )


def _health(args: argparse.Namespace) -> int:
    from kvtier import rpc  # here: start-up time
    from kvtier.cli import status as status_cmd

    sec = service_security(os.environ) if args.from_env else cli_security(args.state_dir)
    if not args.address:  # cluster-wide: every node of the map, and the verdict
        endpoints = _etcd_endpoints(args)
        state = asyncio.run(status_cmd.collect(endpoints, args.etcd_prefix, args.timeout_s, sec))
        print(status_cmd.render_health(state))
        return 0 if state["healthy"] else 1
    result = asyncio.run(rpc.check_health(args.address, timeout_s=args.timeout_s, security=sec))
    print(result)
    return 0 if result == "SERVING" else 1


def _admin(args: argparse.Namespace) -> int:
    # Here: start-up time (grpc, cryptography, aetcd).
    from kvtier.cli import admin as admin_cmd
    from kvtier.cli import certs as certs_cmd
    from kvtier.cli import healqueue as healqueue_cmd
    from kvtier.cli import kvadmin
    from kvtier.cli import pools as pools_cmd

    if args.admin_command == "certs":
        return certs_cmd.run(args, sys.stdout)
    sec = cli_security(args.state_dir)
    if args.admin_command == "kv":
        return asyncio.run(kvadmin.run(_etcd_endpoints(args), args, sys.stdout, sec))
    if args.admin_command == "pool":
        return asyncio.run(pools_cmd.run(args, sys.stdout, sys.stderr, sec))
    if args.admin_command == "user":
        address = admin_cmd.metadata_address(args.metadata, args.state_dir, sec)
        return asyncio.run(admin_cmd.user_command(address, args, sys.stdout, security=sec))
    if args.admin_command == "bucket":
        address = admin_cmd.metadata_address(args.metadata, args.state_dir, sec)
        return asyncio.run(admin_cmd.bucket_command(address, args, sys.stdout, security=sec))
    if args.target == "queue":
        return asyncio.run(_heal_queue(args, sec))
    if args.json or args.limit != healqueue_cmd.DEFAULT_LIMIT:
        raise UsageError("--json and --limit go with `kvtier admin heal queue`")
    address = admin_cmd.gateway_address(args.gateway, args.state_dir, sec)
    result = asyncio.run(
        admin_cmd.heal(
            address,
            args.target,
            dry_run=args.dry_run,
            out=sys.stdout,
            err=sys.stderr,
            security=sec,
        )
    )
    print(admin_cmd.summary(result, dry_run=args.dry_run))
    return 0 if not (result.unrecoverable or result.skipped) and result.done else 1


async def _heal_queue(args: argparse.Namespace, sec: security.ClientSecurity) -> int:
    """`kvtier admin heal queue`: --gateway's queue, else every gateway's of the map."""
    from kvtier.cli import admin as admin_cmd  # here: start-up time
    from kvtier.cli import healqueue as healqueue_cmd

    if args.limit < 1:
        raise UsageError(f"--limit {args.limit}: give at least 1")
    if args.gateway:
        gateways = [healqueue_cmd.Gateway(args.gateway, args.gateway)]
    else:
        address = admin_cmd.metadata_address(args.metadata, args.state_dir, sec)
        gateways = await healqueue_cmd.cluster_gateways(address, sec)
    return await healqueue_cmd.run(gateways, args.limit, sys.stdout, sec, as_json=args.json)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kvtier` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = cli_parser.build(cli_parser.command(argv)).parse_known_args(argv)
    if extra:  # named with the command, not the top-level usage
        print(
            f"kvtier {args.command}: error: unrecognized arguments: {' '.join(extra)} "
            f"(see kvtier {args.command} --help)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        if args.command != "up" and getattr(args, "state_dir", None) is not None:
            state_dir(args.state_dir)
        if args.command == "up":
            return _up(args, argv)
        if args.command == "down":
            return _down(args)
        if args.command == "revive":
            return _revive(args)
        if args.command == "status":
            return _status(args)
        if args.command == "admin":
            return _admin(args)
        if args.command == "cp":
            from kvtier.cli import transfer as transfer_cmd  # here: start-up time

            return transfer_cmd.run(args)
        if args.command == "console":
            from kvtier import errors  # here: start-up time (grpc, aiohttp)
            from kvtier.console import cli as console_cli

            try:
                return console_cli.run(args)
            except errors.InvalidArgument as exc:  # bad flags or files: exit 2
                raise UsageError(exc.message) from None
        return _health(args)
    except (UsageError, devports.PortError) as exc:
        print(f"kvtier {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `kvtier status | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        # Here, not at the top: start-up time (grpc); devcluster's ClusterError is devstate's.
        from kvtier import devstate, errors

        # A file the command could not make or read (a bad --dir, no permission): one line.
        if not isinstance(exc, devstate.ClusterError | errors.KVTierError | OSError):
            raise
        print(f"kvtier {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
