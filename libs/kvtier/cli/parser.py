"""The `kvtier` command's argument parser (kvtier.cli.main runs the commands).

Start-up time: a subcommand's options, and the modules they take defaults and choices from
(grpc, cryptography, aetcd, the console's aiohttp), are built only for the subcommand being
run; every other one gets a bare parser with its one-line help, so `--help` imports none of
them (docs/operations.md, CLI start-up).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import NoReturn, TypeAlias

import kvtier
from kvtier import devports

DEFAULT_STATE_DIR = ".kvtier"
EXIT_USAGE = 2
ETCD_PREFIX = "/kvtier"  # devcluster.ETCD_PREFIX (a test keeps them equal); no import: start-up


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless it is empty or off (nothing to tell)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, "", False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Help with defaults; an error is one line naming the command, exit 2 (not the usage)."""

    def __init__(self, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _Help)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(**kwargs)  # type: ignore[arg-type]

    def add_argument(self, *args: object, **kwargs: object) -> argparse.Action:
        """As argparse's; an option without help still shows its default."""
        if "help" not in kwargs and kwargs.get("default") not in (None, "", False):
            kwargs["help"] = "default: %(default)s"
        return super().add_argument(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        text = " ".join(message.split())
        self.exit(EXIT_USAGE, f"{self.prog}: error: {text} (see {self.prog} --help)\n")


def _arena_mib(text: str) -> int:
    """A kvcache arena in MiB: a positive multiple of the node's 64 MiB slab page."""
    value = _count(text)
    if value % 64:
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of 64")
    return value


def _count(text: str) -> int:
    """A node or drive count: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not in 1..65535")
    return value


_Sub: TypeAlias = "argparse._SubParsersAction[_Parser]"


def _add_up(sub: _Sub) -> None:
    plan = devports.PortPlan()
    up = sub.add_parser("up", help=HELP["up"])
    up.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="where all data lives")
    up.add_argument("--detach", action="store_true", help="run in the background")
    up.add_argument("--datanodes", type=_count, default=6, help="datanode processes")
    up.add_argument("--drives-per-datanode", type=_count, default=2, help="drives of each")
    up.add_argument("--kvcache-nodes", type=_count, default=2, help="kvcache processes")
    up.add_argument(
        "--kvcache-arena-mib",
        type=_arena_mib,
        default=256,
        help="DRAM arena of each kvcache node, MiB (a multiple of 64)",
    )
    up.add_argument("--lease-ttl-s", type=int, default=5, help="membership lease of each node")
    up.add_argument("--shutdown-grace-s", type=float, default=5.0, help="grace at stop")
    up.add_argument("--ready-timeout-s", type=float, default=90.0, help="wait for SERVING")
    up.add_argument("--etcd-binary", default="etcd", help="the etcd executable")
    up.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no authentication: every caller has every right (benchmarks only)",
    )
    up.add_argument(
        "--ports",
        choices=("fixed", "auto"),
        default="fixed",
        help="fixed: the documented ports (docs/operations.md), the same at every start; "
        "auto: any free ports (many clusters at once, e.g. tests)",
    )
    up.add_argument(
        "--port-offset", type=int, default=0, help="added to every fixed port (a 2nd cluster)"
    )
    up.add_argument("--s3-port", type=_port, default=plan.s3, help="the gateway's S3 API")
    up.add_argument(
        "--gateway-port", type=_port, default=plan.gateway, help="the gateway's gRPC service"
    )
    up.add_argument(
        "--metadata-port", type=_port, default=plan.metadata, help="the metadata gRPC service"
    )
    up.add_argument(
        "--etcd-port", type=_port, default=plan.etcd, help="etcd's client port (peer: +1)"
    )


# Each subcommand's one-line help, in --help's order: a subcommand that is not run gets a bare
# parser with only this (start-up time: its options' modules are not imported). console's and
# cp's are also in their modules' add_parser; tests/unit/test_cli.py keeps them equal.
HELP = {
    "up": "start a dev cluster (etcd + every service) on 127.0.0.1",
    "down": "stop a detached dev cluster",
    "revive": "restart dev-cluster processes that have exited",
    "status": "every node with role, address, health and epoch",
    "console": "the operator console: a web UI (HTTPS) to see and operate the cluster",
    "cp": "upload a file to s3://BUCKET/KEY or download one, with progress",
    "health": "check a node's gRPC health service, or (no address) every node's",
    "admin": "administration of the object tier",
}


def build(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with `only`, the full options of that subcommand alone (main passes
    the one being run: "" when none is named) and the others' names and help."""
    parser = _Parser(prog="kvtier", description="kvtier command line")
    parser.add_argument("--version", action="version", version=f"kvtier {kvtier.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    builders: dict[str, Callable[[_Sub], None]] = {
        "up": _add_up,
        "down": _add_down,
        "revive": _add_revive,
        "status": _add_status,
        "console": _add_console,
        "cp": _add_cp,
        "health": _add_health,
        "admin": _add_admin,
    }
    for name, help_text in HELP.items():
        if only is None or only == name:
            builders[name](sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def command(argv: Sequence[str]) -> str:
    """The subcommand argparse will run: the first word that is no option ("" when none)."""
    return next((word for word in argv if not word.startswith("-")), "")


def _add_down(sub: _Sub) -> None:
    down = sub.add_parser("down", help=HELP["down"])
    down.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    down.add_argument("--timeout-s", type=float, default=60.0)


def _add_revive(sub: _Sub) -> None:
    revive = sub.add_parser("revive", help=HELP["revive"])
    revive.add_argument("--state-dir", default=DEFAULT_STATE_DIR)


def _add_status(sub: _Sub) -> None:
    status = sub.add_parser("status", help=HELP["status"])
    status.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    status.add_argument(
        "--etcd-endpoints", default="", help="host:port list; default: the state dir's"
    )
    status.add_argument("--etcd-prefix", default=ETCD_PREFIX)
    status.add_argument("--timeout-s", type=float, default=3.0)
    status.add_argument("--json", action="store_true", help="machine-readable output")


def _add_console(sub: _Sub) -> None:
    from kvtier.console import cli as console_cli  # here: start-up time (aiohttp)

    console_cli.add_parser(sub, DEFAULT_STATE_DIR)


def _add_cp(sub: _Sub) -> None:
    from kvtier.cli import transfer as transfer_cmd  # here: start-up time

    transfer_cmd.add_parser(sub, DEFAULT_STATE_DIR)


def _add_health(sub: _Sub) -> None:
    health = sub.add_parser("health", help=HELP["health"])
    health.add_argument(
        "address", nargs="?", default="", help="host:port; none: every node of the cluster"
    )
    health.add_argument(
        "--etcd-endpoints", default="", help="without an address: the cluster's etcd host:port list"
    )
    health.add_argument("--etcd-prefix", default=ETCD_PREFIX)
    health.add_argument("--timeout-s", type=float, default=2.0)
    health.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="whose credentials to use")
    health.add_argument(
        "--from-env",
        action="store_true",
        help="use the TLS files of the kvtier service configured in this environment "
        "(KVTIER_<SERVICE>_TLS_*): a container's health check with the node's own certificate",
    )


def _add_admin(sub: _Sub) -> None:
    # Here: start-up time (grpc, cryptography, aetcd).
    from kvtier.cli import admin as admin_cmd
    from kvtier.cli import certs as certs_cmd
    from kvtier.cli import healqueue as healqueue_cmd
    from kvtier.cli import kvadmin
    from kvtier.cli import pools as pools_cmd

    admin = sub.add_parser("admin", help=HELP["admin"])
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    heal = admin_sub.add_parser(
        "heal",
        help="check objects and rebuild missing or corrupt shards",
        description="Check every object of a bucket (or prefix, or of every bucket) and heal "
        "those whose shards are missing, stale or corrupt on some drive. Exit code 0 when every "
        "object is whole (healthy or healed), 1 otherwise. `kvtier admin heal queue` lists what "
        "the heal queues of every gateway (or of --gateway) hold instead: exit 0 when every "
        "gateway answered (a bucket named queue: `kvtier admin heal queue/`).",
    )
    heal.add_argument(
        "target", nargs="?", default="", help="BUCKET or BUCKET/PREFIX; none: all; queue: list"
    )
    heal.add_argument("--gateway", default="", help="gateway gRPC host:port")
    heal.add_argument(
        "--metadata", default="", help="heal queue: metadata gRPC host:port (finds the gateways)"
    )
    heal.add_argument(
        "--limit", type=int, default=healqueue_cmd.DEFAULT_LIMIT, help="heal queue: entries shown"
    )
    heal.add_argument("--json", action="store_true", help="heal queue: machine-readable output")
    heal.add_argument(
        "--state-dir", default=DEFAULT_STATE_DIR, help="dev cluster whose gateway to use"
    )
    heal.add_argument("--dry-run", action="store_true", help="only check; write nothing")
    certs_cmd.add_parser(admin_sub)
    kvadmin.add_parser(admin_sub, DEFAULT_STATE_DIR, ETCD_PREFIX)
    pools_cmd.add_parser(admin_sub, DEFAULT_STATE_DIR)
    user = admin_sub.add_parser("user", help="S3 users (access keys)")
    user_sub = user.add_subparsers(dest="user_command", required=True)
    add = user_sub.add_parser("add", help="create a user; prints its secret once")
    add.add_argument("--tenant", default="default", help="the tenant whose buckets it uses")
    add.add_argument("--name", default="", help="display name")
    add.add_argument("--admin", action="store_true", help="may use every tenant's buckets")
    add.add_argument(
        "--trust-shm",
        action="store_true",
        help="may map a node's whole arena over same-host shared memory (docs/security.md)",
    )
    add.add_argument("--access-key", default="", help="choose the access key (with --secret)")
    add.add_argument(
        "--secret",
        "--secret-key",
        dest="secret_key",
        default="",
        help="choose the secret (with --access-key); '-' reads it from stdin",
    )
    listing = user_sub.add_parser("list", help="users, without secrets")
    listing.add_argument("--tenant", default="", help="only this tenant's users")
    remove = user_sub.add_parser("remove", help="delete a user")
    remove.add_argument("access_key")
    bucket = admin_sub.add_parser("bucket", help="buckets (through the metadata service)")
    bucket_sub = bucket.add_subparsers(dest="bucket_command", required=True)
    make = bucket_sub.add_parser("create", help="create a bucket of a kind for a tenant")
    make.add_argument("name", help="the bucket's name (S3's rules)")
    make.add_argument(
        "--kind",
        choices=sorted(admin_cmd.BUCKET_KINDS),
        default="objects",
        help="objects: the erasure-coded tier; kv: the KV-cache tier (docs/s3.md, KV buckets)",
    )
    make.add_argument("--tenant", default="", help="the owning tenant (default: default)")
    buckets = bucket_sub.add_parser("list", help="buckets with their kind and tenant")
    buckets.add_argument("--tenant", default="", help="only this tenant's buckets")
    for sub_parser in (add, listing, remove, make, buckets):
        sub_parser.add_argument(
            "--metadata", default="", help="metadata gRPC host:port (its service port)"
        )
        sub_parser.add_argument(
            "--state-dir", default=DEFAULT_STATE_DIR, help="dev cluster whose metadata to use"
        )
        sub_parser.add_argument("--json", action="store_true", help="machine-readable output")
